r"""Kascade sparse attention: exact Top-k in a few *anchor* layers, reused by the layers in between.

An anchor layer computes the exact post-softmax attention :math:`P = \mathrm{softmax}(QK^\top/\sqrt d)`
(``[batch, kv_heads, group, q_len, kv_len]``), pools it over the ``group`` query heads that share a KV head — and,
in prefill, over a *query tile* of ``tile_size`` consecutive queries — and keeps the Top-k keys of every (KV head,
query tile):

.. math:: S_{h,t,j} = \sum_{g}\sum_{i \in \text{tile } t} P_{h,g,i,j}, \qquad
          I_{h,t} = \operatorname{TopK}_{j < \text{start}(t)} S_{h,t,j}.

Keys are chosen from the keys *strictly before* the query tile; the tile's own (causal) keys are always attended.
A *reuse* layer skips the scoring: KV head ``h`` of reuse layer ``l`` attends to the set its anchor chose for head
``head_map[l][h]`` and computes a fresh softmax over that set only. Layer 0 is always dense (its attention is flat)
but still emits Top-k indices, so the layers after it can reuse them.

Decode (``q_len == 1``) is the same algorithm with a query tile of one token: a per-token Top-k over the cache.

Selections are kept either as key **positions** (the paper) or as key **tiles** of ``tile_size`` keys (the block
form a tiled kernel wants). The attend step here is the clear reference: build a boolean mask
``[batch, kv_heads, heads_per_set, q_len, kv_total]`` from the selection and run a masked softmax (`masked_attention`);
`gather_attention` is the equivalent gather form for decode. Fast kernels live in `kernels.py`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import jax
import jax.numpy as jnp

from .attention import NEG_INF, attention_probs, causal_mask, check_qkv, grouped_scores
from .schedule import Schedule

Granularity = Literal["tile", "position"]
Pool = Literal["group", "all", "head"]
GRANULARITIES = ("tile", "position")
POOLS = ("group", "all", "head")


# ------------------------------------------------------------------------------------------------ budget
def budget_keys(num_keys: Any, budget: float | int, min_keys: int = 0) -> Any:
    """How many keys to keep out of ``num_keys`` (a Python int or an int array).

    ``budget`` is a fraction in (0, 1] (``ceil(budget * n)``, raised to the floor ``min_keys``) when it is a float,
    a fixed count of keys when it is an int. Never more than ``num_keys``.
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0:
        raise ValueError(f"budget must be a positive fraction (float) or key count (int), got {budget!r}")
    if isinstance(budget, float) and budget > 1:
        raise ValueError(f"a fractional budget must be in (0, 1], got {budget}")
    if isinstance(num_keys, int):
        k = budget if isinstance(budget, int) else math.ceil(budget * num_keys)
        return min(num_keys, max(k, min_keys))
    n = jnp.asarray(num_keys, jnp.int32)
    k = jnp.full_like(n, budget) if isinstance(budget, int) else jnp.ceil(budget * n).astype(jnp.int32)
    return jnp.minimum(n, jnp.maximum(k, min_keys))


# ------------------------------------------------------------------------------------------------ selection
@jax.tree_util.register_dataclass
@dataclass
class Selection:
    """The Top-k an anchor hands to its reuse layers.

    ``idx``: ``[batch, kv_heads, sets, n_qtiles, k]`` int32, key positions (``unit == 1``) or key-tile numbers
    (key tile ``u`` covers positions ``[u*unit, (u+1)*unit)``); ``keep``: same shape, bool — False for padding
    entries (rank past the budget, or fewer eligible keys than ``k``). ``sets`` is 1 when the query heads of a group
    share one set, ``group`` for per-query-head selection. ``q_tile`` queries share each row.
    """

    idx: jax.Array
    keep: jax.Array
    q_tile: int = field(metadata=dict(static=True))
    unit: int = field(metadata=dict(static=True))

    def remap(self, head_map: tuple[int, ...]) -> "Selection":
        """The selection seen by a reuse layer: its KV head ``h`` takes the anchor's head ``head_map[h]``."""
        hm = jnp.asarray(head_map, jnp.int32)
        return dataclasses.replace(self, idx=self.idx[:, hm], keep=self.keep[:, hm])


