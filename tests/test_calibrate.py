"""Calibration statistics on a tiny random Llama: the hook is exact dense attention, pooling and similarity match
plain NumPy loops, shapes and ranges hold (sim in [0, 1], self-similarity 1, coverage monotone), results are
deterministic and survive a save/load round trip."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from kascade_lite.attention import attention_probs
from kascade_lite.calibrate import (Calibration, CalibrationHook, calibrate, cross_layer_similarity, pool_tiles,
                                    query_coverage, topk_keys, topk_mask)
from kascade_lite.config import LlamaConfig
from kascade_lite.model import Llama, forward

CFG = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                  head_dim=8)
SEQ, TILE, BUDGET = 64, 16, 0.5


@pytest.fixture(scope="module")
def model() -> Llama:
    return Llama(CFG)


@pytest.fixture(scope="module")
def sequences() -> np.ndarray:
    return np.random.default_rng(1).integers(0, CFG.vocab_size, (3, SEQ))


@pytest.fixture(scope="module")
def calib(model: Llama, sequences: np.ndarray) -> Calibration:
    return calibrate(model, sequences, tile_size=TILE, budget=BUDGET, model_name="tiny", progress=False)


def test_topk_keys_budget_and_errors() -> None:
    assert topk_keys(512, 32, 0.1) == 52 - 32          # ceil(51.2) keys in all, the tile's own 32 among them
    assert topk_keys(512, 32, 0.1, min_keys=128) == 96
    assert topk_keys(64, 16, 0.1) == 0                 # the own tile already exceeds the budget
    assert topk_keys(64, 16, 1.0) == 48                # never more than the keys before the last tile
    with pytest.raises(ValueError, match="multiple of tile_size"):
        topk_keys(60, 16, 0.1)
    with pytest.raises(ValueError, match="budget"):
        topk_keys(64, 16, 0.0)


def test_pool_tiles_splits_mass_causally(rng: np.random.Generator) -> None:
    q = jnp.asarray(rng.standard_normal((2, SEQ, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 2, SEQ, 8)), jnp.float32)
    p = attention_probs(q, k)
    prev, own = pool_tiles(p, TILE)
    tiles = SEQ // TILE
    assert prev.shape == (2, 2, tiles, SEQ) and own.shape == (2, 2, tiles)
    # every query row sums to 1, so a tile pools group * tile_size units of mass
    np.testing.assert_allclose(prev.sum(-1) + own, 2 * TILE, rtol=1e-5)
    for t in range(tiles):
        assert np.all(np.asarray(prev[:, :, t, t * TILE:]) == 0)   # nothing at or after the tile's own keys
    np.testing.assert_allclose(own[:, :, 0], 2 * TILE, rtol=1e-5)  # the first tile reads only itself


def test_topk_mask_selects_largest(rng: np.random.Generator) -> None:
    x = jnp.asarray(rng.random((3, 5, 40)), jnp.float32)
    mask = np.asarray(topk_mask(x, 7))
    assert set(np.unique(mask)) <= {0.0, 1.0} and np.all(mask.sum(-1) == 7)
    kth = np.sort(np.asarray(x), axis=-1)[..., -7]
    np.testing.assert_array_equal(mask == 1, np.asarray(x) >= kth[..., None])
    assert np.all(np.asarray(topk_mask(x, 0)) == 0)


def test_query_coverage_matches_numpy(rng: np.random.Generator) -> None:
    q = jnp.asarray(rng.standard_normal((1, 24, 4, 8)) * 2, jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 2, 24, 8)) * 2, jnp.float32)
    p = np.asarray(attention_probs(q, k))
    fractions = (0.1, 0.5, 1.0)
    got = np.asarray(query_coverage(jnp.asarray(p), fractions, stride=3))
    want = np.zeros((2, 3))
    rows = range(2, 24, 3)
    for h in range(2):
        for j, f in enumerate(fractions):
            vals = [np.sort(p[0, h, g, i])[::-1][: int(np.ceil(f * (i + 1)))].sum() for g in range(2) for i in rows]
            want[h, j] = np.mean(vals)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def reference_similarity(prev: np.ndarray, own: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The definition, one loop per index: [a, b, h_b, h_a], min over tiles, summed over the batch."""
    L, B, H, T, _ = prev.shape
    sim = np.zeros((L, L, H, H))
    for a in range(L):
        for b in range(a, L):
            for z in range(B):
                for hb in range(H):
                    for ha in range(H):
                        ratios = [(prev[b, z, hb, t] @ mask[a, z, ha, t] + own[b, z, hb, t])
                                  / (prev[b, z, hb, t] @ mask[b, z, hb, t] + own[b, z, hb, t]) for t in range(T)]
                        sim[a, b, hb, ha] += min(ratios)
    return sim


