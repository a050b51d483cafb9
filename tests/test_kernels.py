"""Generic kernels: the gathers read exactly the rows they are asked for from the head-major cache, dense decode in
either layout and the blocked flash attention equal exact GQA, and bad shapes or indices raise. Kascade's use of
them is tested against its oracles in ``test_kascade.py``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kascade_lite import kernels as K
from kascade_lite.attention import gqa_attention

ATOL = 1e-5
B, HQ, HKV, D, TILE = 2, 4, 2, 16, 8


def _qkv(rng: np.random.Generator, t: int, length: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    q = jnp.asarray(rng.standard_normal((B, t, HQ, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, HKV, length, D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, HKV, length, D)), jnp.float32)
    return q, k, v


# ------------------------------------------------------------------------------------------------ gathers
def test_gathers_read_the_selected_rows(rng):
    _, k, _ = _qkv(rng, 1, 64)
    idx = jnp.asarray(rng.integers(0, 8, (B, HKV, 3)), jnp.int32)
    tiles = K.gather_tiles(k, idx, TILE)                                    # [b, h, 3, tile, d]
    pos = jnp.asarray(rng.integers(0, 64, (B, HKV, 5)), jnp.int32)
    got = K.gather_positions(k, pos)                                        # [b, h, 5, d]
    for b in range(B):
        for h in range(HKV):
            np.testing.assert_array_equal(got[b, h], np.asarray(k)[b, h, np.asarray(pos[b, h])])
            for j, tile in enumerate(np.asarray(idx[b, h])):
                np.testing.assert_array_equal(tiles[b, h, j], np.asarray(k)[b, h, tile * TILE:(tile + 1) * TILE])


# ------------------------------------------------------------------------------------------------ dense
@pytest.mark.parametrize("layout", ["heads", "seq"])
def test_dense_decode_equals_gqa(rng, layout):
    q, k, v = _qkv(rng, 1, 64)
    kv_len = 50
    cache_k, cache_v = (k, v) if layout == "heads" else (k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))
    ref = gqa_attention(q, k, v, causal=True, q_offset=kv_len - 1, kv_len=kv_len)[:, 0]
    dense = K.dense_decode_attention(q[:, 0], cache_k, cache_v, kv_len, layout=layout)
    np.testing.assert_allclose(dense, ref, atol=ATOL)


@pytest.mark.parametrize("t,length,offset", [(64, 64, 0), (60, 60, 0), (1, 64, 50), (5, 64, 40)])
def test_flash_equals_dot_product_attention(rng, t, length, offset):
    q, k, v = _qkv(rng, t, length)
    kv_len = offset + t
    out = K.flash_attention(q, k, v, q_offset=offset, kv_len=kv_len, block_q=16, block_k=16)
    ref = K.xla_attention(q, k, v, q_offset=offset, kv_len=kv_len)
    np.testing.assert_allclose(out, ref, atol=ATOL)
    np.testing.assert_allclose(ref, gqa_attention(q, k, v, q_offset=offset, kv_len=kv_len), atol=ATOL)


# ------------------------------------------------------------------------------------------------ bad input
def test_out_of_range_indices_rejected(rng):
    _, k, _ = _qkv(rng, 1, 64)
    bad = jnp.full((B, HKV, 2), 8, jnp.int32)
    with pytest.raises(ValueError, match="outside"):
        K.gather_tiles(k, bad, TILE)
    with pytest.raises(ValueError, match="outside"):
        K.gather_tiles(k, -bad, TILE)


def test_bad_shapes_rejected(rng):
    _, k, v = _qkv(rng, 1, 60)
    with pytest.raises(ValueError, match="multiple of tile"):
        K.to_tiles(k, TILE)
    with pytest.raises(ValueError, match="layout"):
        K.dense_decode_attention(jnp.zeros((B, HQ, D)), k, v, 60, layout="rows")
    with pytest.raises(ValueError, match="gather_tiles"):
        K.gather_tiles(k, jnp.zeros((B, HKV + 1, 1), jnp.int32), 4)
    with pytest.raises(ValueError, match="gather_positions"):
        K.gather_positions(k, jnp.zeros((B, HKV + 1, 1), jnp.int32))