def pool_scores(p: jax.Array, q_tile: int, pool: Pool = "group") -> jax.Array:
    """Pool post-softmax attention ``p: [batch, kv_heads, group, q_len, kv]`` into per-set tile scores
    ``[batch, kv_heads, sets, n_qtiles, kv]``.

    ``pool="group"`` sums the query heads of each GQA group (sets=1, Kascade); ``"all"`` sums every query head and
    shares the result with all KV heads (sets=1); ``"head"`` keeps each query head (sets=group, oracle). Queries are
    summed over tiles of ``q_tile`` (the last tile zero-padded).
    """
    b, h, g, q_len, kv = p.shape
    if pool == "group":
        p = p.sum(axis=2, keepdims=True)
    elif pool == "all":
        p = p.sum(axis=(1, 2), keepdims=True)
    elif pool != "head":
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    n_t = -(-q_len // q_tile)
    p = jnp.pad(p, [(0, 0)] * 3 + [(0, n_t * q_tile - q_len), (0, 0)])
    s = p.reshape(*p.shape[:3], n_t, q_tile, kv).sum(axis=4)
    return jnp.broadcast_to(s, (b, h, s.shape[2], n_t, kv))


def tile_scores(scores: jax.Array, unit: int) -> jax.Array:
    """Sum key scores ``[..., kv]`` over key tiles of ``unit`` keys: ``[..., ceil(kv / unit)]`` (last tile padded)."""
    if unit == 1:
        return scores
    kv = scores.shape[-1]
    n_u = -(-kv // unit)
    scores = jnp.pad(scores, [(0, 0)] * (scores.ndim - 1) + [(0, n_u * unit - kv)])
    return scores.reshape(*scores.shape[:-1], n_u, unit).sum(axis=-1)


def tile_starts(q_len: int, q_tile: int, q_offset: Any = 0) -> jax.Array:
    """Absolute position of the first query of each query tile: ``[ceil(q_len / q_tile)]`` int32."""
    return (jnp.arange(-(-q_len // q_tile)) * q_tile + q_offset).astype(jnp.int32)


def select_topk(unit_scores: jax.Array, starts: jax.Array, kv_len: Any, *, q_tile: int, unit: int,
                budget: float | int, min_keys: int = 0, rolling: bool = False) -> Selection:
    """Top-k key units (positions or tiles) per row, among the keys strictly before each query tile.

    unit_scores: ``[batch, kv_heads, sets, n_qtiles, n_units]`` (higher is better); starts: ``[n_qtiles]`` absolute
    position of each tile's first query. A unit is eligible iff its first key is before the tile start. The
    number of keys kept per row is ``budget_keys(kv_len)`` (``rolling=False``) or ``budget_keys(start)`` (rolling:
    proportional to the keys that precede the tile) minus the ``q_tile`` keys of the tile itself (always attended),
    capped by the preceding keys and rounded up to whole units.
    """
    n_units = unit_scores.shape[-1]
    unit_start = jnp.arange(n_units) * unit
    eligible = unit_start[None, :] < starts[:, None]                                   # [n_qtiles, n_units]
    k_max = min(n_units, -(-budget_keys(n_units * unit, budget, min_keys) // unit))   # static
    basis = starts if rolling else jnp.broadcast_to(jnp.asarray(kv_len, jnp.int32), starts.shape)
    own = jnp.clip(jnp.asarray(kv_len, jnp.int32) - starts, 1, q_tile)  # the tile's own keys: always attended,
    k_keys = jnp.clip(budget_keys(basis, budget, min_keys) - own, 0, starts)           # counted in the budget
    k_units = -(-k_keys // unit)
    vals, idx = jax.lax.top_k(jnp.where(eligible, unit_scores, NEG_INF), k_max)
    keep = (jnp.arange(k_max) < k_units[:, None]) & (vals > NEG_INF / 2)
    return Selection(idx=idx.astype(jnp.int32), keep=keep, q_tile=q_tile, unit=unit)


def selection_mask(sel: Selection, q_len: int, kv_total: int, q_offset: Any = 0, kv_len: Any = None) -> jax.Array:
    """Boolean ``[batch, kv_heads, sets, q_len, kv_total]``: the selected keys of each query's tile, plus the keys of
    the query's own tile, intersected with the causal mask (and ``kv_len``)."""
    b, h, s, n_t, _ = sel.idx.shape
    n_units = -(-kv_total // sel.unit)
    grid = jnp.ogrid[:b, :h, :s, :n_t, :1]
    chosen = jnp.zeros((b, h, s, n_t, n_units), bool).at[(*grid[:4], sel.idx)].set(sel.keep)
    chosen = jnp.repeat(chosen, sel.unit, axis=-1)[..., :kv_total]
    chosen = jnp.repeat(chosen, sel.q_tile, axis=-2)[..., :q_len, :]
    own_start = tile_starts(q_len, sel.q_tile, q_offset)[jnp.arange(q_len) // sel.q_tile]       # [q_len]
    own = jnp.arange(kv_total)[None, :] >= own_start[:, None]
    return (chosen | own) & causal_mask(q_len, kv_total, q_offset, kv_len)


# ------------------------------------------------------------------------------------------------ attend
def _weighted_values(p: jax.Array, v: jax.Array, out_dtype: Any) -> jax.Array:
    """``p: [b, kv_heads, group, q, kv]`` times ``v: [b, kv, kv_heads, d]`` -> ``[b, q, kv_heads*group, d]``."""
    b, h, g, t, _ = p.shape
    out = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h * g, v.shape[-1]).astype(out_dtype)


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Reference sparse attention: softmax over the allowed keys only.

    q: ``[batch, q_len, heads, head_dim]``; k, v: ``[batch, kv_total, kv_heads, head_dim]``; mask: bool
    ``[batch, kv_heads, 1 | group, q_len, kv_total]``. Returns ``[batch, q_len, heads, head_dim]``. With the causal
    mask it is exactly `attention.gqa_attention`.
    """
    check_qkv(q, k, v)
    s = jnp.where(mask, grouped_scores(q, k), NEG_INF)
    return _weighted_values(jax.nn.softmax(s, axis=-1), v, q.dtype)


def gather_attention(q: jax.Array, k: jax.Array, v: jax.Array, sel: Selection, q_offset: Any) -> jax.Array:
    """Decode-time sparse attention by gathering the selected keys (equivalent to `masked_attention` with
    `selection_mask`, without touching the rest of the cache).

    q: ``[batch, 1, heads, head_dim]``; k, v: ``[batch, kv_total, kv_heads, head_dim]``; ``sel`` from a one-token
    query tile. Gathers ``k * unit`` keys plus the query's own key per (KV head, set). Returns ``[batch, 1, heads,
    head_dim]``.
    """
    kv_heads, group = check_qkv(q, k, v)
    if q.shape[1] != 1 or sel.q_tile != 1:
        raise ValueError(f"gather_attention is for decode (one query, q_tile=1), got q{q.shape}, q_tile={sel.q_tile}")
    b, _, _, d = q.shape
    pos = (sel.idx[..., 0, :, None] * sel.unit + jnp.arange(sel.unit)).reshape(*sel.idx.shape[:3], -1)  # [b,h,s,n]
    keep = jnp.repeat(sel.keep[..., 0, :], sel.unit, axis=-1) & (pos < q_offset)
    own = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), pos.shape[:3] + (1,))
    pos = jnp.concatenate([jnp.minimum(pos, k.shape[1] - 1), own], axis=-1)
    keep = jnp.concatenate([keep, jnp.ones(own.shape, bool)], axis=-1)
    kt, vt = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)                       # [b, kv_heads, kv_total, d]
    gather = jax.vmap(jax.vmap(lambda x, i: x[i], in_axes=(0, 0)), in_axes=(0, 0))   # over batch, kv heads
    k_sel, v_sel = gather(kt, pos), gather(vt, pos)                                   # [b, h, s, n, d]
    qg = q.reshape(b, kv_heads, group, d)
    s = jnp.einsum("bhgd,bhgnd->bhgn", qg, jnp.broadcast_to(k_sel, (b, kv_heads, group) + k_sel.shape[3:]),
                   preferred_element_type=jnp.float32) * d ** -0.5
    p = jax.nn.softmax(jnp.where(keep, s, NEG_INF), axis=-1)
    out = jnp.einsum("bhgn,bhgnd->bhgd", p.astype(v.dtype),
                     jnp.broadcast_to(v_sel, (b, kv_heads, group) + v_sel.shape[3:]), preferred_element_type=jnp.float32)
    return out.reshape(b, 1, kv_heads * group, d).astype(q.dtype)


# ------------------------------------------------------------------------------------------------ the policy
@dataclass(frozen=True)
class KascadeAttention:
    """Schedule-driven Kascade attention, a hashable `model.AttentionFn`.

    ``schedule`` says which layers are dense/anchor/reuse, whose Top-k each reuse layer takes and through which
    head map. ``tile_size``, ``budget`` and ``min_keys`` default to the schedule's. Options (for the ablations in
    `baselines.py`): ``granularity`` "position" (paper) or "tile" (key tiles of ``tile_size``); ``pool`` "group"
    (Kascade), "all" (one set for all heads) or "head" (per query head); ``remap=False`` ignores the head map;
    ``anchor_dense=True`` keeps the anchors' own outputs dense (filter layers); ``rolling`` budgets each prefill tile
    by the keys before it. ``carry`` is a dict ``{anchor layer: Selection}``.
    """

    schedule: Schedule
    granularity: Granularity = "position"
    pool: Pool = "group"
    remap: bool = True
    anchor_dense: bool = False
    rolling: bool = False
    tile_size: int | None = None
    budget: float | int | None = None
    min_keys: int | None = None

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        if self.tile_size is not None and self.tile_size <= 0:
            raise ValueError(f"tile_size must be positive, got {self.tile_size}")
        budget_keys(1, self.budget if self.budget is not None else self.schedule.budget)  # validates

    @property
    def q_tile(self) -> int:
        return self.tile_size or self.schedule.tile_size

    def _select(self, p: jax.Array, q_len: int, q_offset: Any, kv_len: Any) -> Selection:
        """Anchor step: pooled exact attention ``p: [b, kv_heads, group, q_len, kv_total]`` -> Top-k `Selection`."""
        q_tile = 1 if q_len == 1 else self.q_tile
        unit = self.q_tile if self.granularity == "tile" else 1
        scores = tile_scores(pool_scores(p, q_tile, self.pool), unit)
        budget = self.schedule.budget if self.budget is None else self.budget
        min_keys = self.schedule.min_keys if self.min_keys is None else self.min_keys
        return select_topk(scores, tile_starts(q_len, q_tile, q_offset), kv_len, q_tile=q_tile, unit=unit,
                           budget=budget, min_keys=min_keys, rolling=self.rolling)

    def __call__(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array, *, q_offset: jax.Array,
                 kv_len: jax.Array, carry: Any) -> tuple[jax.Array, Any]:
        if layer >= self.schedule.num_layers or k.shape[2] != self.schedule.num_kv_heads:
            raise ValueError(f"schedule for {self.schedule.num_layers} layers x {self.schedule.num_kv_heads} KV heads "
                             f"cannot run layer {layer} with k{k.shape}")
        carry = dict(carry or {})
        q_len, kv_total = q.shape[1], k.shape[1]
        kind = self.schedule.layer_types[layer]
        if kind == "reuse":
            sel = carry[self.schedule.anchor_of[layer]]
            if self.remap:
                sel = sel.remap(self.schedule.head_map[layer])
            mask = selection_mask(sel, q_len, kv_total, q_offset, kv_len)
            return masked_attention(q, k, v, mask), carry
        p = attention_probs(q, k, causal=True, q_offset=q_offset, kv_len=kv_len)
        sel = self._select(p, q_len, q_offset, kv_len)
        carry[layer] = sel
        if kind == "anchor" and not self.anchor_dense:  # softmax renormalised over the anchor's own Top-k
            return masked_attention(q, k, v, selection_mask(sel, q_len, kv_total, q_offset, kv_len)), carry
        return _weighted_values(p, v, q.dtype), carry
