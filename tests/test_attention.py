"""Grouped-query attention: equal to repeated-KV attention and to `jax.nn.dot_product_attention`, for prefill and
for a decode step against a partially filled cache; clear errors; KV-cache arithmetic."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kascade_lite.attention import (attention_probs, causal_mask, gqa_attention, gqa_attention_with_new,
                                    grouped_scores, kv_cache_bytes, repeat_kv)

KV_HEADS, HEAD_DIM = 2, 16


def qkv(rng: np.random.Generator, group: int, q_len: int, kv_len: int, batch: int = 2):
    """Random ``q [batch, q_len, kv_heads*group, d]``, head-major ``k, v [batch, kv_heads, kv_len, d]`` (float32)."""
    q = rng.standard_normal((batch, q_len, KV_HEADS * group, HEAD_DIM)).astype(np.float32)
    k = rng.standard_normal((batch, KV_HEADS, kv_len, HEAD_DIM)).astype(np.float32)
    v = rng.standard_normal((batch, KV_HEADS, kv_len, HEAD_DIM)).astype(np.float32)
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


def seq_major(x: jax.Array) -> jax.Array:
    """Head-major ``[b, kv_heads, L, d]`` -> ``[b, L, kv_heads, d]`` (the layout `jax.nn.dot_product_attention`
    takes)."""
    return x.transpose(0, 2, 1, 3)


def expanded_attention(q, k, v, mask: jax.Array | None) -> jax.Array:
    """The textbook version: repeat every KV head ``group`` times, then plain multi-head attention."""
    group = q.shape[2] // k.shape[1]
    k, v = repeat_kv(k, group), repeat_kv(v, group)
    s = jnp.einsum("bqhd,bhkd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        s = jnp.where(mask, s, -jnp.inf)
    return jnp.einsum("bhqk,bhkd->bqhd", jax.nn.softmax(s, axis=-1), v)


@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("causal", [True, False])
def test_prefill_matches_expanded_and_jax(group: int, causal: bool, rng: np.random.Generator) -> None:
    q, k, v = qkv(rng, group, q_len=13, kv_len=13)
    ours = gqa_attention(q, k, v, causal=causal)
    mask = causal_mask(13, 13) if causal else None
    np.testing.assert_allclose(ours, expanded_attention(q, k, v, mask), atol=1e-5)
    np.testing.assert_allclose(ours, jax.nn.dot_product_attention(q, seq_major(k), seq_major(v), is_causal=causal),
                               atol=1e-5)


@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_decode_step_against_partial_cache(group: int, rng: np.random.Generator) -> None:
    """Cache of 32 slots holding 20 valid tokens; 3 new queries at positions 17, 18, 19 (their keys are cached)."""
    q, k, v = qkv(rng, group, q_len=3, kv_len=32)
    q_offset, kv_len = 17, 20
    ours = gqa_attention(q, k, v, q_offset=q_offset, kv_len=kv_len)
    # reference 1: drop the unused slots and attend causally with the queries at the end of the prefix
    ref = expanded_attention(q, k[:, :, :kv_len], v[:, :, :kv_len], causal_mask(3, kv_len, q_offset))
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    # reference 2: jax's own attention ([batch, seq, heads, d] layout) with an explicit boolean mask [b, heads, q, k]
    mask = jnp.broadcast_to(causal_mask(3, 32, q_offset, kv_len), (2, q.shape[2], 3, 32))
    np.testing.assert_allclose(ours, jax.nn.dot_product_attention(q, seq_major(k), seq_major(v), mask=mask),
                               atol=1e-5)


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("q_len", [1, 3])
def test_new_keys_beside_the_cache_equal_the_written_cache(group: int, q_len: int, rng: np.random.Generator) -> None:
    """`gqa_attention_with_new` reads the cache before the step (stale values in the new slots) and the step's own
    keys separately: the textbook attention over the cache with those keys written, with every slot from
    ``q_offset`` on poisoned in the cache it reads."""
    q, k, v = qkv(rng, group, q_len=q_len, kv_len=32)
    q_offset = 20
    k_new, v_new = k[:, :, q_offset:q_offset + q_len], v[:, :, q_offset:q_offset + q_len]
    stale_k, stale_v = k.at[:, :, q_offset:].set(1e4), v.at[:, :, q_offset:].set(-1e4)
    ours = gqa_attention_with_new(q, stale_k, stale_v, k_new, v_new, q_offset=q_offset)
    kv_len = q_offset + q_len
    ref = expanded_attention(q, k[:, :, :kv_len], v[:, :, :kv_len], causal_mask(q_len, kv_len, q_offset))
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_garbage_in_unused_cache_slots_is_ignored(rng: np.random.Generator) -> None:
    q, k, v = qkv(rng, 4, q_len=1, kv_len=16)
    poisoned_k, poisoned_v = k.at[:, :, 9:].set(1e4), v.at[:, :, 9:].set(-1e4)
    np.testing.assert_array_equal(gqa_attention(q, k, v, q_offset=8, kv_len=9),
                                  gqa_attention(q, poisoned_k, poisoned_v, q_offset=8, kv_len=9))


def test_decode_is_jittable_with_traced_offsets(rng: np.random.Generator) -> None:
    q, k, v = qkv(rng, 2, q_len=1, kv_len=8)
    step = jax.jit(lambda q, k, v, off, n: gqa_attention(q, k, v, q_offset=off, kv_len=n))
    np.testing.assert_allclose(step(q, k, v, 4, 5), gqa_attention(q, k, v, q_offset=4, kv_len=5), atol=1e-6)


def test_probs_shape_rows_and_causality(rng: np.random.Generator) -> None:
    q, k, _ = qkv(rng, 4, q_len=5, kv_len=5)
    p = attention_probs(q, k)
    assert p.shape == (2, KV_HEADS, 4, 5, 5) and p.dtype == jnp.float32
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-6)
    assert float(jnp.abs(jnp.triu(p, k=1)).max()) == 0.0
    assert grouped_scores(q, k).shape == (2, KV_HEADS, 4, 5, 5)


def test_causal_mask_layout() -> None:
    np.testing.assert_array_equal(causal_mask(2, 4, q_offset=1), [[1, 1, 0, 0], [1, 1, 1, 0]])
    np.testing.assert_array_equal(causal_mask(1, 4, q_offset=3, kv_len=2), [[1, 1, 0, 0]])


def test_bfloat16_inputs_keep_dtype(rng: np.random.Generator) -> None:
    q, k, v = (x.astype(jnp.bfloat16) for x in qkv(rng, 2, q_len=4, kv_len=4))
    out = gqa_attention(q, k, v)
    assert out.dtype == jnp.bfloat16
    ref = gqa_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
    np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=5e-2)


def test_wrong_rank_names_the_shapes() -> None:
    with pytest.raises(ValueError, match=r"rank-4.*q\(2, 3, 16\)"):
        gqa_attention(jnp.zeros((2, 3, 16)), jnp.zeros((2, 1, 3, 16)), jnp.zeros((2, 1, 3, 16)))


def test_heads_not_dividing_names_the_shapes() -> None:
    with pytest.raises(ValueError, match=r"q heads 6 not divisible by kv heads 4 .*q\(1, 3, 6, 8\)"):
        gqa_attention(jnp.zeros((1, 3, 6, 8)), jnp.zeros((1, 4, 3, 8)), jnp.zeros((1, 4, 3, 8)))


def test_mismatched_kv_or_head_dim() -> None:
    with pytest.raises(ValueError, match="same shape"):
        gqa_attention(jnp.zeros((1, 3, 2, 8)), jnp.zeros((1, 1, 3, 8)), jnp.zeros((1, 1, 4, 8)))
    with pytest.raises(ValueError, match="head_dim mismatch"):
        gqa_attention(jnp.zeros((1, 3, 2, 8)), jnp.zeros((1, 1, 3, 4)), jnp.zeros((1, 1, 3, 4)))


def test_kv_cache_bytes_llama_3_1_8b() -> None:
    # 2 (K and V) * 32 layers * 8 heads * 128 dims * 2 bytes = 128 KiB per token
    assert kv_cache_bytes(32, 8, 128, tokens=1) == 131_072
    assert kv_cache_bytes(32, 8, 128, tokens=131_072) == 16 * 2**30  # 16 GiB at 128k tokens
    assert kv_cache_bytes(32, 32, 128, tokens=8192) == 4 * kv_cache_bytes(32, 8, 128, tokens=8192)
    assert kv_cache_bytes(30, 3, 64, tokens=10, bytes_per_value=4, batch=3) == 2 * 30 * 3 * 10 * 3 * 64 * 4
    assert kv_cache_bytes(32, 8, 128, tokens=0) == 0
    with pytest.raises(ValueError, match="kv_heads=-8"):
        kv_cache_bytes(32, -8, 128, tokens=8)
