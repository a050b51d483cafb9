r"""Generic attention kernels: real gathers and blocked dense attention, not masks.

The model's KV cache is **head-major** ``[batch, kv_heads, L, head_dim]`` (`kascade_lite.model.KVCache`): each KV
head's keys are one contiguous block. A *tile* is ``tile`` consecutive key positions, so with ``L = tiles * tile``
the tiled view ``[batch, kv_heads, tiles, tile, head_dim]`` is a free reshape (:func:`to_tiles`) and a tile is one
contiguous ``tile * head_dim`` block. The **sequence-major** layout ``[batch, L, kv_heads, head_dim]`` (what a
projection ``x @ wk`` produces) is kept only as a measured counter-example: :func:`dense_decode_attention` accepts
both, so chapter 08 can show what the layout costs.

* Gathers: :func:`gather_tiles` (whole tiles) and :func:`gather_positions` (single positions, per KV head).
  `kascade.py` builds its sparse attention on them: its cost is :math:`O(k)` per query for ``k`` gathered keys
  instead of :math:`O(L)`.
* Dense: :func:`flash_attention` (chunked online softmax that skips key blocks above the diagonal),
  :func:`xla_attention` (``jax.nn.dot_product_attention``, which on CPU materialises the ``[T, L]`` scores) and,
  for decode, :func:`dense_decode_attention` (two matmuls over the whole cache, in either layout).

Every kernel works in float32 internally and returns ``q.dtype``. Scores are scaled by ``head_dim ** -0.5``.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from .attention import NEG_INF, check_qkv

Layout = Literal["heads", "seq"]


# ------------------------------------------------------------------------------------------------ sizes and checks
def check_tile_indices(idx: jax.Array, num_tiles: int, name: str = "tile_idx") -> None:
    """Raise ``ValueError`` if concrete ``idx`` holds a tile index outside ``[0, num_tiles)``.

    Traced indices (inside ``jit``) cannot be inspected; the gathers then clip them into range."""
    if isinstance(idx, jax.core.Tracer):
        return
    arr = np.asarray(idx)
    if arr.size and (arr.min() < 0 or arr.max() >= num_tiles):
        raise ValueError(f"{name} {tuple(arr.shape)} holds tile indices in [{arr.min()}, {arr.max()}], "
                         f"outside [0, {num_tiles})")


def to_tiles(x: jax.Array, tile: int) -> jax.Array:
    """Head-major ``[batch, kv_heads, L, head_dim]`` -> ``[batch, kv_heads, L / tile, tile, head_dim]`` (a reshape,
    no copy)."""
    b, h, length, d = x.shape
    if length % tile:
        raise ValueError(f"cache length {length} is not a multiple of tile={tile} (shape {x.shape})")
    return x.reshape(b, h, length // tile, tile, d)


def key_block(length: int, unit: int, block_k: int) -> int:
    """Keys per block of a blocked pass over a cache of ``length`` keys: a multiple of ``unit``, at most ``block_k``
    (rounded to a unit), preferably one that divides ``length`` (then the cache is never padded, i.e. never copied;
    the search stops at a quarter of the largest block)."""
    top = max(unit, min(block_k, length + unit - 1) // unit * unit)
    for bk in range(top, max(unit, top // 4) - 1, -unit):
        if length % bk == 0:
            return bk
    return top


def pad_to_tiles(x: jax.Array, tile: int, axis: int = 2) -> jax.Array:
    """Zero-pad ``axis`` of ``x`` up to a multiple of ``tile``."""
    pad = -x.shape[axis] % tile
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


# ------------------------------------------------------------------------------------------------ gathers
def _check_gather(name: str, cache: jax.Array, idx: jax.Array) -> None:
    if cache.ndim != 4 or idx.ndim != 3 or idx.shape[:2] != cache.shape[:2]:
        raise ValueError(f"{name}: cache {cache.shape} must be [batch, kv_heads, L, head_dim] and indices "
                         f"{idx.shape} [batch={cache.shape[0]}, kv_heads, n] matching it")


def gather_tiles(cache: jax.Array, idx: jax.Array, tile: int) -> jax.Array:
    """Whole tiles of a head-major cache: ``cache: [batch, kv_heads, L, head_dim]`` (``L % tile == 0``), ``idx:
    [batch, kv_heads, k]`` tile numbers -> ``[batch, kv_heads, k, tile, head_dim]`` (each tile one contiguous
    block)."""
    _check_gather("gather_tiles", cache, idx)
    tiles = to_tiles(cache, tile)
    check_tile_indices(idx, tiles.shape[2])
    take = lambda c, i: jnp.take(c, i, axis=0, mode="clip")  # noqa: E731 ; c: [tiles, tile, d], i: [k]
    return jax.vmap(jax.vmap(take))(tiles, idx)


def gather_positions(cache: jax.Array, pos: jax.Array) -> jax.Array:
    """Single key positions per KV head: ``cache: [batch, kv_heads, L, head_dim]``, ``pos: [batch, kv_heads, n]``
    (clipped into range) -> ``[batch, kv_heads, n, head_dim]``."""
    _check_gather("gather_positions", cache, pos)
    take = lambda c, i: jnp.take(c, i, axis=0, mode="clip")  # noqa: E731 ; c: [L, d], i: [n]
    return jax.vmap(jax.vmap(take))(cache, pos)


# ------------------------------------------------------------------------------------------------ dense
def _grouped_query(q: jax.Array, kv_heads: int) -> jax.Array:
    """``[batch, q_heads, head_dim]`` -> float32 ``[batch, kv_heads, group, head_dim]`` scaled by ``head_dim**-0.5``."""
    b, hq, d = q.shape
    if hq % kv_heads:
        raise ValueError(f"q heads {hq} (q{q.shape}) not divisible by kv heads {kv_heads}")
    return q.astype(jnp.float32).reshape(b, kv_heads, hq // kv_heads, d) * d ** -0.5


def dense_decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, kv_len: jax.Array | int, *,
                           layout: Layout = "heads") -> jax.Array:
    """Dense decode step over the whole cache (two batched matmuls).

    q: ``[batch, q_heads, head_dim]``; k_cache, v_cache: head-major ``[batch, kv_heads, L, head_dim]``
    (``layout="heads"``, the model's cache) or sequence-major ``[batch, L, kv_heads, head_dim]`` (``layout="seq"``),
    valid below ``kv_len``. Returns ``[batch, q_heads, head_dim]``."""
    if layout not in ("heads", "seq"):
        raise ValueError(f"layout must be 'heads' or 'seq', got {layout!r}")
    if k_cache.ndim != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"decode caches must be rank 4 and equal, got k{k_cache.shape} v{v_cache.shape}")
    kv_heads, length = (k_cache.shape[1], k_cache.shape[2]) if layout == "heads" else k_cache.shape[2:0:-1]
    qg = _grouped_query(q, kv_heads)
    kv = "bhnd" if layout == "heads" else "bnhd"
    s = jnp.einsum(f"bhgd,{kv}->bhgn", qg, k_cache, preferred_element_type=jnp.float32)
    p = jax.nn.softmax(jnp.where(jnp.arange(length) < kv_len, s, NEG_INF), axis=-1)
    out = jnp.einsum(f"bhgn,{kv}->bhgd", p, v_cache.astype(jnp.float32), preferred_element_type=jnp.float32)
    return out.reshape(q.shape).astype(q.dtype)


def _from_query_tiles(out: jax.Array, q: jax.Array) -> jax.Array:
    """``[tiles, batch, kv_heads, group, tile, d]`` -> ``[batch, T, q_heads, d]`` in ``q.dtype`` (padding dropped)."""
    n, b, h, g, t, d = out.shape
    return out.transpose(1, 0, 4, 2, 3, 5).reshape(b, n * t, h * g, d)[:, :q.shape[1]].astype(q.dtype)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_offset: jax.Array | int = 0,
                    kv_len: jax.Array | int | None = None, block_q: int = 256, block_k: int = 256) -> jax.Array:
    """Dense causal GQA with an online softmax over key blocks (FlashAttention's algorithm, in plain JAX).

    q: ``[batch, T, q_heads, head_dim]`` at positions ``q_offset + i``; k, v: head-major ``[batch, kv_heads, L,
    head_dim]`` (valid up to ``kv_len``, default ``L``). Query blocks are mapped with ``lax.map``; for each, a
    ``fori_loop`` visits only key blocks that hold a visible key (none above the diagonal or past ``kv_len``;
    ``block_k`` is lowered to a divisor of ``L`` near it when there is one, so the cache is not padded), so memory is
    ``O(block_q * block_k)`` per head and causal prefill does about half the work of the full square.
    Returns ``[batch, T, q_heads, head_dim]``.
    """
    kv_heads, group = check_qkv(q, k, v)
    b, t, _, d = q.shape
    block_q, block_k = min(block_q, t), key_block(k.shape[2], 1, block_k)
    kp, vp = pad_to_tiles(k, block_k), pad_to_tiles(v, block_k)
    kv_len = k.shape[2] if kv_len is None else kv_len
    qb = pad_to_tiles(q, block_q, axis=1).astype(jnp.float32) * d ** -0.5
    qb = qb.reshape(b, -1, block_q, kv_heads, group, d).transpose(1, 0, 3, 4, 2, 5)  # [nq, b, h, g, bq, d]

    def one_query_block(args: tuple[jax.Array, jax.Array]) -> jax.Array:
        qi, i = args
        q_pos = q_offset + i * block_q + jnp.arange(block_q)
        last = jnp.minimum(q_pos[-1] + 1, kv_len)  # keys [0, last) can be visible
        n_blocks = (last + block_k - 1) // block_k

        def step(j, state):
            m, l, acc = state
            kj = jax.lax.dynamic_slice_in_dim(kp, j * block_k, block_k, axis=2).astype(jnp.float32)
            vj = jax.lax.dynamic_slice_in_dim(vp, j * block_k, block_k, axis=2).astype(jnp.float32)
            s = jnp.einsum("bhgqd,bhkd->bhgqk", qi, kj, preferred_element_type=jnp.float32)
            k_pos = j * block_k + jnp.arange(block_k)
            s = jnp.where((k_pos <= q_pos[:, None]) & (k_pos < kv_len), s, NEG_INF)
            m_new = jnp.maximum(m, s.max(axis=-1))
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            return m_new, l * corr + p.sum(-1), acc * corr[..., None] + jnp.einsum("bhgqk,bhkd->bhgqd", p, vj)

        # *_like(qi): the loop state carries qi's sharding type, so the loop also runs inside `jax.shard_map`
        init = (jnp.full_like(qi[..., 0], NEG_INF), jnp.zeros_like(qi[..., 0]), jnp.zeros_like(qi))
        _, l, acc = jax.lax.fori_loop(0, n_blocks, step, init)
        return acc / jnp.maximum(l, 1e-30)[..., None]

    out = jax.lax.map(one_query_block, (qb, jnp.arange(qb.shape[0])))
    return _from_query_tiles(out, q)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_offset: jax.Array | int = 0,
                  kv_len: jax.Array | int | None = None) -> jax.Array:
    """Dense causal GQA through ``jax.nn.dot_product_attention`` (XLA implementation; materialises ``[T, L]``).

    Shapes as in :func:`flash_attention` (k and v are transposed to the ``[batch, L, kv_heads, head_dim]`` layout
    that ``dot_product_attention`` takes)."""
    check_qkv(q, k, v)
    allowed = (jnp.arange(k.shape[2]) <= q_offset + jnp.arange(q.shape[1])[:, None])
    if kv_len is not None:
        allowed = allowed & (jnp.arange(k.shape[2]) < kv_len)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    return jax.nn.dot_product_attention(q, k, v, mask=allowed[None, None], implementation="xla")


def xla_attention_bytes(t: int, length: int, q_heads: int, batch: int = 1, bytes_per_value: int = 4) -> int:
    """Bytes of the ``[batch, q_heads, t, length]`` score matrix that :func:`xla_attention` materialises."""
    return batch * q_heads * t * length * bytes_per_value
