r"""Grouped-query attention (GQA) without expanding the KV heads.

With :math:`H_q` query heads and :math:`H_{kv}` KV heads, query head :math:`h` reads KV head
:math:`\lfloor h / g \rfloor` where :math:`g = H_q / H_{kv}`. Instead of repeating K and V :math:`g` times
(a :math:`g\times` larger cache), we reshape the queries to ``[batch, seq, kv_heads, group, head_dim]`` and let one
einsum broadcast each KV head over its group:

.. math:: s_{b,h,j,q,k} = \frac{\langle Q_{b,q,h,j}, K_{b,h,k}\rangle}{\sqrt{d}}.

**Layouts.** Queries come straight from the projection, ``[batch, q_len, q_heads, head_dim]``. Keys and values are
the KV cache, stored **head-major** ``[batch, kv_heads, kv_len, head_dim]``: each KV head's keys are one contiguous
``[kv_len, head_dim]`` block, so the score and value products are plain batched matmuls that read the cache in
place (a sequence-major ``[batch, kv_len, kv_heads, head_dim]`` cache makes XLA transpose or stride through it on
every decode step; chapter 08 measures the difference).

Causality is positional: query ``i`` sits at absolute position ``q_offset + i`` and may read key ``j`` iff
``j <= q_offset + i`` and ``j < kv_len`` (keys past ``kv_len`` are unused cache slots).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite: keeps fully masked rows NaN-free


def check_qkv(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[int, int]:
    """Validate ``q: [batch, q_len, q_heads, head_dim]``, ``k, v: [batch, kv_heads, kv_len, head_dim]``.

    Returns ``(kv_heads, group)``; raises ``ValueError`` naming the shapes otherwise."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"expected rank-4 q [batch, seq, heads, head_dim] and k/v [batch, kv_heads, seq, head_dim], "
                         f"got q{q.shape} k{k.shape} v{v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k{k.shape} and v{v.shape} must have the same shape")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"batch/head_dim mismatch: q{q.shape} vs k{k.shape}")
    q_heads, kv_heads = q.shape[2], k.shape[1]
    if q_heads % kv_heads:
        raise ValueError(f"q heads {q_heads} not divisible by kv heads {kv_heads} (q{q.shape}, k{k.shape})")
    return kv_heads, q_heads // kv_heads


def causal_mask(q_len: int, kv_total: int, q_offset: jax.Array | int = 0,
                kv_len: jax.Array | int | None = None) -> jax.Array:
    """Boolean ``[q_len, kv_total]``: True where query ``i`` (position ``q_offset + i``) may read key ``j``."""
    q_pos = jnp.arange(q_len)[:, None] + q_offset
    k_pos = jnp.arange(kv_total)[None, :]
    allowed = k_pos <= q_pos
    if kv_len is not None:
        allowed = allowed & (k_pos < kv_len)
    return allowed


def grouped_scores(q: jax.Array, k: jax.Array, scale: float | None = None) -> jax.Array:
    """Scaled logits ``[batch, kv_heads, group, q_len, kv_len]`` (float32) without repeating K.

    q: ``[batch, q_len, q_heads, head_dim]``; k: ``[batch, kv_heads, kv_len, head_dim]``."""
    kv_heads, group = check_qkv(q, k, k)
    b, t, _, d = q.shape
    # one matmul per KV head over its group x q_len rows: XLA's CPU backend then reads the cache in place (with two
    # query axes in the product it transposes a copy of the whole cache first, which costs a decode step more than
    # the product itself)
    qg = q.reshape(b, t, kv_heads, group, d).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, group * t, d)
    scale = d ** -0.5 if scale is None else scale
    s = jnp.einsum("bhmd,bhkd->bhmk", qg, k, preferred_element_type=jnp.float32) * scale
    return s.reshape(b, kv_heads, group, t, k.shape[2])


def attention_probs(q: jax.Array, k: jax.Array, *, causal: bool = True, q_offset: jax.Array | int = 0,
                    kv_len: jax.Array | int | None = None, scale: float | None = None) -> jax.Array:
    """Post-softmax attention ``[batch, kv_heads, group, q_len, kv_len]`` in float32 (what Kascade's anchors pool)."""
    s = grouped_scores(q, k, scale)
    if causal:
        s = jnp.where(causal_mask(q.shape[1], k.shape[2], q_offset, kv_len), s, NEG_INF)
    elif kv_len is not None:  # bidirectional: only the unused cache slots are hidden
        s = jnp.where(jnp.arange(k.shape[2]) < kv_len, s, NEG_INF)
    return jax.nn.softmax(s, axis=-1)


