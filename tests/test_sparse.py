"""Kascade sparse attention: a budget covering every key is dense attention exactly; the anchor's Top-k matches a
NumPy brute force; reuse layers follow the head map; prefill and decode agree with masked dense attention on the
selected set; the policy runs inside the jitted model forward."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kascade_lite.attention import causal_mask, gqa_attention
from kascade_lite.config import LlamaConfig
from kascade_lite.model import KVCache, Llama, forward, generate
from kascade_lite.schedule import Schedule
from kascade_lite.sparse import (KascadeAttention, budget_keys, gather_attention, masked_attention, select_topk,
                                 selection_mask, tile_starts)

KV_HEADS, GROUP, D = 3, 2, 8


def qkv(rng: np.random.Generator, q_len: int, kv_total: int, batch: int = 2):
    """Random ``q [batch, q_len, KV_HEADS*GROUP, D]`` and ``k, v [batch, kv_total, KV_HEADS, D]``."""
    q = rng.standard_normal((batch, q_len, KV_HEADS * GROUP, D)).astype(np.float32) * 2
    k = rng.standard_normal((batch, kv_total, KV_HEADS, D)).astype(np.float32)
    v = rng.standard_normal((batch, kv_total, KV_HEADS, D)).astype(np.float32)
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


def schedule(num_layers: int = 4, anchors=(2,), head_map=None, **kw) -> Schedule:
    return Schedule.from_anchors("test", num_layers, KV_HEADS, list(anchors), head_map=head_map, **kw)


@functools.partial(jax.jit, static_argnames=("policy", "num_layers"))
def _run_layers(policy, q, k, v, q_offset, kv_len, num_layers: int):
    carry, outs = None, []
    for layer in range(num_layers):
        out, carry = policy(layer, q, k, v, q_offset=q_offset, kv_len=kv_len, carry=carry)
        outs.append(out)
    return outs, carry


def run_layers(policy, q, k, v, q_offset: int, kv_len: int, num_layers: int):
    """Outputs of every layer on the same q/k/v (enough to exercise anchor -> reuse hand-offs), jitted as in the
    model (one compilation per shape instead of one per primitive)."""
    return _run_layers(policy, q, k, v, jnp.int32(q_offset), jnp.int32(kv_len), num_layers)


# ------------------------------------------------------------------------------------------------ budget
def test_budget_keys() -> None:
    assert budget_keys(512, 0.1, 128) == 128          # the floor wins at short context
    assert budget_keys(2048, 0.1, 128) == 205         # ceil(204.8)
    assert budget_keys(100, 0.1, 128) == 100          # never more than the keys there are
    assert budget_keys(512, 64) == 64                 # fixed count
    np.testing.assert_array_equal(budget_keys(jnp.array([0, 50, 2048]), 0.1, 16), [0, 16, 205])
    for bad in (0.0, 1.5, -3, "x"):
        with pytest.raises(ValueError, match="budget"):
            budget_keys(10, bad)


# ------------------------------------------------------------------------------------------------ full budget = dense
@settings(max_examples=10)
@given(q_len=st.integers(1, 21), past=st.integers(0, 9), spare=st.integers(0, 5), tile=st.sampled_from([1, 4, 8]),
       granularity=st.sampled_from(["tile", "position"]), pool=st.sampled_from(["group", "all", "head"]),
       rolling=st.booleans())
def test_full_budget_is_dense_exactly(q_len, past, spare, tile, granularity, pool, rolling) -> None:
    """budget=1.0 keeps every preceding key: every selection (anchors', and the remapped one a reuse layer reads)
    is exactly the causal mask, and every layer type reproduces dense attention (bit for bit eagerly; to float32
    rounding here, where XLA fuses the masked and the dense graph differently) — prefill from an offset and decode
    against a partially filled cache included."""
    rng = np.random.default_rng(q_len * 100 + past)
    kv_len, kv_total = past + q_len, past + q_len + spare
    q, k, v = qkv(rng, q_len, kv_total)
    hm = [[0, 1, 2], [0, 1, 2], [0, 1, 2], [2, 0, 1]]
    policy = KascadeAttention(schedule(head_map=hm, tile_size=tile, budget=1.0, min_keys=0),
                              granularity=granularity, pool=pool, rolling=rolling)
    outs, carry = run_layers(policy, q, k, v, past, kv_len, 4)
    causal = np.broadcast_to(np.asarray(causal_mask(q_len, kv_total, past, kv_len)), (2, KV_HEADS, 1, q_len, kv_total))
    for sel in (carry[0], carry[2], carry[2].remap(hm[3])):
        mask = np.asarray(selection_mask(sel, q_len, kv_total, past, kv_len))
        np.testing.assert_array_equal(mask, np.broadcast_to(causal[:, :, :1], mask.shape))
    dense = gqa_attention(q, k, v, q_offset=past, kv_len=kv_len)
    for out in outs:
        np.testing.assert_allclose(np.asarray(out), np.asarray(dense), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ brute force
def brute_force_topk(q, k, q_offset, tile, budget, min_keys, unit=1):
    """NumPy reference of the anchor step: exact softmax, summed over each group and query tile, Top-k of the
    keys (or key tiles) before the tile. Returns a list ``[batch][kv_head][tile] -> set of key positions``."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    b, t, heads, d = q.shape
    n = k.shape[1]
    group = heads // k.shape[2]
    k_rep = np.repeat(k, group, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k_rep) / np.sqrt(d)
    pos = np.arange(t)[:, None] + q_offset
    s = np.where(np.arange(n)[None, :] <= pos, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    p = p.reshape(b, k.shape[2], group, t, n).sum(2)
    sets = []
    for bi in range(b):
        per_head = []
        for h in range(k.shape[2]):
            per_tile = []
            for start in range(0, t, tile):
                abs_start = start + q_offset
                score = p[bi, h, start:start + tile].sum(0)
                units = [u for u in range(-(-n // unit)) if u * unit < abs_start]
                unit_score = {u: score[u * unit:(u + 1) * unit].sum() for u in units}
                keep = -(-min(budget_keys(q_offset + t, budget, min_keys), abs_start) // unit)
                best = sorted(units, key=lambda u: -unit_score[u])[:keep]
                per_tile.append({j for u in best for j in range(u * unit, min((u + 1) * unit, n))})
            per_head.append(per_tile)
        sets.append(per_head)
    return sets


@pytest.mark.parametrize("granularity,unit", [("position", 1), ("tile", 4)])
@pytest.mark.parametrize("q_len,q_offset", [(24, 0), (13, 7), (1, 30)])
def test_anchor_selection_matches_brute_force(granularity, unit, q_len, q_offset, rng) -> None:
    q, k, v = qkv(rng, q_len, q_offset + q_len)
    policy = KascadeAttention(schedule(tile_size=4, budget=0.25, min_keys=3), granularity=granularity)
    _, carry = run_layers(policy, q, k, v, q_offset, q_offset + q_len, 3)
    sel = carry[2]
    tile = 1 if q_len == 1 else 4
    want = brute_force_topk(q, k, q_offset, tile, 0.25, 3, unit)
    idx, keep = np.asarray(sel.idx), np.asarray(sel.keep)
    for bi in range(2):
        for h in range(KV_HEADS):
            for t, expected in enumerate(want[bi][h]):
                units = idx[bi, h, 0, t][keep[bi, h, 0, t]]
                got = {j for u in units for j in range(u * unit, min((u + 1) * unit, q_offset + q_len))}
                assert got == expected, (bi, h, t)


def test_anchor_output_is_softmax_over_its_selection(rng) -> None:
    q, k, v = qkv(rng, 16, 16)
    policy = KascadeAttention(schedule(tile_size=4, budget=0.25, min_keys=2))
    outs, carry = run_layers(policy, q, k, v, 0, 16, 3)
    mask = selection_mask(carry[2], 16, 16)
    np.testing.assert_allclose(outs[2], masked_attention(q, k, v, mask), atol=1e-6)
    assert not np.allclose(outs[2], gqa_attention(q, k, v), atol=1e-3)  # the budget really cut keys


# ------------------------------------------------------------------------------------------------ reuse + head map
def test_reuse_uses_mapped_heads(rng) -> None:
    """Reuse layer 3 maps its KV heads (0, 1, 2) to anchor heads (2, 0, 1): its mask for head h is the anchor's
    mask for head_map[h], and the result differs from the identity map."""
    hm = [[0, 1, 2]] * 3 + [[2, 0, 1]]
    q, k, v = qkv(rng, 32, 32)
    # Give each KV head a different favourite key, so the heads' Top-k sets really differ.
    k = k.at[:, 3, 0].mul(6.0).at[:, 9, 1].mul(6.0).at[:, 17, 2].mul(6.0)
    sched = schedule(head_map=hm, tile_size=8, budget=0.2, min_keys=2)
    policy = KascadeAttention(sched)
    outs, carry = run_layers(policy, q, k, v, 0, 32, 4)
    anchor_mask = selection_mask(carry[2], 32, 32)                  # [b, kv_heads, 1, q, k]
    mapped = anchor_mask[:, jnp.array([2, 0, 1])]
    np.testing.assert_allclose(outs[3], masked_attention(q, k, v, mapped), atol=1e-6)
    assert not np.array_equal(np.asarray(mapped), np.asarray(anchor_mask))
    identity_out, _ = run_layers(dataclasses.replace(policy, remap=False), q, k, v, 0, 32, 4)
    assert not np.allclose(identity_out[3], outs[3], atol=1e-4)
    np.testing.assert_allclose(identity_out[3], masked_attention(q, k, v, anchor_mask), atol=1e-6)


def test_reuse_layers_take_their_anchor(rng) -> None:
    """Layer 1 reuses layer 0's Top-k; layers 3-4 reuse anchor 2's (not layer 0's)."""
    q, k, v = qkv(rng, 24, 24)
    policy = KascadeAttention(schedule(num_layers=5, tile_size=8, budget=0.3, min_keys=1))
    outs, carry = run_layers(policy, q, k, v, 0, 24, 5)
    assert sorted(carry) == [0, 2]
    for layer, anchor in [(1, 0), (3, 2), (4, 2)]:
        np.testing.assert_allclose(outs[layer], masked_attention(q, k, v, selection_mask(carry[anchor], 24, 24)),
                                   atol=1e-6)


# ------------------------------------------------------------------------------------------------ decode vs prefill
@pytest.mark.parametrize("granularity", ["position", "tile"])
def test_decode_gather_equals_masked_reference(granularity, rng) -> None:
    """One decode step against a cache with unused slots: the per-token Top-k, attended by gathering the selected
    keys, equals masked dense attention with the selection mask; both equal the policy's reuse output."""
    q, k, v = qkv(rng, 1, 40)
    q_offset, kv_len = 29, 30
    policy = KascadeAttention(schedule(tile_size=4, budget=0.3, min_keys=4), granularity=granularity)
    outs, carry = run_layers(policy, q, k, v, q_offset, kv_len, 4)
    sel = carry[2]
    assert sel.q_tile == 1 and sel.idx.shape[3] == 1
    mask = selection_mask(sel, 1, 40, q_offset, kv_len)
    ref = masked_attention(q, k, v, mask)
    np.testing.assert_allclose(gather_attention(q, k, v, sel, q_offset), ref, atol=1e-6)
    np.testing.assert_allclose(outs[3], ref, atol=1e-6)
    assert int(mask.sum(-1).max()) <= budget_keys(kv_len, 0.3, 4) + 4  # Top-k (tile-rounded) + own key


def test_selection_mask_has_own_tile_and_stays_causal(rng) -> None:
    q, k, v = qkv(rng, 20, 20)
    policy = KascadeAttention(schedule(tile_size=8, budget=0.1, min_keys=0))
    _, carry = run_layers(policy, q, k, v, 0, 20, 3)
    mask = np.asarray(selection_mask(carry[2], 20, 20))
    causal = np.tril(np.ones((20, 20), bool))
    assert not (mask & ~causal).any()
    for i in range(20):
        start = i // 8 * 8
        assert mask[..., i, start:i + 1].all()     # own tile's causal keys always in


def test_rolling_budget_grows_with_position(rng) -> None:
    starts = tile_starts(64, 8)
    scores = jnp.asarray(rng.random((1, 1, 1, 8, 64)), jnp.float32)
    fixed = select_topk(scores, starts, 64, q_tile=8, unit=1, budget=0.25, min_keys=0)
    rolling = select_topk(scores, starts, 64, q_tile=8, unit=1, budget=0.25, min_keys=0, rolling=True)
    np.testing.assert_array_equal(np.asarray(fixed.keep).sum(-1)[0, 0, 0], [0, 8, 16, 16, 16, 16, 16, 16])
    np.testing.assert_array_equal(np.asarray(rolling.keep).sum(-1)[0, 0, 0], [0, 2, 4, 6, 8, 10, 12, 14])


def test_bad_options_raise() -> None:
    with pytest.raises(ValueError, match="granularity"):
        KascadeAttention(schedule(), granularity="block")
    with pytest.raises(ValueError, match="pool"):
        KascadeAttention(schedule(), pool="some")


# ------------------------------------------------------------------------------------------------ inside the model
def tiny_model() -> Llama:
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=KV_HEADS * GROUP,
                      num_kv_heads=KV_HEADS, head_dim=D, max_position_embeddings=128)
    return Llama(cfg)


def test_policy_runs_in_jitted_forward_and_decode() -> None:
    model = tiny_model()
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 40)), jnp.int32)
    hm = [[0, 1, 2], [1, 2, 0], [0, 1, 2], [2, 2, 0]]
    full = KascadeAttention(schedule(head_map=hm, tile_size=8, budget=1.0, min_keys=0))
    sparse = KascadeAttention(schedule(head_map=hm, tile_size=8, budget=0.1, min_keys=4), granularity="tile")
    assert hash(full) != hash(sparse)
    dense_logits, _, _ = forward(model, tokens)
    full_logits, _, carry = forward(model, tokens, None, full)
    np.testing.assert_allclose(full_logits, dense_logits, atol=1e-5)
    assert sorted(carry) == [0, 2]
    sparse_logits, _, _ = forward(model, tokens, None, sparse)
    assert np.isfinite(np.asarray(sparse_logits)).all()
    assert not np.allclose(sparse_logits, dense_logits, atol=1e-4)
    # Decode with the KV cache: with a full budget the generated tokens are the dense ones.
    np.testing.assert_array_equal(generate(model, tokens[:1, :12], 5, attention=full),
                                  generate(model, tokens[:1, :12], 5))
    assert generate(model, tokens[:1, :12], 5, attention=sparse).shape == (1, 17)
    cache = KVCache.empty(model.cfg, 1, 16)
    _, cache, _ = forward(model, tokens[:1, :12], cache, sparse)
    assert int(cache.length) == 12


def test_schedule_must_fit_the_model(rng) -> None:
    q, k, v = qkv(rng, 4, 4)
    policy = KascadeAttention(schedule(num_layers=2))
    with pytest.raises(ValueError, match="cannot run layer 3"):
        policy(3, q, k, v, q_offset=jnp.int32(0), kv_len=jnp.int32(4), carry=None)
