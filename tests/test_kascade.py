"""Kascade (`kascade_lite.kascade`) against its oracles (`tests/oracles.py`): the budget rule; the selection equals a
NumPy brute-force Top-k; the gather path equals masked attention on the same selection for sparse budgets, both
granularities, prefill from an offset and decode, remapped heads; a full budget is dense; the policy runs inside the
jitted model forward and equals the masked policy there."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from oracles import (MaskedKascade, brute_topk, chosen_units, forced_units, masked_attention, selection_mask,
                     unit_scores)

from kascade_lite import kernels as K
from kascade_lite.attention import gqa_attention
from kascade_lite.config import LlamaConfig
from kascade_lite.kascade import (FORCED, KascadeAttention, Selection, attend, keys_kept, select, tiles_kept,
                                  topk_count)
from kascade_lite.model import KVCache, Llama, forward, generate
from kascade_lite.schedule import Schedule

KV_HEADS, GROUP, D = 3, 2, 8
NO_SHRINK = (Phase.explicit, Phase.generate)  # each example compiles: report the first failure as found


def qkv(rng: np.random.Generator, q_len: int, kv_total: int, batch: int = 2):
    """Random ``q [batch, q_len, KV_HEADS*GROUP, D]`` and head-major ``k, v [batch, KV_HEADS, kv_total, D]``."""
    q = rng.standard_normal((batch, q_len, KV_HEADS * GROUP, D)).astype(np.float32) * 2
    k = rng.standard_normal((batch, KV_HEADS, kv_total, D)).astype(np.float32)
    v = rng.standard_normal((batch, KV_HEADS, kv_total, D)).astype(np.float32)
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
    """Outputs of every layer on the same q/k/v (enough for the anchor -> reuse hand-offs), jitted as in the model."""
    return _run_layers(policy, q, k, v, jnp.int32(q_offset), jnp.int32(kv_len), num_layers)


# ------------------------------------------------------------------------------------------------ budget
def test_keys_kept_rule() -> None:
    assert keys_kept(512, 0.1, 128) == 128            # the floor wins at short context
    assert keys_kept(2048, 0.1, 128) == 205           # ceil(204.8)
    assert keys_kept(100, 0.1, 128) == 100            # never more than the keys there are
    assert keys_kept(130, 0.1, 0) == 13               # no float64 round-up of 13.000000000000002
    assert keys_kept(512, 64, 0) == 64                # a fixed count
    np.testing.assert_array_equal(keys_kept(jnp.array([0, 50, 130, 2048]), 0.1, 16), [0, 16, 16, 205])
    np.testing.assert_array_equal(keys_kept(jnp.arange(1, 3000), 0.1, 7),
                                  [keys_kept(n, 0.1, 7) for n in range(1, 3000)])   # int and array agree
    for bad in (0.0, 1.5, -3, "x", True):
        with pytest.raises(ValueError, match="budget"):
            keys_kept(10, bad)


def test_topk_count_excludes_the_own_tile() -> None:
    assert topk_count(512, 32, budget=0.1, min_keys=0) == 52 - 32          # the own 32 keys are in the budget
    assert topk_count(512, 32, budget=0.1, min_keys=0, unit=32) == 1       # 20 keys -> one whole key tile
    assert topk_count(64, 16, budget=0.1, min_keys=0) == 0                 # the own tile alone exceeds it
    assert topk_count(8192, 1, budget=0.1, min_keys=128) == 819            # decode: the query is a tile of one
    assert tiles_kept(32768, 32, 0.1, 0) == 103
    assert tiles_kept(100, 32, 0.1, 128) == 4                              # capped at the 4 tiles there are
    with pytest.raises(ValueError, match="tile"):
        tiles_kept(100, 0, 0.1)


def test_rolling_budget_grows_with_position(rng) -> None:
    q, k, _ = qkv(rng, 64, 64, batch=1)
    kw = dict(q_tile=8, unit=1, pool="group", budget=0.25, min_keys=0)
    fixed = select(q, k, 0, 64, **kw)
    rolling = select(q, k, 0, 64, rolling=True, **kw)
    np.testing.assert_array_equal(np.asarray(fixed.keep).sum(-1)[0, 0, 0], [0, 8, 8, 8, 8, 8, 8, 8])
    np.testing.assert_array_equal(np.asarray(rolling.keep).sum(-1)[0, 0, 0], [0, 0, 0, 0, 2, 4, 6, 8])


def test_sinks_and_recent_keys_are_chosen_first_inside_the_budget(rng) -> None:
    q, k, _ = qkv(rng, 64, 64, batch=1)
    kw = dict(q_tile=8, unit=1, pool="group", budget=0.25, min_keys=0)
    plain, forced = select(q, k, 0, 64, **kw), select(q, k, 0, 64, sinks=2, recent=3, **kw)
    np.testing.assert_array_equal(np.asarray(forced.keep).sum(-1), np.asarray(plain.keep).sum(-1))  # same budget
    idx, keep = np.asarray(forced.idx)[0, 0, 0], np.asarray(forced.keep)[0, 0, 0]
    for t in range(1, 8):  # tile t starts at 8 t: positions 0, 1 and 8 t - 3 .. 8 t - 1 are among its keys
        chosen = set(idx[t][keep[t]].tolist())
        assert {0, 1, 8 * t - 3, 8 * t - 2, 8 * t - 1} <= chosen, (t, sorted(chosen))
    with pytest.raises(ValueError, match="sinks"):
        KascadeAttention(schedule(), sinks=-1)


# ------------------------------------------------------------------------------------------------ mass-targeted
@pytest.mark.parametrize("q_len,past,q_tile,granularity,pool,mass,sinks,blocks", [
    (1, 60, 1, "position", "group", 0.9, 0, (256, 512)),       # a decode step
    (1, 60, 1, "tile", "head", 0.7, 0, (256, 512)),
    (37, 20, 4, "position", "group", 0.8, 0, (8, 16)),          # prefill, several query and key blocks
    (37, 20, 4, "tile", "group", 0.95, 2, (8, 16)),
    (30, 0, 4, "position", "all", 0.5, 0, (256, 512)),
])
def test_mass_targeted_selection_is_the_brute_force_rule(rng, q_len, past, q_tile, granularity, pool, mass, sinks,
                                                          blocks) -> None:
    """Each row keeps the shortest score-ordered prefix that reaches ``mass`` of its pooled attention with the own
    tile, between the floor and the budget (`oracles.brute_topk` with ``mass``)."""
    q, k, _ = qkv(rng, q_len, past + q_len + 3)
    unit = q_tile if granularity == "tile" else 1
    kw = dict(q_tile=q_tile, unit=unit, budget=0.6, min_keys=6, sinks=sinks, mass=mass)
    sel = select(q, k, past, past + q_len, pool=pool, block_q=blocks[0], block_k=blocks[1], **kw)
    scores = np.asarray(unit_scores(q, k, past, past + q_len, q_tile=q_tile, unit=unit, pool=pool))
    want = brute_topk(scores, q_len, past, past + q_len, **kw)
    got = chosen_units(sel, scores.shape[-1])
    np.testing.assert_array_equal(got, want)
    fixed = chosen_units(select(q, k, past, past + q_len, pool=pool, **dict(kw, mass=None)), scores.shape[-1])
    assert (got.sum(-1) <= fixed.sum(-1)).all() and (got.sum(-1) < fixed.sum(-1)).any()  # the budget is a maximum


def test_mass_targeted_selection_keeps_more_keys_for_flatter_rows(rng) -> None:
    """Peaked rows stop at the floor, flat rows run to the budget: with queries scaled up (peaked softmax) a decode
    step keeps fewer keys than with queries scaled down (flat)."""
    q, k, _ = qkv(rng, 1, 200, batch=1)
    kw = dict(q_tile=1, unit=1, pool="group", budget=0.5, min_keys=4, mass=0.9)
    peaked, flat = (np.asarray(select(q * c, k, 199, 200, **kw).keep).sum() for c in (8.0, 0.05))
    assert peaked < flat == 3 * 99                      # 3 KV heads x (100 keys - the own key)
    with pytest.raises(ValueError, match="mass"):
        KascadeAttention(schedule(), mass=1.5)


def test_mass_one_at_full_budget_is_dense(rng) -> None:
    q, k, v = qkv(rng, 12, 40)
    policy = KascadeAttention(schedule(tile_size=4, budget=1.0, min_keys=0), mass=1.0)
    outs, _ = run_layers(policy, q, k, v, 28, 40, 4)
    want = gqa_attention(q, k, v, causal=True, q_offset=28, kv_len=40)
    for out in outs:
        np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-5)


# ------------------------------------------------------------------------------------------------ head budgets
def with_head_budgets(sched: Schedule, sets) -> Schedule:
    """``sched`` with multipliers ``sets[layer][head]`` on its anchor and dense rows, reuse rows inherited."""
    rows = [tuple(sets[a][h] for h in (range(KV_HEADS) if t != "reuse" else hm))
            for t, a, hm in zip(sched.layer_types, sched.anchor_of, sched.head_map)]
    return dataclasses.replace(sched, head_budgets=tuple(rows))


@pytest.mark.parametrize("q_len,past,q_tile,granularity,pool,mass,blocks", [
    (1, 60, 1, "position", "group", None, (256, 512)),          # a decode step
    (1, 60, 1, "tile", "head", 0.8, (256, 512)),
    (37, 20, 4, "position", "group", None, (8, 16)),            # prefill, several query and key blocks
    (37, 20, 4, "tile", "all", None, (8, 16)),
])
def test_head_budget_selection_is_the_brute_force_rule(rng, q_len, past, q_tile, granularity, pool, mass,
                                                        blocks) -> None:
    """A per-KV-head budget: each head's rows keep that head's count (`oracles.brute_topk` with a budget tuple)."""
    q, k, _ = qkv(rng, q_len, past + q_len + 3)
    unit = q_tile if granularity == "tile" else 1
    budgets = (0.05, 0.3, 0.6)
    kw = dict(q_tile=q_tile, unit=unit, budget=budgets, min_keys=6, mass=mass)
    sel = select(q, k, past, past + q_len, pool=pool, block_q=blocks[0], block_k=blocks[1], **kw)
    scores = np.asarray(unit_scores(q, k, past, past + q_len, q_tile=q_tile, unit=unit, pool=pool))
    got = chosen_units(sel, scores.shape[-1])
    np.testing.assert_array_equal(got, brute_topk(scores, q_len, past, past + q_len, **kw))
    kept = got.sum(axis=(0, 2, 3, 4))
    assert kept[0] < kept[1] < kept[2]                                    # more budget, more keys
    with pytest.raises(ValueError, match="one budget per KV head"):
        select(q, k, past, past + q_len, pool=pool, **dict(kw, budget=(0.1, 0.2)))


def test_head_budgets_of_one_are_the_plain_rule_and_full_budget_is_dense(rng) -> None:
    """Multipliers all 1 give the plain policy bit for bit (prefill and decode); at budget 1 every head is dense."""
    base = schedule(num_layers=5, anchors=(2,), head_map=[[0, 1, 2], [2, 2, 0], [0, 1, 2], [1, 0, 0], [2, 2, 2]],
                    tile_size=4, budget=0.25, min_keys=2)
    ones = with_head_budgets(base, [[1.0] * KV_HEADS] * 5)
    for q_len, past in ((12, 28), (1, 39)):
        q, k, v = qkv(rng, q_len, 40)
        (plain, pc), (hb, hc) = (run_layers(KascadeAttention(s), q, k, v, past, past + q_len, 5) for s in (base, ones))
        for a, b in zip(plain, hb):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        for layer in pc:
            np.testing.assert_array_equal(np.asarray(pc[layer].idx), np.asarray(hc[layer].idx))
            np.testing.assert_array_equal(np.asarray(pc[layer].keep), np.asarray(hc[layer].keep))
    full = with_head_budgets(dataclasses.replace(base, budget=1.0, min_keys=0), [[1.0, 2.0, 3.0]] * 5)
    q, k, v = qkv(rng, 12, 40)
    outs, _ = run_layers(KascadeAttention(full), q, k, v, 28, 40, 5)   # every head's budget clipped to all keys
    dense = gqa_attention(q, k, v, q_offset=28, kv_len=40)
    for out in outs:
        np.testing.assert_allclose(np.asarray(out), np.asarray(dense), atol=1e-5)


def test_anchor_heads_keep_their_own_budgets_and_reuse_inherits(rng) -> None:
    """With head budgets each anchor KV head keeps ``min(1, budget * m)`` of the keys (`select` with a budget
    tuple); a reuse layer's head reads its source head's set through the head map."""
    sched = with_head_budgets(schedule(num_layers=4, anchors=(2,), head_map=[[0, 1, 2]] * 3 + [[2, 2, 0]],
                                       tile_size=1, budget=0.2, min_keys=2), [[1.0] * 3, [1.0] * 3,
                                                                             [0.25, 1.0, 4.0], [1.0] * 3])
    q, k, _ = qkv(rng, 1, 100)
    policy = KascadeAttention(sched)
    _, carry = run_layers(policy, q, k, k, 99, 100, 4)
    want = select(q, k, 99, 100, q_tile=1, unit=1, pool="group", budget=(0.05, 0.2, 0.8), min_keys=2)
    np.testing.assert_array_equal(np.asarray(carry[2].keep), np.asarray(want.keep))
    kept = np.asarray(carry[2].keep).sum(-1)[0, :, 0, 0] + 1              # with the query's own key
    assert kept.tolist() == [keys_kept(100, b, 2) for b in (0.05, 0.2, 0.8)]
    assert policy.layer_budget(2) == (0.05, 0.2, 0.8) and policy.layer_budget(1) == (0.2, 0.2, 0.2)
    assert KascadeAttention(dataclasses.replace(sched, budget=0.5)).layer_budget(2) == (0.125, 0.5, 1.0)  # clipped
    with pytest.raises(ValueError, match="fractional budget"):
        KascadeAttention(sched, budget=16)


# ------------------------------------------------------------------------------------------------ selection
@pytest.mark.slow
@settings(max_examples=12, phases=NO_SHRINK)
@given(q_len=st.integers(1, 20), past=st.integers(0, 12), spare=st.integers(0, 6), q_tile=st.sampled_from([2, 4]),
       granularity=st.sampled_from(["position", "tile"]), pool=st.sampled_from(["group", "all", "head"]),
       budget=st.sampled_from([0.1, 0.3, 0.6]), min_keys=st.integers(0, 6), rolling=st.booleans(),
       seed=st.integers(0, 99))
def test_selection_is_the_brute_force_topk(q_len, past, spare, q_tile, granularity, pool, budget, min_keys, rolling,
                                           seed) -> None:
    q, k, _ = qkv(np.random.default_rng(seed), q_len, past + q_len + spare)
    tq = 1 if q_len == 1 else q_tile
    unit = q_tile if granularity == "tile" else 1
    kw = dict(q_tile=tq, unit=unit, budget=budget, min_keys=min_keys, rolling=rolling)
    sel = select(q, k, past, past + q_len, pool=pool, **kw)
    scores = unit_scores(q, k, past, past + q_len, q_tile=tq, unit=unit, pool=pool)
    want = brute_topk(np.asarray(scores), q_len, past, past + q_len, **kw)
    np.testing.assert_array_equal(chosen_units(sel, scores.shape[-1]), want)


def assert_same_choice(got: np.ndarray, want: np.ndarray, scores: np.ndarray, forced: np.ndarray) -> None:
    """Per row (``[batch, kv_heads, sets, n_qtiles, n_units]`` bool), ``got`` chose as many forced units and as many
    others as ``want``, with the same oracle scores in order (float32 rounding apart): the same set up to ties. The
    fast path ranks forced units by ``score + FORCED`` in float32, whose spacing (1/16 at 1e6) makes scores closer
    than that tie; that matters only when the forced units outnumber the budget."""
    for row in np.ndindex(*got.shape[:4]):
        for part, atol in ((forced[row[3]], float(np.spacing(np.float32(FORCED)))), (~forced[row[3]], 1e-6)):
            a, b = (np.sort(scores[row][c[row] & part]) for c in (got, want))
            assert a.shape == b.shape, (row, np.flatnonzero(got[row]), np.flatnonzero(want[row]))
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol, err_msg=str(row))


@pytest.mark.slow
@settings(max_examples=24, phases=NO_SHRINK)
@given(q_len=st.integers(1, 40), past=st.integers(0, 12), spare=st.integers(0, 6), q_tile=st.sampled_from([2, 4]),
       granularity=st.sampled_from(["position", "tile"]), pool=st.sampled_from(["group", "all", "head"]),
       budget=st.sampled_from([0.1, 0.3, 0.6]), min_keys=st.integers(0, 6), rolling=st.booleans(),
       sinks=st.sampled_from([0, 2]), recent=st.sampled_from([0, 5]), block_q=st.integers(1, 12),
       block_k=st.integers(1, 16), seed=st.integers(0, 99))
def test_blocked_selection_is_the_brute_force_topk(q_len, past, spare, q_tile, granularity, pool, budget, min_keys,
                                                   rolling, sinks, recent, block_q, block_k, seed) -> None:
    """Small ``block_q`` / ``block_k``: several query blocks and key blocks (often a partial last one), so the one-pass
    key-tile path and the two-pass position path of `select` run as they do at 2k-8k with the default blocks; with
    and without sinks / recent units."""
    q, k, _ = qkv(np.random.default_rng(seed), q_len, past + q_len + spare)
    tq = 1 if q_len == 1 else q_tile
    unit = q_tile if granularity == "tile" else 1
    kw = dict(q_tile=tq, unit=unit, budget=budget, min_keys=min_keys, rolling=rolling, sinks=sinks, recent=recent)
    sel = select(q, k, past, past + q_len, pool=pool, block_q=block_q, block_k=block_k, **kw)
    scores = np.asarray(unit_scores(q, k, past, past + q_len, q_tile=tq, unit=unit, pool=pool))
    want = brute_topk(scores, q_len, past, past + q_len, **kw)
    forced = np.stack([forced_units(scores.shape[-1], start, unit, sinks, recent)
                       for start in range(past, past + q_len, tq)])             # [n_qtiles, n_units]
    assert_same_choice(chosen_units(sel, scores.shape[-1]), want, scores, forced)


# ------------------------------------------------------------------------------------------------ attend
def random_selection(rng, batch: int, sets: int, n_t: int, n_units: int, k: int, q_tile: int, unit: int) -> Selection:
    """Distinct random units per row, a random share of them kept."""
    idx = np.stack([rng.choice(n_units, k, replace=False) for _ in range(batch * KV_HEADS * sets * n_t)])
    idx = idx.reshape(batch, KV_HEADS, sets, n_t, k)
    keep = rng.random(idx.shape) < 0.7
    return Selection(idx=jnp.asarray(idx, jnp.int32), keep=jnp.asarray(keep), q_tile=q_tile, unit=unit)


@pytest.mark.slow
@settings(max_examples=12, phases=NO_SHRINK)
@given(q_len=st.integers(1, 20), past=st.integers(0, 12), spare=st.integers(0, 6), q_tile=st.sampled_from([2, 4]),
       unit=st.sampled_from([1, 4]), sets=st.sampled_from([1, GROUP]), frac=st.floats(0.1, 1.0),
       head_map=st.permutations(range(KV_HEADS)), seed=st.integers(0, 99))
def test_gather_path_equals_masked_oracle(q_len, past, spare, q_tile, unit, sets, frac, head_map, seed) -> None:
    """Any selection (random, sparse, remapped): gathering it equals masked attention with its mask."""
    rng = np.random.default_rng(seed)
    kv_len, kv_total = past + q_len, past + q_len + spare
    q, k, v = qkv(rng, q_len, kv_total)
    tq = 1 if q_len == 1 else q_tile
    n_units = -(-kv_total // unit)
    sel = random_selection(rng, 2, sets, -(-q_len // tq), n_units, max(1, int(frac * n_units)), tq, unit)
    sel = sel.remap(list(head_map))
    out = jax.jit(attend)(q, k, v, sel, jnp.int32(past), jnp.int32(kv_len))
    mask = selection_mask(chosen_units(sel, n_units), q_len, kv_total, q_tile=tq, unit=unit, q_offset=past,
                          kv_len=kv_len)
    np.testing.assert_allclose(np.asarray(out), np.asarray(masked_attention(q, k, v, mask)), atol=1e-5)


@pytest.mark.slow
@settings(max_examples=8, phases=NO_SHRINK)
@given(q_len=st.integers(1, 20), past=st.integers(0, 12), spare=st.integers(0, 6),
       granularity=st.sampled_from(["position", "tile"]), pool=st.sampled_from(["group", "all", "head"]),
       budget=st.sampled_from([0.2, 0.5]), rolling=st.booleans(), remap=st.booleans(), seed=st.integers(0, 99))
def test_policy_equals_masked_policy(q_len, past, spare, granularity, pool, budget, rolling, remap, seed) -> None:
    """Every layer of `KascadeAttention` (dense, reuse, anchor, reuse through a head map) equals `MaskedKascade`."""
    rng = np.random.default_rng(seed)
    q, k, v = qkv(rng, q_len, past + q_len + spare)
    hm = [[0, 1, 2], [1, 2, 0], [0, 1, 2], [2, 2, 0]]
    sched = schedule(head_map=hm, tile_size=4, budget=budget, min_keys=2)
    opts = dict(granularity=granularity, pool=pool, rolling=rolling, remap=remap)
    fast, _ = run_layers(KascadeAttention(sched, **opts), q, k, v, past, past + q_len, 4)
    slow, _ = run_layers(MaskedKascade(sched, **opts), q, k, v, past, past + q_len, 4)
    for layer, (a, b) in enumerate(zip(fast, slow)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, err_msg=f"layer {layer}")


@pytest.mark.slow
@settings(max_examples=6, phases=NO_SHRINK)
@given(q_len=st.integers(1, 21), past=st.integers(0, 9), spare=st.integers(0, 5), tile=st.sampled_from([1, 4, 8]),
       granularity=st.sampled_from(["tile", "position"]), pool=st.sampled_from(["group", "all", "head"]),
       rolling=st.booleans())
def test_full_budget_is_dense(q_len, past, spare, tile, granularity, pool, rolling) -> None:
    """budget=1.0 keeps every preceding key: every layer type reproduces dense attention."""
    rng = np.random.default_rng(q_len * 100 + past)
    q, k, v = qkv(rng, q_len, past + q_len + spare)
    policy = KascadeAttention(schedule(head_map=[[0, 1, 2]] * 3 + [[2, 0, 1]], tile_size=tile, budget=1.0,
                                       min_keys=0), granularity=granularity, pool=pool, rolling=rolling)
    outs, _ = run_layers(policy, q, k, v, past, past + q_len, 4)
    dense = gqa_attention(q, k, v, q_offset=past, kv_len=past + q_len)
    for out in outs:
        np.testing.assert_allclose(np.asarray(out), np.asarray(dense), atol=1e-5)


def test_anchor_attends_its_own_topk_and_layer_zero_is_dense(rng) -> None:
    q, k, v = qkv(rng, 16, 16)
    policy = KascadeAttention(schedule(tile_size=4, budget=0.25, min_keys=2))
    outs, carry = run_layers(policy, q, k, v, 0, 16, 3)
    assert sorted(carry) == [0, 2] and carry[0].idx.shape[3] == 4    # layer 0 selects too
    np.testing.assert_allclose(outs[0], gqa_attention(q, k, v), atol=1e-5)
    assert not np.allclose(outs[2], gqa_attention(q, k, v), atol=1e-3)  # the budget really cut keys
    dense_anchor, _ = run_layers(dataclasses.replace(policy, anchor_dense=True), q, k, v, 0, 16, 3)
    np.testing.assert_allclose(dense_anchor[2], gqa_attention(q, k, v), atol=1e-5)


def test_decode_attends_only_the_budget(rng) -> None:
    """A decode step reads keys_kept(kv_len) keys: its Top-k plus the query's own key."""
    q, k, _ = qkv(rng, 1, 64)
    sel = select(q, k, 49, 50, q_tile=1, unit=1, pool="group", budget=0.2, min_keys=4)
    assert sel.idx.shape == (2, KV_HEADS, 1, 1, keys_kept(64, 0.2, 4) - 1)
    assert int(np.asarray(sel.keep).sum(-1).max()) + 1 == keys_kept(50, 0.2, 4)


