r"""Attention kernels that turn Kascade's sparsity into wall-clock time: real tile gathers, not masks.

A *tile* is ``tile`` consecutive key positions. A KV cache of ``L = tiles * tile`` positions is viewed either

* **head-major** ``[batch, kv_heads, tiles, tile, head_dim]`` (each selected tile is one contiguous block), or
* **sequence-major** ``[batch, L, kv_heads, head_dim]`` (the layout of :class:`kascade_lite.model.KVCache`; a tile
  is ``tile`` strided rows of ``head_dim`` values),

and every sparse kernel *gathers* the ``k`` selected tiles per KV head, then attends over ``k * tile`` keys only:
its cost is :math:`O(k \cdot tile)` per query instead of :math:`O(L)`.

* Decode (one query per sequence): :func:`sparse_decode_attention` (reuse layers: the Top-k comes from an anchor,
  through a head map, :func:`reuse_tile_indices`) and :func:`anchor_decode_attention` (full scores, pooled over
  the GQA group and the tile, ``lax.top_k``, then the same sparse path).
* Prefill: :func:`sparse_prefill_attention` (query tile :math:`i` attends its own ``k`` key tiles, causal inside
  the diagonal tile) and :func:`anchor_prefill_attention` (scores pooled over the group *and* the query tile),
  both mapped over query tiles with ``lax.map`` so memory is :math:`O(T \cdot k \cdot tile)`, not :math:`O(T^2)`.
* Dense baselines: :func:`flash_attention` (chunked online softmax that skips key blocks above the diagonal),
  :func:`xla_attention` (``jax.nn.dot_product_attention``, which on CPU materialises the ``[T, L]`` scores) and,
  for decode, :func:`dense_decode_attention` (two matmuls over the whole cache, in the sparse kernels' layout).

Every kernel works in float32 internally and returns ``q.dtype``. Scores are scaled by ``head_dim ** -0.5``.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from .attention import NEG_INF, check_qkv

Layout = Literal["heads", "seq"]


# ------------------------------------------------------------------------------------------------ sizes and checks
def num_keep_tiles(context: int, tile: int, budget: float, min_keys: int = 0) -> int:
    """How many tiles Top-k keeps: ``ceil(budget * tiles)``, at least ``ceil(min_keys / tile)``, at most ``tiles``."""
    if tile <= 0 or context <= 0 or not 0 < budget <= 1:
        raise ValueError(f"need context > 0, tile > 0, budget in (0, 1]; got {context}, {tile}, {budget}")
    tiles = math.ceil(context / tile)
    return int(min(tiles, max(1, math.ceil(budget * tiles), math.ceil(min_keys / tile))))


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
    """Sequence-major ``[batch, L, kv_heads, head_dim]`` -> head-major ``[batch, kv_heads, L / tile, tile, head_dim]``
    (a copy; do it once when the cache is written, not per step)."""
    b, length, h, d = x.shape
    if length % tile:
        raise ValueError(f"cache length {length} is not a multiple of tile={tile} (shape {x.shape})")
    return x.reshape(b, length // tile, tile, h, d).transpose(0, 3, 1, 2, 4)


def _pad_to_tiles(x: jax.Array, tile: int, axis: int = 1) -> jax.Array:
    """Zero-pad ``axis`` of ``x`` up to a multiple of ``tile``."""
    pad = -x.shape[axis] % tile
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


# ------------------------------------------------------------------------------------------------ gathers
def gather_tiles(cache: jax.Array, idx: jax.Array) -> jax.Array:
    """Gather tiles from a head-major cache.

    cache: ``[batch, kv_heads, tiles, tile, head_dim]`` (or ``[kv_heads, tiles, tile, head_dim]``);
    idx: ``[batch, kv_heads, k]`` (or ``[kv_heads, k]``) int tile indices.
    Returns ``[batch, kv_heads, k, tile, head_dim]`` (or ``[kv_heads, k, tile, head_dim]``).
    """
    if cache.ndim == 4:
        return gather_tiles(cache[None], idx[None])[0]
    if cache.ndim != 5 or idx.ndim != 3 or idx.shape[:2] != cache.shape[:2]:
        raise ValueError(f"gather_tiles: cache {cache.shape} must be [batch, kv_heads, tiles, tile, head_dim] and "
                         f"idx {idx.shape} [batch, kv_heads, k]")
    check_tile_indices(idx, cache.shape[2])
    take = lambda c, i: jnp.take(c, i, axis=0, mode="clip")  # noqa: E731 ; c: [tiles, tile, d], i: [k]
    return jax.vmap(jax.vmap(take))(cache, idx)


def gather_tiles_seq(cache: jax.Array, idx: jax.Array, tile: int) -> jax.Array:
    """Gather tiles from a sequence-major cache without transposing it.

    cache: ``[batch, L, kv_heads, head_dim]`` with ``L % tile == 0``; idx: ``[batch, kv_heads, k]``.
    Returns ``[batch, kv_heads, k, tile, head_dim]``.
    """
    b, length, h, d = cache.shape
    if length % tile or idx.ndim != 3 or idx.shape[:2] != (b, h):
        raise ValueError(f"gather_tiles_seq: cache {cache.shape} needs length % tile == 0 (tile={tile}) and idx "
                         f"{idx.shape} must be [batch={b}, kv_heads={h}, k]")
    check_tile_indices(idx, length // tile)
    tiled = cache.reshape(b, length // tile, tile, h, d)
    take = lambda c, i: jnp.take(c, i, axis=0, mode="clip")  # noqa: E731 ; c: [tiles, tile, d]
    return jax.vmap(jax.vmap(take, in_axes=(2, 0)))(tiled, idx)


def reuse_tile_indices(anchor_idx: jax.Array, head_map: tuple[int, ...] | jax.Array) -> jax.Array:
    """A reuse layer's Top-k: KV head ``h`` takes the anchor's head ``head_map[h]``.

    anchor_idx: ``[batch, kv_heads, ...]``; head_map: ``[kv_heads]``. Returns the same shape as ``anchor_idx``."""
    return jnp.take(anchor_idx, jnp.asarray(head_map, jnp.int32), axis=1)


# ------------------------------------------------------------------------------------------------ decode
def _decode_cache_shape(cache: jax.Array, layout: Layout, tile: int) -> tuple[int, int]:
    """``(kv_heads, tiles)`` of a decode cache in ``layout``."""
    if layout == "heads":
        if cache.ndim != 5 or cache.shape[3] != tile:
            raise ValueError(f"head-major cache must be [batch, kv_heads, tiles, tile={tile}, head_dim], "
                             f"got {cache.shape}")
        return cache.shape[1], cache.shape[2]
    if layout == "seq":
        if cache.ndim != 4 or cache.shape[1] % tile:
            raise ValueError(f"sequence-major cache must be [batch, L, kv_heads, head_dim] with L % {tile} == 0, "
                             f"got {cache.shape}")
        return cache.shape[2], cache.shape[1] // tile
    raise ValueError(f"layout must be 'heads' or 'seq', got {layout!r}")


def _grouped_query(q: jax.Array, kv_heads: int) -> jax.Array:
    """``[batch, q_heads, head_dim]`` -> float32 ``[batch, kv_heads, group, head_dim]`` scaled by ``head_dim**-0.5``."""
    b, hq, d = q.shape
    if hq % kv_heads:
        raise ValueError(f"q heads {hq} (q{q.shape}) not divisible by kv heads {kv_heads}")
    return q.astype(jnp.float32).reshape(b, kv_heads, hq // kv_heads, d) * d ** -0.5


def _attend_tiles(qg: jax.Array, kt: jax.Array, vt: jax.Array, valid: jax.Array) -> jax.Array:
    """Softmax attention of grouped queries over gathered tiles.

    qg: ``[batch, kv_heads, group, head_dim]`` (scaled); kt, vt: ``[batch, kv_heads, k, tile, head_dim]``;
    valid: ``[batch, kv_heads, k, tile]`` bool. Returns float32 ``[batch, kv_heads, group, head_dim]``."""
    b, h, k, t, d = kt.shape  # flatten the gathered tiles into one key axis: plain batched matmuls
    s = jnp.einsum("bhgd,bhnd->bhgn", qg, kt.reshape(b, h, k * t, d), preferred_element_type=jnp.float32)
    p = jax.nn.softmax(jnp.where(valid.reshape(b, h, 1, k * t), s, NEG_INF), axis=-1)
    return jnp.einsum("bhgn,bhnd->bhgd", p, vt.reshape(b, h, k * t, d).astype(jnp.float32),
                      preferred_element_type=jnp.float32)


def sparse_decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, tile_idx: jax.Array,
                            kv_len: jax.Array | int, *, tile: int, layout: Layout = "heads") -> jax.Array:
    """One decode step over the selected tiles only (a reuse layer).

    q: ``[batch, q_heads, head_dim]``; k_cache, v_cache: ``[batch, kv_heads, tiles, tile, head_dim]``
    (``layout="heads"``) or ``[batch, L, kv_heads, head_dim]`` (``layout="seq"``); tile_idx: ``[batch, kv_heads, k]``
    distinct tile indices; ``kv_len``: valid cache positions (a partially filled last tile is masked).
    Returns ``[batch, q_heads, head_dim]``.
    """
    kv_heads, _ = _decode_cache_shape(k_cache, layout, tile)
    if layout == "heads":
        kt, vt = gather_tiles(k_cache, tile_idx), gather_tiles(v_cache, tile_idx)
    else:
        kt, vt = gather_tiles_seq(k_cache, tile_idx, tile), gather_tiles_seq(v_cache, tile_idx, tile)
    pos = tile_idx[..., None] * tile + jnp.arange(tile)  # [b, kv_heads, k, tile]
    out = _attend_tiles(_grouped_query(q, kv_heads), kt, vt, pos < kv_len)
    return out.reshape(q.shape).astype(q.dtype)


def decode_tile_scores(q: jax.Array, k_cache: jax.Array, kv_len: jax.Array | int, *, tile: int,
                       layout: Layout = "heads") -> jax.Array:
    """Anchor scoring: post-softmax attention of every query head, summed over its GQA group and over each tile.

    q: ``[batch, q_heads, head_dim]``; k_cache as in :func:`sparse_decode_attention`.
    Returns float32 ``[batch, kv_heads, tiles]`` (tiles past ``kv_len`` score ``-inf``)."""
    kv_heads, tiles = _decode_cache_shape(k_cache, layout, tile)
    qg = _grouped_query(q, kv_heads)
    if layout == "heads":
        b, _, _, _, d = k_cache.shape
        s = jnp.einsum("bhgd,bhnd->bhgn", qg, k_cache.reshape(b, kv_heads, tiles * tile, d),
                       preferred_element_type=jnp.float32)
    else:
        s = jnp.einsum("bhgd,bnhd->bhgn", qg, k_cache, preferred_element_type=jnp.float32)
    s = jnp.where(jnp.arange(tiles * tile) < kv_len, s, NEG_INF)
    p = jax.nn.softmax(s, axis=-1)
    scores = p.reshape(*p.shape[:2], -1, tiles, tile).sum(axis=(2, 4))
    return jnp.where(jnp.arange(tiles) * tile < kv_len, scores, -jnp.inf)


def anchor_decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, kv_len: jax.Array | int, *,
                            keep: int, tile: int, layout: Layout = "heads") -> tuple[jax.Array, jax.Array]:
    """Anchor decode step: full tile scores, ``lax.top_k`` of ``keep`` tiles per KV head, then the sparse path.

    The tile holding the newest key (position ``kv_len - 1``, the query's own) is always kept, as the diagonal
    tile is in prefill. Shapes as in :func:`sparse_decode_attention`. Returns ``(out [batch, q_heads, head_dim],
    tile_idx [batch, kv_heads, keep])`` -- the indices the following reuse layers read."""
    _, tiles = _decode_cache_shape(k_cache, layout, tile)
    if not 0 < keep <= tiles:
        raise ValueError(f"keep={keep} tiles must be in [1, {tiles}]")
    scores = decode_tile_scores(q, k_cache, kv_len, tile=tile, layout=layout)
    scores = jnp.where(jnp.arange(tiles) == (kv_len - 1) // tile, jnp.inf, scores)
    _, idx = jax.lax.top_k(scores, keep)
    return sparse_decode_attention(q, k_cache, v_cache, idx, kv_len, tile=tile, layout=layout), idx


def dense_decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, kv_len: jax.Array | int, *,
                           tile: int, layout: Layout = "heads") -> jax.Array:
    """Dense decode step over the whole cache in the same layout as the sparse kernels (two batched matmuls).

    Shapes as in :func:`sparse_decode_attention`. Returns ``[batch, q_heads, head_dim]``."""
    kv_heads, tiles = _decode_cache_shape(k_cache, layout, tile)
    qg = _grouped_query(q, kv_heads)
    if layout == "heads":
        b, d = k_cache.shape[0], k_cache.shape[-1]
        k_cache, v_cache = (x.reshape(b, kv_heads, tiles * tile, d) for x in (k_cache, v_cache))
        s = jnp.einsum("bhgd,bhnd->bhgn", qg, k_cache, preferred_element_type=jnp.float32)
    else:
        s = jnp.einsum("bhgd,bnhd->bhgn", qg, k_cache, preferred_element_type=jnp.float32)
    p = jax.nn.softmax(jnp.where(jnp.arange(tiles * tile) < kv_len, s, NEG_INF), axis=-1)
    spec = "bhgn,bhnd->bhgd" if layout == "heads" else "bhgn,bnhd->bhgd"
    out = jnp.einsum(spec, p, v_cache.astype(jnp.float32), preferred_element_type=jnp.float32)
    return out.reshape(q.shape).astype(q.dtype)


# ------------------------------------------------------------------------------------------------ prefill
def _prefill_operands(q: jax.Array, k: jax.Array, v: jax.Array, tile: int
                      ) -> tuple[jax.Array, jax.Array, jax.Array, int]:
    """Pad to whole tiles and go head-major: q ``[tiles, batch, kv_heads, group, tile, d]`` (scaled float32),
    k, v ``[batch, kv_heads, tiles, tile, d]``; also returns the group size."""
    kv_heads, group = check_qkv(q, k, v)
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"prefill expects as many queries as keys (start of the sequence): q{q.shape} k{k.shape}")
    b, _, _, d = q.shape
    qp = _pad_to_tiles(q, tile).astype(jnp.float32) * d ** -0.5
    qt = qp.reshape(b, -1, tile, kv_heads, group, d).transpose(1, 0, 3, 4, 2, 5)
    return qt, to_tiles(_pad_to_tiles(k, tile), tile), to_tiles(_pad_to_tiles(v, tile), tile), group


def _from_query_tiles(out: jax.Array, q: jax.Array) -> jax.Array:
    """``[tiles, batch, kv_heads, group, tile, d]`` -> ``[batch, T, q_heads, d]`` in ``q.dtype`` (padding dropped)."""
    n, b, h, g, t, d = out.shape
    return out.transpose(1, 0, 4, 2, 3, 5).reshape(b, n * t, h * g, d)[:, :q.shape[1]].astype(q.dtype)


def sparse_prefill_attention(q: jax.Array, k: jax.Array, v: jax.Array, tile_idx: jax.Array, *, tile: int,
                             chunk: int = 4) -> jax.Array:
    """Block-sparse causal prefill: query tile ``i`` attends only to its selected key tiles.

    q: ``[batch, T, q_heads, head_dim]``; k, v: ``[batch, T, kv_heads, head_dim]`` (positions ``0..T-1``);
    tile_idx: ``[batch, kv_heads, q_tiles, k]`` distinct key tiles per query tile (include the diagonal tile;
    tiles after it are masked by causality). ``chunk`` query tiles are processed at once (``lax.map``), so
    memory is ``O(T * k * tile)``. Returns ``[batch, T, q_heads, head_dim]``.
    """
    qt, kt, vt, _ = _prefill_operands(q, k, v, tile)
    n_q = qt.shape[0]
    if tile_idx.ndim != 4 or tile_idx.shape[:3] != (q.shape[0], kt.shape[1], n_q):
        raise ValueError(f"tile_idx {tile_idx.shape} must be [batch, kv_heads={kt.shape[1]}, q_tiles={n_q}, k]")
    check_tile_indices(tile_idx, kt.shape[2])

    def one_query_tile(args: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        qi, idx, i = args  # [b, h, g, tq, d], [b, h, k], scalar tile number
        kg, vg = gather_tiles(kt, idx), gather_tiles(vt, idx)  # [b, h, k, tk, d]
        s = jnp.einsum("bhgqd,bhktd->bhgqkt", qi, kg, preferred_element_type=jnp.float32)
        q_pos = i * tile + jnp.arange(tile)
        k_pos = idx[..., None] * tile + jnp.arange(tile)  # [b, h, k, tk]
        allowed = k_pos[:, :, None, None] <= q_pos[:, None, None]  # [b, h, 1, tq, k, tk]
        s = jnp.where(allowed, s, NEG_INF)
        p = jax.nn.softmax(s.reshape(*s.shape[:4], -1), axis=-1).reshape(s.shape)
        return jnp.einsum("bhgqkt,bhktd->bhgqd", p, vg, preferred_element_type=jnp.float32)

    idx_by_tile = jnp.moveaxis(tile_idx, 2, 0)  # [q_tiles, b, h, k]
    out = jax.lax.map(one_query_tile, (qt, idx_by_tile, jnp.arange(n_q)), batch_size=min(chunk, n_q))
    return _from_query_tiles(out, q)


def prefill_tile_scores_topk(q: jax.Array, k: jax.Array, *, keep: int, tile: int, chunk: int = 2,
                             bands: int = 8) -> jax.Array:
    """Anchor selection for prefill: for each query tile, post-softmax scores pooled over the GQA group, the query
    tile and each key tile; the diagonal tile is always kept, future tiles never (unless fewer than ``keep`` exist).

    q: ``[batch, T, q_heads, head_dim]``, k: ``[batch, T, kv_heads, head_dim]``. Returns int32
    ``[batch, kv_heads, q_tiles, keep]``. Causality is exploited in ``bands`` static bands of query tiles: band
    ``j`` scores only keys up to its end, so the work is ``(bands + 1) / (2 * bands)`` of the full square.
    """
    qt, kt, _, _ = _prefill_operands(q, k, k, tile)
    n = qt.shape[0]
    if not 0 < keep <= n:
        raise ValueError(f"keep={keep} tiles must be in [1, {n}] (T={q.shape[1]}, tile={tile})")
    edges = sorted({round(n * j / bands) for j in range(bands + 1)})
    parts = []
    for start, stop in zip(edges[:-1], edges[1:]):
        width = max(stop, keep)  # key tiles this band can see (padded so that top_k has `keep` candidates)
        k_band = kt[:, :, :width].reshape(*kt.shape[:2], width * tile, kt.shape[-1])

        def one_query_tile(args: tuple[jax.Array, jax.Array], k_band=k_band, width=width) -> jax.Array:
            qi, i = args  # [b, h, g, tq, d], scalar
            s = jnp.einsum("bhgqd,bhkd->bhgqk", qi, k_band, preferred_element_type=jnp.float32)
            q_pos = i * tile + jnp.arange(tile)
            s = jnp.where(jnp.arange(width * tile) <= q_pos[:, None], s, NEG_INF)
            p = jax.nn.softmax(s, axis=-1)
            pooled = p.reshape(*p.shape[:2], -1, width, tile).sum(axis=(2, 4))  # [b, h, width]
            key_tile = jnp.arange(width)
            pooled = jnp.where(key_tile < i, pooled, -jnp.inf)
            pooled = jnp.where(key_tile == i, jnp.inf, pooled)
            return jax.lax.top_k(pooled, keep)[1]

        parts.append(jax.lax.map(one_query_tile, (qt[start:stop], jnp.arange(start, stop)),
                                 batch_size=min(chunk, stop - start)))
    return jnp.moveaxis(jnp.concatenate(parts, axis=0), 0, 2).astype(jnp.int32)


def anchor_prefill_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, keep: int, tile: int, chunk: int = 4,
                             score_chunk: int = 2, bands: int = 8) -> tuple[jax.Array, jax.Array]:
    """Anchor prefill: :func:`prefill_tile_scores_topk` then :func:`sparse_prefill_attention` on the result.

    Shapes as in :func:`sparse_prefill_attention`. Returns ``(out [batch, T, q_heads, head_dim],
    tile_idx [batch, kv_heads, q_tiles, keep])``."""
    idx = prefill_tile_scores_topk(q, k, keep=keep, tile=tile, chunk=score_chunk, bands=bands)
    return sparse_prefill_attention(q, k, v, idx, tile=tile, chunk=chunk), idx


# ------------------------------------------------------------------------------------------------ references
def tile_mask(tile_idx: jax.Array, num_tiles: int, tile: int) -> jax.Array:
    """Boolean ``[..., num_tiles * tile]`` key mask of the selected tiles (``tile_idx: [..., k]``)."""
    picked = jax.nn.one_hot(tile_idx, num_tiles, dtype=jnp.bool_).any(axis=-2)  # [..., num_tiles]
    return jnp.repeat(picked, tile, axis=-1)


def masked_dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
    """Reference: dense GQA softmax where ``allowed`` is False set to ``-inf`` (the O(T * L) way to be sparse).

    q: ``[batch, T, q_heads, d]``, k, v: ``[batch, L, kv_heads, d]``, allowed: broadcastable to
    ``[batch, kv_heads, group, T, L]``. Returns ``[batch, T, q_heads, d]`` (float32)."""
    kv_heads, group = check_qkv(q, k, v)
    b, t, _, d = q.shape
    s = jnp.einsum("bqhgd,bkhd->bhgqk", q.reshape(b, t, kv_heads, group, d).astype(jnp.float32),
                   k.astype(jnp.float32)) * d ** -0.5
    p = jax.nn.softmax(jnp.where(allowed, s, NEG_INF), axis=-1)
    return jnp.einsum("bhgqk,bkhd->bqhgd", p, v.astype(jnp.float32)).reshape(b, t, kv_heads * group, d)


# ------------------------------------------------------------------------------------------------ dense baselines
def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_offset: jax.Array | int = 0,
                    kv_len: jax.Array | int | None = None, block_q: int = 256, block_k: int = 256) -> jax.Array:
    """Dense causal GQA with an online softmax over key blocks (FlashAttention's algorithm, in plain JAX).

    q: ``[batch, T, q_heads, head_dim]`` at positions ``q_offset + i``; k, v: ``[batch, L, kv_heads, head_dim]``
    (valid up to ``kv_len``, default ``L``). Query blocks are mapped with ``lax.map``; for each, a ``fori_loop``
    visits only key blocks that hold a visible key (none above the diagonal or past ``kv_len``), so memory is
    ``O(block_q * block_k)`` per head and causal prefill does about half the work of the full square.
    Returns ``[batch, T, q_heads, head_dim]``.
    """
    kv_heads, group = check_qkv(q, k, v)
    b, t, _, d = q.shape
    block_q, block_k = min(block_q, t), min(block_k, k.shape[1])
    kp, vp = _pad_to_tiles(k, block_k), _pad_to_tiles(v, block_k)
    kv_len = k.shape[1] if kv_len is None else kv_len
    qb = _pad_to_tiles(q, block_q).astype(jnp.float32) * d ** -0.5
    qb = qb.reshape(b, -1, block_q, kv_heads, group, d).transpose(1, 0, 3, 4, 2, 5)  # [nq, b, h, g, bq, d]

    def one_query_block(args: tuple[jax.Array, jax.Array]) -> jax.Array:
        qi, i = args
        q_pos = q_offset + i * block_q + jnp.arange(block_q)
        last = jnp.minimum(q_pos[-1] + 1, kv_len)  # keys [0, last) can be visible
        n_blocks = (last + block_k - 1) // block_k

        def step(j, state):
            m, l, acc = state
            kj = jax.lax.dynamic_slice_in_dim(kp, j * block_k, block_k, axis=1).astype(jnp.float32)
            vj = jax.lax.dynamic_slice_in_dim(vp, j * block_k, block_k, axis=1).astype(jnp.float32)
            s = jnp.einsum("bhgqd,bkhd->bhgqk", qi, kj, preferred_element_type=jnp.float32)
            k_pos = j * block_k + jnp.arange(block_k)
            s = jnp.where((k_pos <= q_pos[:, None]) & (k_pos < kv_len), s, NEG_INF)
            m_new = jnp.maximum(m, s.max(axis=-1))
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            return m_new, l * corr + p.sum(-1), acc * corr[..., None] + jnp.einsum("bhgqk,bkhd->bhgqd", p, vj)

        init = (jnp.full(qi.shape[:-1], NEG_INF, jnp.float32), jnp.zeros(qi.shape[:-1], jnp.float32),
                jnp.zeros(qi.shape, jnp.float32))
        _, l, acc = jax.lax.fori_loop(0, n_blocks, step, init)
        return acc / jnp.maximum(l, 1e-30)[..., None]

    out = jax.lax.map(one_query_block, (qb, jnp.arange(qb.shape[0])))
    return _from_query_tiles(out, q)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_offset: jax.Array | int = 0,
                  kv_len: jax.Array | int | None = None) -> jax.Array:
    """Dense causal GQA through ``jax.nn.dot_product_attention`` (XLA implementation; materialises ``[T, L]``).

    Shapes as in :func:`flash_attention`."""
    check_qkv(q, k, v)
    allowed = (jnp.arange(k.shape[1]) <= q_offset + jnp.arange(q.shape[1])[:, None])
    if kv_len is not None:
        allowed = allowed & (jnp.arange(k.shape[1]) < kv_len)
    return jax.nn.dot_product_attention(q, k, v, mask=allowed[None, None], implementation="xla")


def xla_attention_bytes(t: int, length: int, q_heads: int, batch: int = 1, bytes_per_value: int = 4) -> int:
    """Bytes of the ``[batch, q_heads, t, length]`` score matrix that :func:`xla_attention` materialises."""
    return batch * q_heads * t * length * bytes_per_value
