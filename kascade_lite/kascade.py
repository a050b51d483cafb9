r"""Kascade sparse attention, the one implementation: budget, selection, anchors, reuse, prefill and decode.

**Budget.** A query tile of ``q_tile`` consecutive queries (decode: the query token alone, ``q_tile = 1``) attends
:math:`n_{keep} = \min(n, \max(m, \lceil \beta n \rceil))` keys in all (`keys_kept`), where ``n`` is the context
(the keys in the cache, or with ``rolling=True`` the keys visible to the tile), ``beta`` the budget and ``m`` the
floor ``min_keys``. The tile's own keys (its causal keys: ``q_tile`` of them, fewer in a partial last tile) are
always attended and count towards the budget, so Top-k picks :math:`n_{keep} - n_{own}` keys among those *strictly
before* the tile (`topk_count`; rounded up to whole key tiles with ``granularity="tile"``). Calibration
(`calibrate.topk_keys`) uses the same rule. *Mass-targeted* selection (``mass=p``, our adaptive variant) keeps
instead the fewest Top units whose pooled attention, with the own tile's, reaches the share ``p`` of the row's, no
fewer than the floor and no more than :math:`n_{keep}`: the budget becomes a maximum. *Head budgets* (a schedule's
``head_budgets``, our variant) give each KV head ``h`` of an anchor or dense layer ``l`` its own budget
:math:`\beta\, m_{l,h}` (`head_budget_values`); the rule is the same with that budget, one row per head.

**Selection** (anchor and dense layers). With the post-softmax attention :math:`P = \mathrm{softmax}(QK^\top/\sqrt d)`
of every query head, pooled over the ``group`` query heads of each KV head ``h`` (``pool="group"``; ``"all"``: every
head, one set shared by all KV heads; ``"head"``: no pooling, one set per query head) and over the queries of tile
``t``, and summed over each key unit ``u`` (a position, or a key tile of ``tile_size`` positions):

.. math:: S_{h,t,u} = \sum_{g}\sum_{i \in t}\sum_{j \in u} P_{h,g,i,j}, \qquad
          I_{h,t} = \operatorname{TopK}_{u \,:\, \text{start}(u) < \text{start}(t)} S_{h,t,u}.

Scores are computed one block of query tiles at a time, over the key blocks below the diagonal only (`select`:
one online pass with key tiles, `online_tile_scores`; two passes with key positions, `two_pass_position_scores`;
one pass when the cache fits one key block, as in decode), so prefill never holds a ``[heads, T, T]`` tensor and
costs about what FlashAttention's two products cost. Layer 0 is dense (its attention is flat) but still
selects; an anchor attends over its own Top-k (or densely, ``anchor_dense=True``, for filter-layer baselines); a
reuse layer ``l`` skips the scoring and its KV head ``h`` takes the selection of the latest anchor's head
``head_map[l][h]`` (`Selection.remap`; ``remap=False``: head h).

**Attend** (`attend`). Query tile ``t`` gathers its selected keys and values from the model's head-major cache
``[batch, kv_heads, max_len, head_dim]`` (`kernels.gather_positions`, or whole contiguous tiles with
`kernels.gather_tiles`) plus its own tile's keys (causal inside the tile) and runs one softmax
over those :math:`n_{keep}` keys only; prefill maps over query tiles with ``lax.map``, so memory is
:math:`O(T \cdot n_{keep})`. Decode is the same with one query tile of one token.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp

from .attention import NEG_INF, check_qkv, gqa_attention_with_new
from .kernels import flash_attention, gather_positions, gather_tiles, key_block, pad_to_tiles
from .model import write_new
from .schedule import Schedule

Granularity = Literal["position", "tile"]
Pool = Literal["group", "all", "head"]
GRANULARITIES = ("position", "tile")
POOLS = ("group", "all", "head")
FORCED = 1e6  # added to the score of a unit that must be chosen (pooled scores are sums of probabilities, < 1e4)
ROUNDING_SLACK = 1e-3  # ceil(budget * n - slack): 0.1 * 130 is 13 keys in float64 and float32 alike


# ------------------------------------------------------------------------------------------------ budget
def check_budget(budget: float | int) -> None:
    """Raise ``ValueError`` unless ``budget`` is a fraction in (0, 1] (float) or a positive key count (int)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0:
        raise ValueError(f"budget must be a positive fraction (float) or key count (int), got {budget!r}")
    if isinstance(budget, float) and budget > 1:
        raise ValueError(f"a fractional budget must be in (0, 1], got {budget}")


def keys_kept(context: Any, budget: float | int | jax.Array = 0.1, min_keys: int = 128) -> Any:
    """Keys a query tile attends in all, its own tile included: ``min(context, max(min_keys, ceil(budget * context)))``.

    ``context``: a Python int (returns an int) or an int array (returns int32 of its shape); ``budget``: a fraction
    in (0, 1], as an int a fixed count of keys, or a float32 array of fractions (per-head budgets, e.g. ``[kv_heads,
    1]``; checked by the caller) broadcast against ``context`` (returns int32 of the broadcast shape)."""
    if isinstance(budget, jax.Array):
        n = jnp.asarray(context, jnp.int32)
        k = jnp.ceil(budget * n.astype(jnp.float32) - ROUNDING_SLACK).astype(jnp.int32)
        return jnp.minimum(n, jnp.maximum(k, min_keys))
    check_budget(budget)
    if isinstance(context, int):
        k = budget if isinstance(budget, int) else math.ceil(budget * context - ROUNDING_SLACK)
        return min(context, max(min_keys, k))
    n = jnp.asarray(context, jnp.int32)
    k = (jnp.full_like(n, budget) if isinstance(budget, int)
         else jnp.ceil(budget * n.astype(jnp.float32) - ROUNDING_SLACK).astype(jnp.int32))
    return jnp.minimum(n, jnp.maximum(k, min_keys))


