"""Baselines: each is hashable and runs in the jitted model; each keeps its defining invariant (window + sinks,
Quest's bound really bounds q·k, oracle/all-heads/OmniKV selection shapes, TidalDecode equals its masked oracle),
and a full budget is dense."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from oracles import chosen_units, masked_attention, selection_mask

from kascade_lite.attention import gqa_attention, grouped_scores
from kascade_lite.baselines import (QuestAttention, SinkWindowAttention, TidalDecode, TiledSinkWindow,
                                    all_heads_pooled, flash_dense_attention, kascade_no_remap, oracle_topk, omnikv,
                                    page_min_max, quest_selection, quest_upper_bound, sink_window_selection,
                                    sink_window_tiles)
from kascade_lite.config import LlamaConfig
from kascade_lite.kascade import KascadeAttention, keys_kept
from kascade_lite.methods import METHODS
from kascade_lite.model import KVCache, Llama, dense_attention, forward, generate
from kascade_lite.schedule import Schedule

KV_HEADS, GROUP, D, LAYERS = 2, 3, 8, 4


def qkv(rng: np.random.Generator, q_len: int, kv_total: int):
    q = jnp.asarray(rng.standard_normal((1, q_len, KV_HEADS * GROUP, D)), jnp.float32) * 2
    k = jnp.asarray(rng.standard_normal((1, KV_HEADS, kv_total, D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((1, KV_HEADS, kv_total, D)), jnp.float32)
    return q, k, v


def sched(**kw) -> Schedule:
    return Schedule.from_anchors("test", LAYERS, KV_HEADS, [2], head_map=[[0, 1], [1, 0], [0, 1], [1, 1]], **kw)


def all_policies(budget, min_keys: int = 0) -> dict[str, object]:
    s = sched(tile_size=4, budget=budget if isinstance(budget, float) else 1.0, min_keys=min_keys)
    opts = {} if isinstance(budget, float) else {"budget": budget}
    return {
        "dense": dense_attention,
        "kascade": KascadeAttention(s, **opts),
        "oracle": oracle_topk(LAYERS, KV_HEADS, budget=budget, min_keys=min_keys),
        "kascade_no_remap": kascade_no_remap(s, **opts),
        "all_heads_pooled": all_heads_pooled(s, **opts),
        "sink_window": SinkWindowAttention(budget=budget, min_keys=min_keys),
        "quest": QuestAttention(budget=budget, min_keys=min_keys, page_size=4),
        "omnikv": omnikv(s, **opts),
        "tidal": TidalDecode(LAYERS, KV_HEADS, budget=budget, min_keys=min_keys),
    }


def run(policy, q, k, v, q_offset: int, kv_len: int):
    carry, outs = None, []
    for layer in range(LAYERS):
        out, carry = policy(layer, q, k, v, q_offset=jnp.int32(q_offset), kv_len=jnp.int32(kv_len), carry=carry)
        outs.append(out)
    return outs, carry


def test_every_baseline_is_a_registered_method() -> None:
    assert set(all_policies(0.5)) <= set(METHODS)
    assert all("20" in METHODS[name].description for name in all_policies(0.5))  # each cites a year


@pytest.mark.parametrize("name", sorted(all_policies(0.5)))
def test_full_budget_is_dense(name, rng) -> None:
    q, k, v = qkv(rng, 9, 14)
    policy = all_policies(1.0)[name]
    outs, _ = run(policy, q, k, v, 5, 14)
    dense = gqa_attention(q, k, v, q_offset=5, kv_len=14)
    for out in outs:
        np.testing.assert_allclose(out, dense, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(all_policies(0.5)) - {"dense"}) + ["tiled_sink_window"])
def test_full_budget_is_dense_in_the_model(name) -> None:
    """At 100 % of the keys every sparse baseline gives dense attention's logits through the model: a prefill from
    position 0, a chunk prefilled after it, and two decode steps."""
    model = tiny_model()
    policy = (TiledSinkWindow(keep=4, tile=8) if name == "tiled_sink_window"
              else all_policies(1.0)[name])
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, 50, (1, 28)), jnp.int32)
    cache = dense_cache = KVCache.empty(model.cfg, 1, 32)
    for part in (tokens[:, :20], tokens[:, 20:26], tokens[:, 26:27], tokens[:, 27:28]):
        got, cache, _ = forward(model, part, cache, policy)
        want, dense_cache, _ = forward(model, part, dense_cache)
        np.testing.assert_allclose(got, want, atol=1e-4, err_msg=f"{name} at {int(cache.length)}")


def mask_of(sel, q_len: int, kv_total: int, q_offset: int, kv_len: int) -> np.ndarray:
    """A selection as the oracle's boolean mask ``[batch, kv_heads, sets, q_len, kv_total]``."""
    n_units = -(-kv_total // sel.unit)
    return np.asarray(selection_mask(chosen_units(sel, n_units), q_len, kv_total, q_tile=sel.q_tile, unit=sel.unit,
                                     q_offset=q_offset, kv_len=kv_len))


def test_sink_window_selection() -> None:
    """Each query sees the 4 sinks plus the most recent keys, keys_kept(kv_len) in all, never a future key."""
    sel = sink_window_selection(40, 40, 0, 40, batch=1, kv_heads=1, budget=10, min_keys=0, sinks=4)
    mask = mask_of(sel, 40, 40, 0, 40)[0, 0, 0]
    assert not (mask & ~np.tril(np.ones((40, 40), bool))).any()
    for i in range(40):
        allowed = set(np.flatnonzero(mask[i]))
        expected = set(range(min(4, i + 1))) | set(range(max(0, i - 5), i + 1))
        assert allowed == expected, i
        assert len(allowed) <= 10


def test_quest_bound_is_an_upper_bound(rng) -> None:
    q, k, _ = qkv(rng, 5, 37)
    kmin, kmax = page_min_max(k, 8, 37)
    bound = np.asarray(quest_upper_bound(q, kmin, kmax))         # [b, kv_heads, group, q, pages]
    qg = np.asarray(q).reshape(1, 5, KV_HEADS, GROUP, D)
    exact = np.einsum("bqhgd,bhkd->bhgqk", qg, np.asarray(k)) / np.sqrt(D)
    for page in range(5):
        page_max = exact[..., page * 8:(page + 1) * 8].max(-1)
        assert (bound[..., page] >= page_max - 1e-5).all()
    # unused cache slots never enter a page's min/max
    kmin2, kmax2 = page_min_max(k.at[:, :, 30:].set(100.0), 8, 30)
    np.testing.assert_array_equal(kmax2[:, :, :3], kmax[:, :, :3])
    assert np.isneginf(np.asarray(kmax2[:, :, 4])).all()


def quest_rule(q, k, q_offset: int, kv_len: int, *, page: int, budget, min_keys: int) -> np.ndarray:
    """Quest's rule written out (Tang et al. 2024, and its decode kernels): per query head (the paper's models are
    multi-head; with GQA each query head ranks the pages of its KV head on its own), a page's score is
    sum_d max(q_d * min_d, q_d * max_d) over the page's keys; the page holding the query is always attended (its
    keys up to the query), plus the ceil(keys_kept / page) - 1 best-scoring pages before it.
    Returns the allowed keys, bool [1, kv_heads, group, q_len, kv_total]."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    _, t_len, heads, _ = q.shape
    kv_heads, kv_total = k.shape[1], k.shape[2]
    group = heads // kv_heads
    n_pages = -(-keys_kept(kv_len, budget, min_keys) // page)
    allowed = np.zeros((1, kv_heads, group, t_len, kv_total), bool)
    for h, g, t in np.ndindex(kv_heads, group, t_len):
        qv, pos = q[0, t, h * group + g], q_offset + t
        current = pos // page
        score = {pg: np.maximum(qv * k[0, h, pg * page:(pg + 1) * page].min(0),
                                qv * k[0, h, pg * page:(pg + 1) * page].max(0)).sum() for pg in range(current)}
        for pg in sorted(score, key=lambda x: -score[x])[:n_pages - 1]:
            allowed[0, h, g, t, pg * page:(pg + 1) * page] = True
        allowed[0, h, g, t, current * page:pos + 1] = True
    return allowed


@pytest.mark.parametrize("q_offset,q_len,budget", [(32, 1, 12), (33, 1, 12), (35, 1, 0.3), (39, 1, 12),
                                                   (27, 9, 12), (5, 9, 1.0)])
def test_quest_selection_equals_its_rule(rng, q_offset, q_len, budget) -> None:
    """quest_selection keeps, per query head, the query's page and the Top pages before it by Quest's bound."""
    q, k, _ = qkv(rng, q_len, 40)
    kv_len = q_offset + q_len
    sel = quest_selection(q, k, jnp.int32(q_offset), jnp.int32(kv_len), page_size=4, budget=budget, min_keys=0)
    assert sel.idx.shape[2] == GROUP                                                  # one set per query head
    np.testing.assert_array_equal(mask_of(sel, q_len, 40, q_offset, kv_len),
                                  quest_rule(q, k, q_offset, kv_len, page=4, budget=budget, min_keys=0))


def test_quest_attends_its_rule(rng) -> None:
    """Decode at position 62, pages of 4, 16 keys: the output is the masked softmax over Quest's rule."""
    q, k, v = qkv(rng, 1, 64)
    quest = QuestAttention(budget=16, min_keys=0, page_size=4, dense_layers=())
    out, _ = quest(1, q, k, v, q_offset=jnp.int32(62), kv_len=jnp.int32(63), carry=None)
    mask = quest_rule(q, k, 62, 63, page=4, budget=16, min_keys=0)
    np.testing.assert_allclose(out, masked_attention(q, k, v, jnp.asarray(mask)), atol=1e-5)


def test_selection_sharing(rng) -> None:
    """Oracle: one set per query head; all-heads pooled: one set shared by every KV head; OmniKV: filter layers
    are dense and their set is shared too."""
    q, k, v = qkv(rng, 16, 16)
    pols = all_policies(0.25)
    _, carry = run(pols["oracle"], q, k, v, 0, 16)
    assert carry[1].idx.shape[2] == GROUP and carry[1].q_tile == 1
    _, carry = run(pols["all_heads_pooled"], q, k, v, 0, 16)
    np.testing.assert_array_equal(carry[2].idx[:, 0], carry[2].idx[:, 1])
    outs, carry = run(pols["omnikv"], q, k, v, 0, 16)
    np.testing.assert_allclose(outs[2], gqa_attention(q, k, v), atol=1e-5)
    np.testing.assert_array_equal(carry[2].idx[:, 0], carry[2].idx[:, 1])
    mask = mask_of(carry[2], 16, 16, 0, 16)
    assert not (mask.sum(-1)[..., 8:] == np.arange(9, 17)).any()    # the budget really cut keys


def test_sparse_baselines_respect_budget(rng) -> None:
    """A decode step at 200 keys reads keys_kept(200) keys, the query's own included."""
    q, k, v = qkv(rng, 1, 200)
    budget = keys_kept(200, 0.1, 0)
    sel = sink_window_selection(1, 200, 199, 200, batch=1, kv_heads=KV_HEADS, budget=0.1, min_keys=0)
    assert mask_of(sel, 1, 200, 199, 200).sum(-1).max() == budget
    _, carry = run(all_policies(0.1)["oracle"], q, k, v, 199, 200)
    assert mask_of(carry[3], 1, 200, 199, 200).sum(-1).max() == budget


def tidal_rule(reselect: int, budget, min_keys: int):
    """TidalDecode's rule written out (Yang et al. 2024 and its reference code), as an eager attention function:
    prefill dense; in decode layers 0-1 dense, layers 2 and ``reselect`` dense and each query head keeps its own key
    plus the ``keys_kept - 1`` earlier keys of largest score, every other layer attends to the latest such set of
    the same query head."""
    chosen = {}

    def attention(layer, q, k, v, *, q_offset, kv_len, carry):
        pos, n = int(q_offset) + np.arange(q.shape[1]), int(kv_len)
        allowed = (np.arange(k.shape[2]) <= pos[:, None]) & (np.arange(k.shape[2]) < n)       # causal, [q, L]
        if q.shape[1] == 1 and layer >= 2:
            if layer in (2, reselect):
                s = np.asarray(grouped_scores(q, k))[0, :, :, 0]                             # [kv_heads, group, L]
                keep = np.zeros(s.shape, bool)
                for h, g in np.ndindex(*s.shape[:2]):
                    keep[h, g, np.argsort(-s[h, g, :pos[0]])[:keys_kept(n, budget, min_keys) - 1]] = True
                keep[..., pos[0]] = True
                chosen["set"] = keep
            else:
                allowed = chosen["set"][None, :, :, None, :]
        return masked_attention(q, k, v, jnp.asarray(allowed)), carry

    return attention


@pytest.mark.parametrize("reselect", [None, 4])
def test_tidal_decode_equals_its_rule(reselect) -> None:
    """TidalDecode in a tiny model (6 layers): a dense prefill, then each decode step equals `tidal_rule`."""
    model = tiny_model(num_layers=6)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 50, (1, 30)), jnp.int32)
    tidal = TidalDecode(6, KV_HEADS, budget=0.25, min_keys=2, reselect=reselect)
    rule = tidal_rule(tidal.reselect_layer, 0.25, 2)
    assert reselect is not None or tidal.reselect_layer == 3
    cache = KVCache.empty(model.cfg, 1, 32)
    logits, cache, _ = forward(model, tokens[:, :28], cache, tidal)
    np.testing.assert_allclose(logits, forward(model, tokens[:, :28])[0], atol=1e-5)   # dense prefill
    for t in (28, 29):
        step = tokens[:, t:t + 1]
        got, new_cache, carry = forward(model, step, cache, tidal)
        np.testing.assert_allclose(got, model(step, cache=cache, attention=rule)[0], atol=1e-5)
        assert sorted(carry) == [0, 1, 2, tidal.reselect_layer] and carry[2].idx.shape[2] == GROUP
        cache = new_cache
    assert not np.allclose(got, forward(model, step, cache)[0], atol=1e-4)         # it is sparse
    with pytest.raises(ValueError, match="reselect"):
        TidalDecode(6, KV_HEADS, reselect=2)