def test_bad_input_raises(rng) -> None:
    with pytest.raises(ValueError, match="granularity"):
        KascadeAttention(schedule(), granularity="block")
    with pytest.raises(ValueError, match="pool"):
        KascadeAttention(schedule(), pool="some")
    with pytest.raises(ValueError, match="budget"):
        KascadeAttention(schedule(), budget=2.0)
    q, k, v = qkv(rng, 4, 4)
    with pytest.raises(ValueError, match="cannot run layer 3"):
        KascadeAttention(schedule(num_layers=2))(3, q, k, v, q_offset=jnp.int32(0), kv_len=jnp.int32(4), carry=None)
    sel = random_selection(rng, 2, 1, 1, 4, 2, 4, 1)
    with pytest.raises(ValueError, match="n_qtiles"):
        attend(qkv(rng, 8, 8)[0], k, v, sel, 0, 4)
    with pytest.raises(ValueError, match="gather_positions"):
        K.gather_positions(k, jnp.zeros((2, 2, 1), jnp.int32))


# ------------------------------------------------------------------------------------------------ inside the model
def tiny_model() -> Llama:
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=KV_HEADS * GROUP,
                      num_kv_heads=KV_HEADS, head_dim=D, max_position_embeddings=128)
    return Llama(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("granularity", ["position", "tile"])
def test_model_forward_equals_masked_policy_in_prefill_and_decode(granularity) -> None:
    model = tiny_model()
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 40)), jnp.int32)
    sched = schedule(head_map=[[0, 1, 2], [1, 2, 0], [0, 1, 2], [2, 2, 0]], tile_size=8, budget=0.2, min_keys=4)
    fast, slow = KascadeAttention(sched, granularity=granularity), MaskedKascade(sched, granularity=granularity)
    caches = [KVCache.empty(model.cfg, 2, 48) for _ in range(2)]
    outs = []
    for policy, cache in zip((fast, slow), caches):
        logits, cache, _ = forward(model, tokens[:, :37], cache, policy)     # prefill: 37 tokens, a partial tile
        steps = [logits]
        for t in range(37, 40):                                               # three decode steps
            logits, cache, _ = forward(model, tokens[:, t:t + 1], cache, policy)
            steps.append(logits)
        outs.append(steps)
    for a, b in zip(*outs):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
    dense, _, _ = forward(model, tokens[:, :37])
    assert not np.allclose(outs[0][0], dense, atol=1e-4)                      # it is sparse