def head_budget_values(budget: float | int, multipliers: tuple[float, ...] | None) -> float | int | tuple[float, ...]:
    """The budget of each KV head of a layer with head budgets: ``min(1, budget * m_h)`` per multiplier ``m_h``
    (a tuple of fractions), or ``budget`` itself without multipliers. Head budgets scale a fractional budget only."""
    if multipliers is None:
        return budget
    check_budget(budget)
    if isinstance(budget, int):
        raise ValueError(f"head budgets scale a fractional budget, got a key count {budget}")
    return tuple(min(1.0, budget * float(m)) for m in multipliers)


def topk_count(context: Any, own: Any, *, budget: float | int, min_keys: int, unit: int = 1) -> Any:
    """Units (positions, or key tiles of ``unit`` keys, rounded up) Top-k picks besides the ``own`` keys:
    ``ceil(max(0, keys_kept(context) - own) / unit)``. Int or int32 array like ``context``."""
    if isinstance(context, int) and isinstance(own, int):
        return -(-max(0, keys_kept(context, budget, min_keys) - own) // unit)
    return -(-jnp.maximum(keys_kept(context, budget, min_keys) - own, 0) // unit)


def tiles_kept(context: int, tile: int, budget: float | int = 0.1, min_keys: int = 128) -> int:
    """Key tiles a prefill query tile attends with ``granularity="tile"``: its own tile plus the Top-k tiles
    (``keys_kept`` rounded up to whole tiles), at most ``ceil(context / tile)``."""
    if tile <= 0 or context <= 0:
        raise ValueError(f"need context > 0 and tile > 0, got context={context}, tile={tile}")
    return min(-(-context // tile), 1 + topk_count(context, tile, budget=budget, min_keys=min_keys, unit=tile))


def keys_read(context: int, *, phase: str, granularity: Granularity, tile: int, budget: float | int = 0.1,
              min_keys: int = 128) -> int:
    """Keys a sparse layer attends per query in decode (its own key plus the Top-k) or per query tile in prefill
    (`keys_kept`), in whole key tiles of ``tile`` with ``granularity="tile"``, at most ``context``: what its K/V read
    and FLOPs cost (`cost.model_step_cost`, `cost.attention_cost`)."""
    unit = tile if granularity == "tile" else 1
    if phase == "decode":
        return min(context, 1 + unit * topk_count(context, 1, budget=budget, min_keys=min_keys, unit=unit))
    return min(context, -(-keys_kept(context, budget, min_keys) // unit) * unit)


# ------------------------------------------------------------------------------------------------ selection
@jax.tree_util.register_dataclass
@dataclass
class Selection:
    """The Top-k of an anchor (or dense) layer, read by the reuse layers after it.

    ``idx``: ``[batch, kv_heads, sets, n_qtiles, k]`` int32 key positions (``unit == 1``) or key-tile numbers (tile
    ``u`` covers positions ``[u*unit, (u+1)*unit)``); ``keep``: same shape, bool, False for padding (rank past the
    budget, or fewer eligible keys than ``k``). ``sets`` is 1 (one set per KV head) or ``group`` (``pool="head"``).
    The ``q_tile`` queries of a tile share a row.
    """

    idx: jax.Array
    keep: jax.Array
    q_tile: int = field(metadata=dict(static=True))
    unit: int = field(metadata=dict(static=True))

    def remap(self, head_map: Any) -> "Selection":
        """The selection seen by a reuse layer: its KV head ``h`` takes row ``head_map[h]`` (``[kv_heads]`` ints)."""
        hm = jnp.asarray(head_map, jnp.int32)
        return dataclasses.replace(self, idx=self.idx[:, hm], keep=self.keep[:, hm])

    def positions(self) -> tuple[jax.Array, jax.Array]:
        """Selected key positions and validity, ``[batch, kv_heads, sets, n_qtiles, k * unit]`` each."""
        pos = (self.idx[..., None] * self.unit + jnp.arange(self.unit)).reshape(*self.idx.shape[:-1], -1)
        return pos, jnp.repeat(self.keep, self.unit, axis=-1)


def grouped_dot(q: jax.Array, k: jax.Array) -> jax.Array:
    """``q: [batch, kv_heads, group, q_len, d]`` times ``k: [batch, kv_heads, n, d]`` -> float32 ``[batch, kv_heads,
    group, q_len, n]``, as one matmul per KV head over ``group * q_len`` rows (written as such, XLA's CPU backend
    reads the cache in place; with two query axes it transposes a copy of the cache first, which costs a decode
    step more than the product)."""
    b, h, g, t, d = q.shape
    s = jnp.einsum("bhmd,bhnd->bhmn", q.reshape(b, h, g * t, d), k, preferred_element_type=jnp.float32)
    return s.reshape(b, h, g, t, k.shape[2])


def query_tiles(q: jax.Array, kv_heads: int, q_tile: int) -> jax.Array:
    """``[batch, T, heads, d]`` -> scaled float32 ``[n_qtiles, batch, kv_heads, group, q_tile, d]`` (zero padded)."""
    b, t, heads, d = q.shape
    n_t = -(-t // q_tile)
    qp = jnp.pad(q.astype(jnp.float32) * d ** -0.5, [(0, 0), (0, n_t * q_tile - t), (0, 0), (0, 0)])
    return qp.reshape(b, n_t, q_tile, kv_heads, heads // kv_heads, d).transpose(1, 0, 3, 4, 2, 5)


def pooled_scores(p: jax.Array, pool: Pool, unit: int) -> jax.Array:
    """Pool one query tile's attention ``p: [batch, kv_heads, group, q_tile, L]`` into unit scores
    ``[batch, kv_heads, sets, ceil(L / unit)]``: summed over the tile's queries, over the group (``"group"``), over
    every head (``"all"``, broadcast to all KV heads) or not over heads (``"head"``, sets = group), and over the
    ``unit`` keys of each key tile."""
    b, h, g, _, length = p.shape
    s = p.sum(axis=3)                                                  # [b, h, g, L]
    if pool == "group":
        s = s.sum(axis=2, keepdims=True)
    elif pool == "all":
        s = jnp.broadcast_to(s.sum(axis=(1, 2), keepdims=True), (b, h, 1, length))
    elif pool != "head":
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    n_u = -(-length // unit)
    s = jnp.pad(s, [(0, 0)] * 3 + [(0, n_u * unit - length)])
    return s.reshape(*s.shape[:3], n_u, unit).sum(axis=-1)


def mass_count(mass: jax.Array, need: jax.Array) -> jax.Array:
    """Fewest ranks whose mass reaches ``need``: ``mass: [..., k]`` in rank order (0 for padding), ``need: [...]``
    -> int32 ``[...]``, at most ``k``. Rank ``r`` is needed while the ranks above it hold less than ``need``."""
    above = jnp.cumsum(mass, axis=-1) - mass
    return jnp.sum(above < need[..., None], axis=-1).astype(jnp.int32)


def topk_units(scores: jax.Array, start: jax.Array, basis: jax.Array, own: jax.Array, *, k_max: int, unit: int,
               budget: float | int | jax.Array, min_keys: int, need: jax.Array | None = None,
               raw: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Top-k of one query tile: ``scores: [batch, kv_heads, sets, n_units]`` -> ``(idx, keep)`` each
    ``[batch, kv_heads, sets, k_max]``. Eligible units start before ``start`` (the tile's first query); the row keeps
    ``topk_count(basis, own)`` of them (``own``: the tile's own keys), never more than the keys before ``start``;
    ``budget`` may be a float32 ``[kv_heads, 1]`` array (head budgets: one budget per KV head, ``k_max`` covering
    the largest).
    With ``need`` (``[batch, kv_heads, sets]``, mass-targeted selection) it keeps the fewest top units whose mass
    (``raw``: the scores before sinks and recent units were forced; default ``scores``) sums to ``need``
    (`mass_count`), at least the floor's ``min_keys - own`` keys and at most the budget's count.
    The row is returned in key order, not score order: the gathers that read it then walk the cache forwards, which
    XLA's CPU gather reads faster than a scattered order."""
    n_units = scores.shape[-1]
    eligible = jnp.arange(n_units) * unit < start
    k_keys = jnp.minimum(jnp.maximum(keys_kept(basis, budget, min_keys) - own, 0), start)
    vals, idx = jax.lax.top_k(jnp.where(eligible, scores, NEG_INF), k_max)
    count = -(-k_keys // unit)
    if need is not None:
        floor = -(-jnp.minimum(jnp.maximum(jnp.minimum(basis, min_keys) - own, 0), start) // unit)
        ranked = jnp.take_along_axis(scores if raw is None else raw, idx, axis=-1)
        count = jnp.minimum(jnp.maximum(mass_count(jnp.where(vals > NEG_INF / 2, ranked, 0.0), need), floor), count)
    keep = (jnp.arange(k_max) < count[..., None]) & (vals > NEG_INF / 2)
    idx, keep = jax.lax.sort((idx.astype(jnp.int32), keep), dimension=idx.ndim - 1, num_keys=1)
    return idx, keep


def block_scores(qb: jax.Array, kp: jax.Array, j: jax.Array, q_pos: jax.Array, kv_len: Any, bk: int) -> jax.Array:
    """Masked scores of one query block against key block ``j``: scaled float32 ``qb: [batch, kv_heads, group, bq,
    d]`` at positions ``q_pos: [bq]``, the key cache ``kp: [batch, kv_heads, L', d]`` (``L'`` a multiple of ``bk``)
    -> float32 ``[batch, kv_heads, group, bq, bk]``, ``NEG_INF`` above the diagonal and at or past ``kv_len``."""
    # one block: the cache itself (a sliced copy would let XLA pick a transposed layout for it: a copy)
    kj = kp if kp.shape[2] == bk else jax.lax.dynamic_slice_in_dim(kp, j * bk, bk, axis=2)
    s = grouped_dot(qb, kj.astype(jnp.float32))
    k_pos = j * bk + jnp.arange(bk)
    return jnp.where((k_pos <= q_pos[:, None]) & (k_pos < kv_len), s, NEG_INF)


def unit_sums(x: jax.Array, unit: int) -> jax.Array:
    """Sum each run of ``unit`` keys: ``[..., n]`` -> ``[..., n / unit]`` (``n`` a multiple of ``unit``)."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // unit, unit).sum(axis=-1)


def pool_query_tiles(p: jax.Array, pool: Pool, q_tile: int) -> jax.Array:
    """Pool a query block's probabilities per query tile: ``p: [batch, kv_heads, group, bq, n]`` (``n`` keys or key
    units, ``bq = tpb * q_tile``) -> ``[batch, kv_heads, sets, tpb, n]`` (`pooled_scores` of each tile)."""
    b, h, g, bq, n = p.shape
    p = jnp.moveaxis(p.reshape(b, h, g, bq // q_tile, q_tile, n), 3, 0)
    return jnp.moveaxis(jax.vmap(lambda x: pooled_scores(x, pool, 1))(p), 0, 3)


def softmax_step(s: jax.Array, m: jax.Array, total: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One key block of an online softmax: scores ``s: [..., bk]``, running maximum and normaliser ``m, total: [...]``
    -> the new maximum and normaliser, the factor ``corr: [...]`` that rescales earlier sums to the new maximum, and
    the block's exponentials ``e: [..., bk]``."""
    m_new = jnp.maximum(m, s.max(axis=-1))
    corr, e = jnp.exp(m - m_new), jnp.exp(s - m_new[..., None])
    return m_new, total * corr + e.sum(axis=-1), corr, e


def query_weights(total: jax.Array, real: jax.Array) -> jax.Array:
    """``1 / total`` per query (``[batch, kv_heads, group, bq]``), 0 for the padded queries (``real: [bq]`` False):
    they do not vote."""
    return jnp.where(real, 1.0 / jnp.maximum(total, 1e-30), 0.0)


def empty_stats(qb: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Running softmax maximum (``NEG_INF``) and normaliser (0), ``[..., bq]`` each, for the queries ``qb: [..., bq,
    d]``."""
    return jnp.full(qb.shape[:-1], NEG_INF, jnp.float32), jnp.zeros(qb.shape[:-1], jnp.float32)


def single_block_scores(qb: jax.Array, kp: jax.Array, q_pos: jax.Array, real: jax.Array, kv_len: Any, *, q_tile: int,
                        unit: int, pool: Pool, own_key: jax.Array | None = None) -> jax.Array:
    """The whole cache as one key block (decode, or a cache of at most ``block_k`` keys): one exact softmax.

    qb: scaled ``[batch, kv_heads, group, bq, d]`` at ``q_pos: [bq]`` (``real``: not padding); kp: ``[batch, kv_heads,
    L', d]``, ``L'`` a multiple of ``unit``; ``own_key`` (a decode step, ``bq == 1``): the query's own key
    ``[batch, kv_heads, 1, d]``, scored in place of the not yet written cache slot ``q_pos``. Returns the pooled unit
    scores ``[batch, kv_heads, sets, tpb, L' / unit]``."""
    s = block_scores(qb, kp, jnp.int32(0), q_pos, kv_len, kp.shape[2])
    if own_key is not None:
        s = jnp.where(jnp.arange(kp.shape[2]) == q_pos[:, None], grouped_dot(qb, own_key.astype(jnp.float32)), s)
    e = jnp.exp(s - s.max(axis=-1, keepdims=True))
    return pool_query_tiles(unit_sums(e, unit) * jnp.where(real, 1.0 / e.sum(axis=-1), 0.0)[..., None], pool, q_tile)


def online_tile_scores(qb: jax.Array, kp: jax.Array, q_pos: jax.Array, real: jax.Array, kv_len: Any, n_kb: jax.Array,
                       *, bk: int, q_tile: int, unit: int, pool: Pool) -> jax.Array:
    """Key tiles (``unit > 1``): one online pass over key blocks ``0 .. n_kb - 1`` of ``bk`` keys.

    Per query it keeps a running softmax maximum and normaliser and the unnormalised mass of every key tile
    ``[batch, kv_heads, group, bq, L' / unit]``, rescaled when the maximum grows (as FlashAttention rescales its
    output), then normalises and pools. Arguments as `single_block_scores`; returns ``[batch, kv_heads, sets, tpb,
    L' / unit]``."""
    def step(j: jax.Array, state: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        m, total, acc = state
        m, total, corr, e = softmax_step(block_scores(qb, kp, j, q_pos, kv_len, bk), m, total)
        acc = jax.lax.dynamic_update_slice_in_dim(acc * corr[..., None], unit_sums(e, unit), j * (bk // unit), axis=4)
        return m, total, acc

    zeros = jnp.zeros((*qb.shape[:-1], kp.shape[2] // unit), jnp.float32)
    _, total, acc = jax.lax.fori_loop(0, n_kb, step, (*empty_stats(qb), zeros))
    return pool_query_tiles(acc * query_weights(total, real)[..., None], pool, q_tile)


def two_pass_position_scores(qb: jax.Array, kp: jax.Array, q_pos: jax.Array, real: jax.Array, kv_len: Any,
                             n_kb: jax.Array, *, bk: int, q_tile: int, pool: Pool) -> jax.Array:
    """Key positions (``unit == 1``): two passes over key blocks ``0 .. n_kb - 1``, no ``[bq, L]`` state.

    The first pass finds each query's softmax maximum and normaliser; the second recomputes every block's scores as
    probabilities and pools them into its slice of ``[batch, kv_heads, sets, tpb, L']``. Arguments as
    `single_block_scores`."""
    def max_and_sum(j: jax.Array, state: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        return softmax_step(block_scores(qb, kp, j, q_pos, kv_len, bk), *state)[:2]

    m, total = jax.lax.fori_loop(0, n_kb, max_and_sum, empty_stats(qb))
    weight = query_weights(total, real)

    def pool_block(j: jax.Array, acc: jax.Array) -> jax.Array:
        p = jnp.exp(block_scores(qb, kp, j, q_pos, kv_len, bk) - m[..., None]) * weight[..., None]
        return jax.lax.dynamic_update_slice_in_dim(acc, pool_query_tiles(p, pool, q_tile), j * bk, axis=4)

    b, h, g, bq = qb.shape[:4]
    sets = g if pool == "head" else 1
    return jax.lax.fori_loop(0, n_kb, pool_block, jnp.zeros((b, h, sets, bq // q_tile, kp.shape[2]), jnp.float32))


def query_block_scores(qt: jax.Array, first: jax.Array, real: jax.Array, kp: jax.Array, kv_len: Any, *, bk: int,
                       unit: int, pool: Pool, own_key: jax.Array | None = None) -> jax.Array:
    """Pooled unit scores of one block of query tiles, over the key blocks that hold a key visible to it.

    qt: scaled ``[tpb, batch, kv_heads, group, q_tile, d]`` (`query_tiles`), its first query at position ``first``;
    ``real: [tpb * q_tile]`` False for padded queries; kp: ``[batch, kv_heads, L', d]``, ``L'`` a multiple of ``bk``.
    Returns ``[batch, kv_heads, sets, tpb, L' / unit]``: `single_block_scores` when ``L' == bk``, else
    `online_tile_scores` (key tiles) or `two_pass_position_scores` (key positions). ``own_key``: see
    `single_block_scores`."""
    tpb, b, h, g, q_tile, d = qt.shape
    bq = tpb * q_tile
    qb = jnp.moveaxis(qt, 0, 3).reshape(b, h, g, bq, d)
    q_pos = first + jnp.arange(bq)
    if kp.shape[2] == bk:
        return single_block_scores(qb, kp, q_pos, real, kv_len, q_tile=q_tile, unit=unit, pool=pool, own_key=own_key)
    n_kb = (jnp.minimum(first + bq, kv_len) + bk - 1) // bk          # key blocks holding a visible key
    if unit > 1:
        return online_tile_scores(qb, kp, q_pos, real, kv_len, n_kb, bk=bk, q_tile=q_tile, unit=unit, pool=pool)
    return two_pass_position_scores(qb, kp, q_pos, real, kv_len, n_kb, bk=bk, q_tile=q_tile, pool=pool)


def tile_topk(scores: jax.Array, start: jax.Array, kv_len: Any, *, q_tile: int, unit: int, k_max: int,
              budget: float | int | jax.Array, min_keys: int, rolling: bool = False, sinks: int = 0,
              recent: int = 0, mass: float | None = None) -> tuple[jax.Array, jax.Array]:
    """Top-k of the query tile starting at ``start``: pooled ``scores: [batch, kv_heads, sets, n_units]`` -> ``(idx,
    keep)`` each ``[batch, kv_heads, sets, k_max]`` (`topk_units`). The units holding the first ``sinks`` positions
    and the ``recent`` positions before ``start`` are forced first; the budget basis is ``kv_len`` or, with
    ``rolling``, the keys visible to the tile. With ``mass`` the row keeps the fewest units that, with the tile's own
    keys, hold that share of its pooled attention (the budget is then the most it may keep)."""
    end = jnp.minimum(start + q_tile, kv_len)                          # keys visible to the tile
    unit_first = jnp.arange(scores.shape[-1]) * unit                   # first position of each unit
    need, raw = None, scores
    if mass is not None:                                               # the share the Top-k adds to the own tile's
        total = scores.sum(axis=-1)
        need = mass * total - (total - jnp.where(unit_first < start, scores, 0.0).sum(axis=-1))
    if sinks or recent:
        scores = jnp.where((unit_first < sinks) | (unit_first + unit > start - recent), scores + FORCED, scores)
    return topk_units(scores, start, end if rolling else kv_len, end - start, k_max=k_max, unit=unit, budget=budget,
                      min_keys=min_keys, need=need, raw=raw)


def select(q: jax.Array, k: jax.Array, q_offset: Any, kv_len: Any, *, q_tile: int, unit: int, pool: Pool,
           budget: float | int | tuple[float, ...], min_keys: int, rolling: bool = False, block_q: int = 256,
           block_k: int = 512, sinks: int = 0, recent: int = 0, mass: float | None = None,
           own_key: jax.Array | None = None) -> Selection:
    """Anchor scoring: exact post-softmax attention of each query tile, pooled, Top-k per row, never a ``[T, L]``
    tensor.

    q: ``[batch, T, heads, d]`` at positions ``q_offset + i``; k: ``[batch, kv_heads, L, d]`` valid below ``kv_len``.
    Query tiles are scored ``block_q`` queries at a time (`query_block_scores`), over the key blocks that hold a
    visible key (``block_k`` keys each; none above the diagonal). With key tiles (``unit > 1``) one pass keeps, per
    query, a running softmax maximum and normaliser and the unnormalised mass of every key tile, rescaled when the
    maximum grows (`online_tile_scores`); with key positions a first pass finds the maxima and normalisers and a
    second recomputes the scores as probabilities (`two_pass_position_scores`), so no ``[block_q, L]`` state is kept.
    Either way the result is the pooled scores ``[batch, kv_heads, sets, tiles, n_units]``. A single-query decode step
    needs no blocking: one pass over the whole cache (`single_block_scores`). Each tile's Top-k is `tile_topk`: the
    budget basis is ``kv_len`` or, with ``rolling``, the keys visible to the tile; ``sinks`` / ``recent``: the units
    holding the first ``sinks`` positions and the ``recent`` positions just before the tile are chosen first (inside
    the same budget; StreamingLLM's sinks and window, Xiao et al. 2023); ``mass``: each row keeps only the fewest
    Top units that hold that share of its pooled attention with the own tile, the budget its maximum. Returns a
    `Selection` with ``n_qtiles = ceil(T / q_tile)`` and a static ``k = ceil((keys_kept(L) - own) / unit)`` (at least 1), where ``own`` is the
    smallest own tile (the last one may be partial). A tile's own keys are its causal keys below ``kv_len``:
    ``q_tile`` of them, or fewer in a partial last tile. ``own_key`` (decode only, ``[batch, kv_heads, 1, d]``): the
    query's own key, not yet written at position ``kv_len - 1`` of ``k``. ``budget`` as a tuple: one fraction per
    KV head (head budgets, `head_budget_values`), ``k`` then covering the largest."""
    if own_key is not None and q.shape[1] != 1:
        raise ValueError(f"own_key is for a single-query decode step, got q{q.shape}")
    kv_heads, _ = check_qkv(q, k, k)
    t, length = q.shape[1], k.shape[2]
    n_t = -(-t // q_tile)
    own_min = t - (n_t - 1) * q_tile
    tpb = max(1, min(block_q // q_tile, n_t))                          # query tiles per block
    bq = tpb * q_tile
    bk = key_block(length, unit, length if t == 1 else block_k)
    kp = pad_to_tiles(k, bk)
    per_head = isinstance(budget, tuple)
    if per_head:
        if len(budget) != kv_heads:
            raise ValueError(f"head budgets {budget} must hold one budget per KV head ({kv_heads})")
        for b in budget:
            check_budget(b)
    widest = max(budget) if per_head else budget
    k_max = max(1, min(-(-length // unit), topk_count(length, own_min, budget=widest, min_keys=min_keys, unit=unit)))
    rows = jnp.asarray(budget, jnp.float32)[:, None] if per_head else budget   # [kv_heads, 1] against [b, h, sets]
    rule = dict(q_tile=q_tile, unit=unit, k_max=k_max, budget=rows, min_keys=min_keys, rolling=rolling,
                sinks=sinks, recent=recent, mass=mass)                 # the Top-k rule of every tile (`tile_topk`)

    def one_block(args: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        qt, i = args                                                   # [tpb, b, h, g, q_tile, d], block number
        first = q_offset + i * bq
        real = i * bq + jnp.arange(bq) < t                             # padded queries do not vote
        scores = query_block_scores(qt, first, real, kp, kv_len, bk=bk, unit=unit, pool=pool, own_key=own_key)
        return jax.vmap(lambda sc, j: tile_topk(sc, first + j * q_tile, kv_len, **rule),
                        in_axes=(3, 0))(scores, jnp.arange(tpb))

    qt = query_tiles(q, kv_heads, q_tile)                              # [n_t, b, h, g, q_tile, d]
    n_blocks = -(-n_t // tpb)
    qt = jnp.pad(qt, [(0, n_blocks * tpb - n_t)] + [(0, 0)] * 5).reshape(n_blocks, tpb, *qt.shape[1:])
    idx, keep = jax.lax.map(one_block, (qt, jnp.arange(n_blocks)))    # [n_blocks, tpb, b, h, sets, k]
    idx, keep = (x.reshape(n_blocks * tpb, *x.shape[2:])[:n_t] for x in (idx, keep))
    return Selection(idx=jnp.moveaxis(idx, 0, 3), keep=jnp.moveaxis(keep, 0, 3), q_tile=q_tile, unit=unit)


# ------------------------------------------------------------------------------------------------ attend
def gather_selected(x: jax.Array, sel: Selection, idx: jax.Array) -> jax.Array:
    """Keys or values of one query tile's selection: ``x: [batch, kv_heads, L, d]``, ``idx: [batch, kv_heads, sets,
    k]`` -> ``[batch, kv_heads, sets, k * unit, d]`` (whole tiles gathered at once when ``L % unit == 0``)."""
    b, h, s, k = idx.shape
    flat = idx.reshape(b, h, s * k)
    if sel.unit > 1 and x.shape[2] % sel.unit == 0:
        out = gather_tiles(x, flat, sel.unit)                          # [b, h, s*k, unit, d]
    else:
        pos = (flat[..., None] * sel.unit + jnp.arange(sel.unit)).reshape(b, h, -1)
        out = gather_positions(x, jnp.minimum(pos, x.shape[2] - 1))
    return out.reshape(b, h, s, k * sel.unit, x.shape[-1])


def attend_tile(qi: jax.Array, k: jax.Array, v: jax.Array, sel: Selection, idx: jax.Array, keep: jax.Array,
                start: jax.Array, n_queries: jax.Array, kv_len: Any,
                own: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """One query tile over its selected keys plus its own tile.

    qi: scaled ``[batch, kv_heads, group, q_tile, d]`` at positions ``start + i`` (``i < n_queries`` are real);
    k, v: ``[batch, kv_heads, L, d]``; idx, keep: ``[batch, kv_heads, sets, k]``; ``own``: the own tile's keys and
    values ``[batch, kv_heads, q_tile, d]`` when they are not in ``k, v`` yet (a decode step), else read from the
    cache. Returns float32 ``[batch, kv_heads, group, q_tile, d]``: one softmax over the selected keys before
    ``start`` and the causal keys of the own tile."""
    tq, n_own = qi.shape[3], min(qi.shape[3], k.shape[2])
    pos = (idx[..., None] * sel.unit + jnp.arange(sel.unit)).reshape(*idx.shape[:3], -1)
    ok = jnp.repeat(keep, sel.unit, axis=-1) & (pos < start)           # [b, h, s, n]
    ks, vs = gather_selected(k, sel, idx), gather_selected(v, sel, idx)
    if ks.shape[2] == 1:                                               # one set per KV head, shared by its group
        s_sel = grouped_dot(qi, ks[:, :, 0].astype(jnp.float32))
    else:                                                              # one set per query head
        s_sel = jnp.einsum("bhgqd,bhgnd->bhgqn", qi, ks.astype(jnp.float32))
    s_sel = jnp.where(ok[:, :, :, None, :], s_sel, NEG_INF)
    first = jnp.clip(start, 0, k.shape[2] - n_own)                     # the own tile, shifted to fit the cache
    own_pos = first + jnp.arange(n_own)
    if own is None:
        ko = jax.lax.dynamic_slice_in_dim(k, first, n_own, axis=2).astype(jnp.float32)
        vo = jax.lax.dynamic_slice_in_dim(v, first, n_own, axis=2).astype(jnp.float32)
    else:
        ko, vo = own[0].astype(jnp.float32), own[1].astype(jnp.float32)
    q_pos = start + jnp.minimum(jnp.arange(tq), n_queries - 1)
    own_ok = (own_pos >= start) & (own_pos <= q_pos[:, None]) & (own_pos < kv_len)   # [tq, n_own]
    s_own = jnp.where(own_ok, jnp.einsum("bhgqd,bhkd->bhgqk", qi, ko), NEG_INF)
    p = jax.nn.softmax(jnp.concatenate([s_sel, s_own], axis=-1), axis=-1)
    p_sel, p_own = p[..., :s_sel.shape[-1]], p[..., s_sel.shape[-1]:]
    if vs.shape[2] == 1:
        out = jnp.einsum("bhgqn,bhnd->bhgqd", p_sel, vs[:, :, 0].astype(jnp.float32))
    else:
        out = jnp.einsum("bhgqn,bhgnd->bhgqd", p_sel, vs.astype(jnp.float32))
    return out + jnp.einsum("bhgqk,bhkd->bhgqd", p_own, vo)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, sel: Selection, q_offset: Any, kv_len: Any,
           chunk: int = 1, own: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """Sparse attention over a `Selection`: every query tile attends its selected keys and its own tile only.

    q: ``[batch, T, heads, d]`` at positions ``q_offset + i``; k, v: ``[batch, kv_heads, L, d]`` (the cache, valid
    below ``kv_len``); ``sel`` with ``ceil(T / sel.q_tile)`` query tiles; ``own``: a decode step's own key and
    value ``[batch, kv_heads, 1, d]`` when they are not in the cache yet. Query tiles are mapped ``chunk`` at a time
    (``lax.map``; one at a time was fastest on CPU: 0.28x flash's time for a 4k Llama-3.1-8B prefill at 10 %, against
    0.31x for 4 and 0.41x for 16), so memory is ``O(T * k)``. Returns ``[batch, T, heads, d]`` in ``q.dtype``."""
    kv_heads, group = check_qkv(q, k, v)
    b, t, _, d = q.shape
    n_t = -(-t // sel.q_tile)
    if own is not None and n_t != 1:
        raise ValueError(f"own keys are for a single query tile (a decode step), got q{q.shape}, q_tile={sel.q_tile}")
    if sel.idx.shape[:2] != (b, kv_heads) or sel.idx.shape[3] != n_t or sel.idx.shape[2] not in (1, group):
        raise ValueError(f"selection idx {sel.idx.shape} must be [batch={b}, kv_heads={kv_heads}, sets=1|{group}, "
                         f"n_qtiles={n_t}, k] for q{q.shape} with q_tile={sel.q_tile}")

    def one_tile(args: tuple[jax.Array, jax.Array, jax.Array, jax.Array]) -> jax.Array:
        qi, idx, keep, i = args
        return attend_tile(qi, k, v, sel, idx, keep, q_offset + i * sel.q_tile,
                           jnp.minimum(t - i * sel.q_tile, sel.q_tile), kv_len, own)

    qt = query_tiles(q, kv_heads, sel.q_tile)
    rows = (qt, jnp.moveaxis(sel.idx, 3, 0), jnp.moveaxis(sel.keep, 3, 0), jnp.arange(n_t))
    out = jax.lax.map(one_tile, rows, batch_size=min(chunk, n_t))      # [n_t, b, h, g, q_tile, d]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, n_t * sel.q_tile, kv_heads * group, d)
    return out[:, :t].astype(q.dtype)


# ------------------------------------------------------------------------------------------------ the policy
SW_SINKS, SW_RECENT = 4, 32
"""Our variant ``kascade_sw`` (`KascadeAttention.kascade_sw`) always keeps the first 4 and the 32 latest key positions
among an anchor's Top-k (inside the same budget), as StreamingLLM keeps sinks and a window. Off by default: the
paper's Kascade is the default, and the variant is measured beside it."""


@dataclass(frozen=True)
class KascadeAttention:
    """Schedule-driven Kascade, a hashable `model.AttentionFn` (prefill from any position, and decode).

    ``schedule`` says which layers are dense / anchor / reuse, whose Top-k each reuse layer takes and through which
    ``[layers, kv_heads]`` head map; ``tile_size``, ``budget`` and ``min_keys`` default to the schedule's. Options:
    ``granularity`` "position" (paper) or "tile" (key tiles of ``tile_size``, the speed variant); ``pool`` "group"
    (Kascade), "all" or "head"; ``remap=False`` ignores the head map; ``anchor_dense=True`` keeps anchor outputs
    dense (filter layers); ``rolling`` budgets each prefill tile by the keys visible to it. ``carry`` is a dict
    ``{anchor layer: Selection}``. ``sinks`` / ``recent`` (our variant, default off): the first ``sinks`` and the
    ``recent`` latest key positions are always among an anchor's Top-k, inside the same budget (see `select`).
    ``mass`` (our adaptive variant, default off): each anchor row keeps the fewest keys that, with its own tile,
    hold that share of its pooled attention, at least ``min_keys`` and at most the budget's count; reuse layers
    inherit those sets, so the keys read per step follow how peaked each head's attention is. A schedule with
    ``head_budgets`` (our variant) gives KV head ``h`` of anchor or dense layer ``l`` the budget ``min(1, budget *
    head_budgets[l][h])`` (a fractional budget only); reuse layers inherit those sets through the head map.
    """

    reads_new_separately: ClassVar[bool] = True  # `model.AttentionFn`: a decode step never copies the cache

    schedule: Schedule
    granularity: Granularity = "position"
    pool: Pool = "group"
    remap: bool = True
    anchor_dense: bool = False
    rolling: bool = False
    tile_size: int | None = None
    budget: float | int | None = None
    min_keys: int | None = None
    sinks: int = 0
    recent: int = 0
    mass: float | None = None

    @classmethod
    def kascade_sw(cls, schedule: Schedule, **options: Any) -> "KascadeAttention":
        """Our variant ``kascade_sw``: Kascade whose anchors always keep ``SW_SINKS`` sinks and the ``SW_RECENT``
        latest positions among their Top-k; ``options`` are the other fields (granularity, budget, ...)."""
        return cls(schedule, sinks=SW_SINKS, recent=SW_RECENT, **options)

    def __post_init__(self) -> None:
        if self.sinks < 0 or self.recent < 0:
            raise ValueError(f"sinks and recent must be >= 0, got sinks={self.sinks}, recent={self.recent}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        if self.tile_size is not None and self.tile_size <= 0:
            raise ValueError(f"tile_size must be positive, got {self.tile_size}")
        check_budget(self.budget_value)
        if self.schedule.head_budgets is not None and isinstance(self.budget_value, int):
            raise ValueError(f"schedule {self.schedule.method!r} has head budgets, which scale a fractional budget; "
                             f"got a key count {self.budget_value}")
        if self.mass is not None and not 0 < self.mass <= 1:
            raise ValueError(f"mass must be a share in (0, 1], got {self.mass}")

    @property
    def q_tile(self) -> int:
        """Queries per prefill tile (and keys per key tile with ``granularity="tile"``)."""
        return self.tile_size or self.schedule.tile_size

    @property
    def budget_value(self) -> float | int:
        """The budget in force: ``budget``, else the schedule's."""
        return self.schedule.budget if self.budget is None else self.budget

    @property
    def min_keys_value(self) -> int:
        """The key floor in force: ``min_keys``, else the schedule's."""
        return self.schedule.min_keys if self.min_keys is None else self.min_keys

    def layer_budget(self, layer: int) -> float | int | tuple[float, ...]:
        """The budget of anchor or dense layer ``layer``: the budget in force, or with the schedule's head budgets
        one fraction per KV head (`head_budget_values`)."""
        hb = self.schedule.head_budgets
        return head_budget_values(self.budget_value, None if hb is None else hb[layer])

    def selection(self, layer: int, q: jax.Array, k: jax.Array, q_offset: Any, kv_len: Any,
                  own_key: jax.Array | None = None) -> Selection:
        """The Top-k of anchor or dense layer ``layer`` for queries ``q: [batch, T, heads, d]`` (decode: ``T == 1``,
        with ``own_key`` when the query's key is not in ``k`` yet)."""
        q_tile = 1 if q.shape[1] == 1 else self.q_tile
        return select(q, k, q_offset, kv_len, q_tile=q_tile, unit=self.q_tile if self.granularity == "tile" else 1,
                      pool=self.pool, budget=self.layer_budget(layer), min_keys=self.min_keys_value,
                      rolling=self.rolling, sinks=self.sinks, recent=self.recent, mass=self.mass, own_key=own_key)

    def __call__(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array, *, q_offset: jax.Array,
                 kv_len: jax.Array, carry: Any, new: tuple[jax.Array, jax.Array] | None = None
                 ) -> tuple[jax.Array, Any]:
        """`model.AttentionFn`. With ``new`` (see `reads_new_separately`) a decode step reads the cache in place and
        its own key and value from ``new``; a prefill writes ``new`` into a copy of the cache first."""
        if layer >= self.schedule.num_layers or k.shape[1] != self.schedule.num_kv_heads:
            raise ValueError(f"schedule for {self.schedule.num_layers} layers x {self.schedule.num_kv_heads} KV heads "
                             f"cannot run layer {layer} with k{k.shape}")
        own = new if q.shape[1] == 1 else None
        if own is None:
            k, v = write_new(k, v, new, q_offset)
        carry = dict(carry or {})
        kind = self.schedule.layer_types[layer]
        if kind == "reuse":
            sel = carry[self.schedule.anchor_of[layer]]
            if self.remap:
                sel = sel.remap(self.schedule.head_map[layer])
            return attend(q, k, v, sel, q_offset, kv_len, own=own), carry
        carry[layer] = sel = self.selection(layer, q, k, q_offset, kv_len, None if own is None else own[0])
        if kind == "dense" or self.anchor_dense:
            if own is not None:
                return gqa_attention_with_new(q, k, v, *own, q_offset=q_offset), carry
            return flash_attention(q, k, v, q_offset=q_offset, kv_len=kv_len), carry
        return attend(q, k, v, sel, q_offset, kv_len, own=own), carry