def test_sink_window_tiles_are_the_sink_and_the_most_recent():
    idx = np.asarray(sink_window_tiles(jnp.arange(8), 3))
    assert idx.tolist() == [[0, 1, 2], [0, 1, 2], [0, 1, 2], [0, 2, 3], [0, 3, 4], [0, 4, 5], [0, 5, 6], [0, 6, 7]]
    with pytest.raises(ValueError, match="keep >= 2"):
        TiledSinkWindow(keep=1)


@pytest.mark.slow
def test_tiled_sink_window_matches_its_masked_reference():
    """StreamingLLM at tile granularity equals a masked softmax over tile 0 + the recent tiles, in prefill (per
    query tile) and in decode (the newest token's tile), inside the model."""
    tile, keep = 8, 3
    pol = TiledSinkWindow(keep=keep, tile=tile)

    def reference(layer, q, k, v, *, q_offset, kv_len, carry):
        if layer == 0:
            return flash_dense_attention(layer, q, k, v, q_offset=q_offset, kv_len=kv_len, carry=carry)
        q_pos = q_offset + jnp.arange(q.shape[1])
        first = q_pos // (tile if q.shape[1] > 1 else 1) * (tile if q.shape[1] > 1 else 1)   # the query tile's start
        k_pos = jnp.arange(k.shape[2])
        tiles = sink_window_tiles(first // tile, keep)                                     # [q_len, keep]
        in_set = (k_pos[None, :, None] // tile == tiles[:, None, :]).any(-1)               # [q_len, kv]
        allowed = in_set & (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < kv_len)
        return masked_attention(q, k, v, allowed[None, None, None]), carry

    model = tiny_model()
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (1, 40)), jnp.int32)
    empty = KVCache.empty(model.cfg, 1, 48)
    logits, cache, _ = forward(model, tokens, empty, pol)
    ref_logits, ref_cache, _ = forward(model, tokens, empty, reference)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
    assert not np.allclose(logits, forward(model, tokens, empty)[0], atol=1e-4)  # it is sparse
    step = tokens[:, -1:]
    np.testing.assert_allclose(forward(model, step, cache, pol)[0], forward(model, step, ref_cache, reference)[0],
                               atol=1e-5)


def tiny_model(num_layers: int = LAYERS) -> Llama:
    cfg = LlamaConfig(vocab_size=50, hidden_size=24, intermediate_size=48, num_layers=num_layers,
                      num_heads=KV_HEADS * GROUP, num_kv_heads=KV_HEADS, head_dim=D, max_position_embeddings=64)
    return Llama(cfg)


@pytest.mark.slow
def test_baselines_run_in_jitted_model() -> None:
    model = tiny_model()
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 50, (1, 24)), jnp.int32)
    dense, _, _ = forward(model, tokens)
    for name, policy in all_policies(0.25, min_keys=2).items():
        assert hash(policy) == hash(policy)
        logits, _, _ = forward(model, tokens, None, policy)
        assert np.isfinite(np.asarray(logits)).all(), name
        if name in ("quest", "sink_window", "tidal"):  # decode-specific baselines also generate with a KV cache
            assert generate(model, tokens[:, :10], 3, attention=policy).shape == (1, 13)
    np.testing.assert_allclose(forward(model, tokens, None, dense_attention)[0], dense, atol=1e-6)