def test_full_budget_generate_is_dense() -> None:
    model = tiny_model()
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, (1, 12)), jnp.int32)
    full = KascadeAttention(schedule(tile_size=8, budget=1.0, min_keys=0), granularity="tile")
    np.testing.assert_array_equal(generate(model, tokens, 5, attention=full), generate(model, tokens, 5))


def test_keys_read_follows_the_budget_rule() -> None:
    """What a sparse layer reads: in decode its own key plus `topk_count` units, in prefill `keys_kept` per query
    tile; key tiles round up to whole tiles; never more than the context."""
    from kascade_lite.kascade import keys_read, topk_count

    assert keys_read(32768, phase="decode", granularity="position", tile=32, budget=0.1, min_keys=0) == 3277
    assert keys_read(32768, phase="decode", granularity="tile", tile=32, budget=0.1, min_keys=0) == \
        1 + 32 * topk_count(32768, 1, budget=0.1, min_keys=0, unit=32)
    assert keys_read(1000, phase="prefill", granularity="position", tile=32, budget=0.1, min_keys=0) == 100
    assert keys_read(1000, phase="prefill", granularity="tile", tile=32, budget=0.1, min_keys=0) == 128
    assert keys_read(100, phase="decode", granularity="tile", tile=32, budget=0.1, min_keys=128) == 100