def test_cross_layer_similarity_matches_loops(rng: np.random.Generator) -> None:
    L, B, H, T, N = 3, 2, 2, 4, 16
    prev = rng.random((L, B, H, T, N)).astype(np.float32)
    own = rng.random((L, B, H, T)).astype(np.float32)
    mask = np.asarray(topk_mask(jnp.asarray(prev), 5))
    got = np.asarray(cross_layer_similarity(jnp.asarray(prev), jnp.asarray(own), jnp.asarray(mask)))
    np.testing.assert_allclose(got, reference_similarity(prev, own, mask), rtol=1e-5)


def test_hook_is_exact_dense_attention(model: Llama, sequences: np.ndarray) -> None:
    tokens = jnp.asarray(sequences[:1], jnp.int32)
    hook = CalibrationHook(tile_size=TILE, k_prev=topk_keys(SEQ, TILE, BUDGET))
    hash(hook)
    dense, _, _ = forward(model, tokens)
    hooked, _, carry = forward(model, tokens, None, hook)
    np.testing.assert_allclose(np.asarray(hooked), np.asarray(dense), rtol=1e-5, atol=1e-5)
    assert len(carry) == CFG.num_layers and carry[0]["prev"].shape == (1, 2, SEQ // TILE, SEQ)


def test_calibration_shapes_and_ranges(calib: Calibration) -> None:
    L, H, F = CFG.num_layers, CFG.num_kv_heads, len(calib.coverage_fractions)
    assert calib.similarity.shape == (L, L, H, H) and calib.importance.shape == (L,)
    assert calib.coverage.shape == (L, H, F) and calib.tile_coverage.shape == (L, H)
    sim = calib.similarity
    assert sim.min() >= 0 and sim.max() <= 1 + 1e-5
    for a in range(L):
        np.testing.assert_allclose(np.diagonal(sim[a, a]), 1.0, atol=1e-5)   # a layer's own Top-k: itself
    assert np.all(sim[np.tril_indices(L, k=-1)] == 0)                         # only a <= b is defined
    assert np.all(np.diff(calib.coverage, axis=-1) >= -1e-6)                  # more keys, more mass
    assert np.all((calib.coverage > 0) & (calib.coverage <= 1 + 1e-5))
    assert np.all((calib.tile_coverage > 0) & (calib.tile_coverage <= 1 + 1e-5))
    assert np.all((calib.importance >= 0) & (calib.importance <= 2))
    assert calib.settings["num_sequences"] == 3 and calib.settings["k_prev"] == topk_keys(SEQ, TILE, BUDGET)
    layer_sim = calib.layer_similarity()
    assert layer_sim.shape == (L, L) and np.allclose(np.diag(layer_sim), 1, atol=1e-5)
    assert all(0 <= h < H for h in calib.head_map(0, 2))


def test_calibration_is_deterministic(model: Llama, sequences: np.ndarray, calib: Calibration) -> None:
    again = calibrate(model, sequences, tile_size=TILE, budget=BUDGET, model_name="tiny", progress=False)
    for name in ("similarity", "importance", "coverage", "tile_coverage"):
        np.testing.assert_array_equal(getattr(again, name), getattr(calib, name))


def test_save_load_round_trip(calib: Calibration, tmp_path) -> None:
    tensors, meta = calib.save(tmp_path / "tiny", command="pytest", smoke=True)
    loaded = Calibration.load(tensors)
    for name in ("similarity", "importance", "coverage", "coverage_fractions", "tile_coverage"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(calib, name))
    assert loaded.settings == calib.settings
    doc = json.loads(meta.read_text())
    assert doc["provenance"]["command"] == "pytest" and "coverage_mean" in doc["summary"]
    assert doc["provenance"]["smoke"] is True


def test_invalid_calibration_is_rejected(calib: Calibration, tmp_path) -> None:
    with pytest.raises(ValueError, match="'similarity' has shape"):
        Calibration(similarity=calib.similarity[:, :, :1], importance=calib.importance, coverage=calib.coverage,
                    coverage_fractions=calib.coverage_fractions, tile_coverage=calib.tile_coverage)
    with pytest.raises(ValueError, match="cannot read calibration"):
        Calibration.load(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=r"sequences must be \[num, seq_len\]"):
        calibrate(Llama(CFG), np.zeros((SEQ,), np.int32), progress=False)
