"""Sparse kernels equal masked dense attention on the same selected set; with every tile selected they equal dense."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kascade_lite import kernels as K
from kascade_lite.attention import causal_mask, gqa_attention

ATOL = 1e-5
B, HQ, HKV, D, TILE = 2, 4, 2, 16, 8


def _qkv(rng: np.random.Generator, t: int, length: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    q = jnp.asarray(rng.standard_normal((B, t, HQ, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, length, HKV, D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, length, HKV, D)), jnp.float32)
    return q, k, v


def _random_tiles(rng: np.random.Generator, shape: tuple[int, ...], num_tiles: int, keep: int) -> jax.Array:
    """Distinct random tile indices ``shape + (keep,)``."""
    flat = [rng.choice(num_tiles, keep, replace=False) for _ in range(int(np.prod(shape)))]
    return jnp.asarray(np.array(flat).reshape(*shape, keep), jnp.int32)


# ------------------------------------------------------------------------------------------------ decode
@pytest.mark.parametrize("layout", ["heads", "seq"])
@pytest.mark.parametrize("kv_len", [64, 61])  # full cache, and a partially filled last tile
def test_sparse_decode_equals_masked_dense(rng, layout, kv_len):
    q, k, v = _qkv(rng, 1, 64)
    idx = _random_tiles(rng, (B, HKV), 7, 3).at[:, :, 0].set(7)  # always include the (partial) last tile
    cache_k, cache_v = (K.to_tiles(k, TILE), K.to_tiles(v, TILE)) if layout == "heads" else (k, v)
    out = K.sparse_decode_attention(q[:, 0], cache_k, cache_v, idx, kv_len, tile=TILE, layout=layout)
    allowed = K.tile_mask(idx, 8, TILE)[:, :, None, None, :] & (jnp.arange(64) < kv_len)
    ref = K.masked_dense_attention(q, k, v, allowed)[:, 0]
    np.testing.assert_allclose(out, ref, atol=ATOL)


@pytest.mark.parametrize("layout", ["heads", "seq"])
def test_anchor_decode_all_tiles_equals_dense(rng, layout):
    q, k, v = _qkv(rng, 1, 64)
    kv_len = 50
    cache_k, cache_v = (K.to_tiles(k, TILE), K.to_tiles(v, TILE)) if layout == "heads" else (k, v)
    out, idx = K.anchor_decode_attention(q[:, 0], cache_k, cache_v, kv_len, keep=8, tile=TILE, layout=layout)
    ref = gqa_attention(q, k, v, causal=True, q_offset=kv_len - 1, kv_len=kv_len)[:, 0]
    np.testing.assert_allclose(out, ref, atol=ATOL)
    dense = K.dense_decode_attention(q[:, 0], cache_k, cache_v, kv_len, tile=TILE, layout=layout)
    np.testing.assert_allclose(dense, ref, atol=ATOL)
    assert sorted(np.asarray(idx[0, 0]).tolist()) == list(range(8))


def test_anchor_decode_picks_the_heaviest_tiles(rng):
    q, k, v = _qkv(rng, 1, 64)
    scores = K.decode_tile_scores(q[:, 0], k, 64, tile=TILE, layout="seq")
    probs = jax.nn.softmax(jnp.einsum("bhd,bkhd->bhk", q[:, 0], jnp.repeat(k, 2, axis=2)) * D ** -0.5, axis=-1)
    manual = probs.reshape(B, HKV, 2, 8, TILE).sum(axis=(2, 4))  # pooled over group and tile
    np.testing.assert_allclose(scores, manual, atol=ATOL)
    _, idx = K.anchor_decode_attention(q[:, 0], k, v, 64, keep=2, tile=TILE, layout="seq")
    best_past = int(np.argmax(np.asarray(manual[1, 0, :7])))
    assert set(np.asarray(idx[1, 0]).tolist()) == {7, best_past}  # the newest key's tile is always kept


def test_scores_past_kv_len_are_never_selected(rng):
    q, k, _ = _qkv(rng, 1, 64)
    scores = K.decode_tile_scores(q[:, 0], K.to_tiles(k, TILE), 20, tile=TILE)
    assert np.all(np.isneginf(np.asarray(scores[..., 3:])))


def test_reuse_indices_follow_the_head_map():
    anchor = jnp.arange(2 * 3 * 4).reshape(2, 3, 4)
    out = K.reuse_tile_indices(anchor, (2, 0, 0))
    np.testing.assert_array_equal(out[:, 0], anchor[:, 2])
    np.testing.assert_array_equal(out[:, 2], anchor[:, 0])


# ------------------------------------------------------------------------------------------------ prefill
@pytest.mark.parametrize("t", [64, 60])
def test_sparse_prefill_equals_masked_dense(rng, t):
    q, k, v = _qkv(rng, t, t)
    n = 8
    idx = np.array(_random_tiles(rng, (B, HKV, n), n, 3))
    idx[:, :, :, 0] = np.arange(n)  # the diagonal tile ...
    idx[:, :, :, 1] = (np.arange(n) + 3) % n  # ... and one more tile (possibly in the future: masked by causality)
    idx[:, :, :, 2] = (np.arange(n) + 5) % n
    idx = jnp.asarray(idx)
    out = K.sparse_prefill_attention(q, k, v, idx, tile=TILE, chunk=3)
    picked = jax.vmap(jax.vmap(jax.vmap(lambda i: K.tile_mask(i, n, TILE))))(idx)  # [b, h, q_tiles, L]
    allowed = jnp.repeat(picked, TILE, axis=2)[:, :, None, :t, :t] & causal_mask(t, t)
    np.testing.assert_allclose(out, K.masked_dense_attention(q, k, v, allowed), atol=ATOL)


def test_anchor_prefill_all_tiles_equals_dense(rng):
    q, k, v = _qkv(rng, 60, 60)
    out, idx = K.anchor_prefill_attention(q, k, v, keep=8, tile=TILE, chunk=3, score_chunk=2, bands=3)
    np.testing.assert_allclose(out, gqa_attention(q, k, v), atol=ATOL)
    assert idx.shape == (B, HKV, 8, 8)


def test_prefill_selection_keeps_diagonal_and_heaviest_past_tiles(rng):
    q, k, _ = _qkv(rng, 64, 64)
    idx = np.asarray(K.prefill_tile_scores_topk(q, k, keep=2, tile=TILE, chunk=2, bands=2))
    s = jnp.einsum("bqhgd,bkhd->bhgqk", q.reshape(B, 64, HKV, 2, D), k) * D ** -0.5
    p = jax.nn.softmax(jnp.where(causal_mask(64, 64), s, -1e30), axis=-1)
    pooled = np.asarray(p.reshape(B, HKV, 2, 8, TILE, 8, TILE).sum(axis=(2, 4, 6)))  # [b, h, q_tile, key_tile]
    for i in range(1, 8):
        assert i in idx[0, 1, i]
        best_past = int(np.argmax(pooled[0, 1, i, :i]))
        assert set(idx[0, 1, i]) == {i, best_past}


# ------------------------------------------------------------------------------------------------ dense baselines
@pytest.mark.parametrize("t,length,offset", [(64, 64, 0), (60, 60, 0), (1, 64, 50), (5, 64, 40)])
def test_flash_equals_dot_product_attention(rng, t, length, offset):
    q, k, v = _qkv(rng, t, length)
    kv_len = offset + t
    out = K.flash_attention(q, k, v, q_offset=offset, kv_len=kv_len, block_q=16, block_k=16)
    ref = K.xla_attention(q, k, v, q_offset=offset, kv_len=kv_len)
    np.testing.assert_allclose(out, ref, atol=ATOL)
    np.testing.assert_allclose(ref, gqa_attention(q, k, v, q_offset=offset, kv_len=kv_len), atol=ATOL)


def test_kernels_jit(rng):
    q, k, v = _qkv(rng, 1, 64)
    f = jax.jit(K.anchor_decode_attention, static_argnames=("keep", "tile", "layout"))
    out, _ = f(q[:, 0], k, v, jnp.int32(64), keep=8, tile=TILE, layout="seq")
    np.testing.assert_allclose(out, gqa_attention(q, k, v, q_offset=63)[:, 0], atol=ATOL)


# ------------------------------------------------------------------------------------------------ bad input
def test_out_of_range_indices_rejected(rng):
    _, k, v = _qkv(rng, 1, 64)
    q = jnp.zeros((B, HQ, D))
    bad = jnp.full((B, HKV, 2), 8, jnp.int32)
    with pytest.raises(ValueError, match="outside"):
        K.sparse_decode_attention(q, K.to_tiles(k, TILE), K.to_tiles(v, TILE), bad, 64, tile=TILE)
    with pytest.raises(ValueError, match="outside"):
        K.sparse_decode_attention(q, k, v, -bad, 64, tile=TILE, layout="seq")
    with pytest.raises(ValueError, match="outside"):
        K.sparse_prefill_attention(*_qkv(rng, 64, 64), jnp.full((B, HKV, 8, 2), 9), tile=TILE)


def test_bad_shapes_rejected(rng):
    _, k, v = _qkv(rng, 1, 60)
    with pytest.raises(ValueError, match="multiple of tile"):
        K.to_tiles(k, TILE)
    with pytest.raises(ValueError, match="layout"):
        K.sparse_decode_attention(jnp.zeros((B, HQ, D)), k, v, jnp.zeros((B, HKV, 1), jnp.int32), 60, tile=4,
                                  layout="rows")
    with pytest.raises(ValueError, match="keep"):
        K.anchor_decode_attention(jnp.zeros((B, HQ, D)), k, v, 60, keep=99, tile=4, layout="seq")


def test_num_keep_tiles():
    assert K.num_keep_tiles(32768, 32, 0.1) == 103
    assert K.num_keep_tiles(512, 16, 0.25) == 8
    assert K.num_keep_tiles(100, 32, 0.1, min_keys=128) == 4  # capped at the 4 tiles there are
    with pytest.raises(ValueError):
        K.num_keep_tiles(100, 0, 0.1)