def gqa_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
                  q_offset: jax.Array | int = 0, kv_len: jax.Array | int | None = None,
                  scale: float | None = None) -> jax.Array:
    """Dense grouped-query attention.

    q: ``[batch, q_len, q_heads, head_dim]``; k, v: ``[batch, kv_heads, kv_total, head_dim]`` (head-major).
    ``q_offset`` is the absolute position of the first query (the cache length before this step in decode),
    ``kv_len`` the number of valid cache entries. Returns ``[batch, q_len, q_heads, head_dim]`` in ``q.dtype``.
    """
    check_qkv(q, k, v)
    p = attention_probs(q, k, causal=causal, q_offset=q_offset, kv_len=kv_len, scale=scale)
    return weighted_values(p, v, q.dtype)


def gqa_attention_with_new(q: jax.Array, k: jax.Array, v: jax.Array, k_new: jax.Array, v_new: jax.Array, *,
                           q_offset: jax.Array | int) -> jax.Array:
    """Dense causal GQA of this step's queries over the cache *before* this step and this step's own keys.

    q: ``[batch, s, q_heads, head_dim]`` at positions ``q_offset + i``; k, v: the head-major cache ``[batch, kv_heads,
    L, head_dim]``, valid below ``q_offset``; k_new, v_new: this step's ``[batch, kv_heads, s, head_dim]`` (positions
    ``q_offset + j``, causal among themselves). One softmax over both parts: the same result as `gqa_attention` on
    the cache with the new keys written, but the cache is only read, so a decode step never copies it (see
    `model.KVCache.write`). Returns ``[batch, s, q_heads, head_dim]`` in ``q.dtype``."""
    check_qkv(q, k, v)
    s = q.shape[1]
    old = jnp.where(jnp.arange(k.shape[2]) < q_offset, grouped_scores(q, k), NEG_INF)
    own = jnp.where(causal_mask(s, s), grouped_scores(q, k_new), NEG_INF)
    p = jax.nn.softmax(jnp.concatenate([old, own], axis=-1), axis=-1)
    return (weighted_values(p[..., :k.shape[2]], v, jnp.float32)
            + weighted_values(p[..., k.shape[2]:], v_new, jnp.float32)).astype(q.dtype)


def weighted_values(p: jax.Array, v: jax.Array, out_dtype: Any) -> jax.Array:
    """Attention output from probabilities ``p: [batch, kv_heads, group, q_len, kv]`` and values ``v: [batch,
    kv_heads, kv, head_dim]``: ``[batch, q_len, kv_heads * group, head_dim]`` in ``out_dtype``."""
    b, h, g, t, n = p.shape
    out = jnp.einsum("bhmk,bhkd->bhmd", p.reshape(b, h, g * t, n).astype(v.dtype), v,
                     preferred_element_type=jnp.float32).reshape(b, h, g, t, v.shape[-1])
    # a batched matmul, then the transpose (XLA's CPU dot rejects bf16 x bf16 -> f32 with the transpose fused in)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h * g, v.shape[-1]).astype(out_dtype)


def repeat_kv(x: jax.Array, group: int) -> jax.Array:
    """The wasteful alternative: ``[b, kv_heads, s, d] -> [b, kv_heads * group, s, d]`` (for tests and the book)."""
    return jnp.repeat(x, group, axis=1)


def kv_cache_bytes(num_layers: int, kv_heads: int, head_dim: int, tokens: int, bytes_per_value: int = 2,
                   batch: int = 1) -> int:
    """Bytes of a K and V cache: ``2 * layers * batch * tokens * kv_heads * head_dim * bytes``."""
    positive = dict(num_layers=num_layers, kv_heads=kv_heads, head_dim=head_dim, bytes_per_value=bytes_per_value,
                    batch=batch)
    bad = [f"{name}={n}" for name, n in positive.items() if n <= 0] + ([f"tokens={tokens}"] if tokens < 0 else [])
    if bad:
        raise ValueError(f"kv_cache_bytes: sizes must be positive (tokens may be 0), got {', '.join(bad)}")
    return 2 * num_layers * batch * tokens * kv_heads * head_dim * bytes_per_value
