"""The chapters' diagnostics on a tiny random Llama: attention maps are the dense model's probabilities, and
`reuse_survival` keeps all the mass at full budget, never more than a layer's own Top-k, and measures the needle's
mass from those same maps."""

from __future__ import annotations

import numpy as np
import pytest

from kascade_lite.analysis import POOLINGS, attention_maps, coverage_at_context, pooling_coverage, reuse_survival
from kascade_lite.calibrate import query_coverage
from kascade_lite.config import LlamaConfig
from kascade_lite.model import Llama
from kascade_lite.schedule import Schedule

CFG = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                  head_dim=8)
SEQ = 64
TOKENS = np.random.default_rng(1).integers(0, CFG.vocab_size, SEQ)  # one sequence: [SEQ] token ids


@pytest.fixture(scope="module")
def model() -> Llama:
    return Llama(CFG)


def test_attention_maps_are_the_dense_probabilities(model: Llama) -> None:
    maps = attention_maps(model, TOKENS, (2, 0))
    assert maps.shape == (2, CFG.num_kv_heads, CFG.group_size, SEQ, SEQ)
    np.testing.assert_allclose(maps.sum(-1), 1.0, rtol=1e-5)
    assert np.all(np.triu(maps[0, 0, 0], k=1) == 0)                          # causal
    assert not np.allclose(maps[0], maps[1])                                  # layer 2 first, as asked


def test_reuse_survival(model: Llama) -> None:
    L, H = model.cfg.num_layers, model.cfg.num_kv_heads
    prompt, span = TOKENS[:40], (10, 14)
    sched = Schedule.from_anchors("t", L, H, [2], head_map=[list(range(H))] * (L - 1) + [list(range(H))[::-1]])
    full = reuse_survival(model, prompt, {"s": sched}, span, budget=1.0, min_keys=0)
    np.testing.assert_allclose(full["survival"]["s"], 1.0, atol=1e-6)  # every key kept: nothing lost
    np.testing.assert_allclose(full["own"], 1.0, atol=1e-6)
    part = reuse_survival(model, prompt, {"s": sched}, span, budget=4, min_keys=0)  # 3 keys + the query itself
    kept = part["survival"]["s"]
    assert (kept <= part["own"] + 1e-9).all() and (part["own"] < 1).all()
    for layer, kind in enumerate(sched.layer_types):  # an anchor (and layer 0) reads its own Top-k
        if kind != "reuse":
            np.testing.assert_allclose(kept[layer], part["own"][layer])
    probs = attention_maps(model, prompt, tuple(range(L)))[:, :, :, -1]                 # [L, H, G, length]
    np.testing.assert_allclose(part["needle"], probs[..., 10:14].sum(-1).mean(-1), atol=1e-5)


def test_pooling_coverage_at_equal_keys(model: Llama) -> None:
    p = attention_maps(model, TOKENS, (1,))[0]                                # [kv_heads, group, SEQ, SEQ]
    cov, keys = pooling_coverage(p, tile_size=8, k_prev=5)
    assert set(cov) == set(POOLINGS) and all(c.shape == (CFG.num_kv_heads,) for c in cov.values())
    start = np.arange(SEQ) // 8 * 8
    np.testing.assert_array_equal(keys, np.arange(SEQ) - start + 1 + np.minimum(5, start))
    oracle = cov[POOLINGS[0]]
    for name in POOLINGS[1:]:                                                 # a row's own Top-k is the best set
        assert np.all(cov[name] <= oracle + 1e-12) and np.all(cov[name] > 0)
    everything, _ = pooling_coverage(p, tile_size=8, k_prev=SEQ)            # every earlier key: all the mass
    for c in everything.values():
        np.testing.assert_allclose(c, 1.0, rtol=1e-5)
    single, _ = pooling_coverage(p[:, :1], tile_size=1, k_prev=5)           # nothing to pool: all the same
    for c in single.values():
        np.testing.assert_allclose(c, single[POOLINGS[0]])
    with pytest.raises(ValueError, match="multiple of tile_size"):
        pooling_coverage(p, tile_size=7, k_prev=5)


def test_coverage_at_context_is_the_last_rows_coverage(model: Llama) -> None:
    fractions, n = (0.05, 0.25), 16
    got = coverage_at_context(model, TOKENS[None], n_queries=n, fractions=fractions)
    maps = attention_maps(model, TOKENS, tuple(range(CFG.num_layers)))      # [L, H, G, SEQ, SEQ]
    want = np.stack([np.asarray(query_coverage(m[None, :, :, SEQ - n:], fractions, q_offset=SEQ - n)) for m in maps])
    assert got.shape == (CFG.num_layers, CFG.num_kv_heads, len(fractions))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    full = np.stack([np.asarray(query_coverage(m[None], fractions, stride=SEQ)) for m in maps])  # the last row only
    last = coverage_at_context(model, TOKENS[None], n_queries=1, fractions=fractions)
    np.testing.assert_allclose(last, full, rtol=1e-5)


def test_mass_curves_rank_the_pooled_decode_attention() -> None:
    """`mass_curves` against attention computed here: the last token's probabilities from `attention_maps` (one
    dense forward), pooled over each group, sorted; `keys_for_mass` is the first crossing."""
    from kascade_lite.analysis import attention_maps, keys_for_mass, mass_curves
    from kascade_lite.models import smollm2_or_tiny

    model = smollm2_or_tiny(True, num_layers=4)
    tokens = np.random.default_rng(3).integers(0, model.cfg.vocab_size, 40)
    curves = mass_curves(model, tokens, (2, 1))
    maps = attention_maps(model, tokens, (2, 1))                            # [layers, kv, group, seq, seq]
    pooled = maps[:, :, :, -1, :].sum(axis=2)
    want = np.cumsum(-np.sort(-pooled, axis=-1), axis=-1)
    np.testing.assert_allclose(curves, want / want[..., -1:], atol=1e-5)
    need = keys_for_mass(curves, 0.9)
    for idx in np.ndindex(*need.shape):
        assert curves[idx][need[idx] - 1] >= 0.9 - 1e-9 and (need[idx] == 1 or curves[idx][need[idx] - 2] < 0.9)
