"""The slow, obvious versions of Kascade that `kascade_lite.kascade` is checked against.

* `brute_topk`: NumPy, one row at a time: sort the eligible units of a pooled score row (forced sinks / recent units
  first) and keep the first few.
* `selection_mask` + `masked_attention`: a boolean ``[batch, kv_heads, sets, q_len, kv_total]`` mask of the allowed
  keys (selected units before the query tile, plus the tile's own causal keys) and a dense masked softmax.
* `MaskedKascade`: the whole policy written with those (ranks by a double argsort, so it runs under ``jit``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kascade_lite.attention import NEG_INF, attention_probs, check_qkv, grouped_scores
from kascade_lite.kascade import Selection, keys_kept
from kascade_lite.schedule import Schedule


def unit_scores(q: Any, k: Any, q_offset: Any, kv_len: Any, *, q_tile: int, unit: int, pool: str) -> jax.Array:
    """Dense post-softmax attention pooled per pool rule, query tile and key unit:
    ``[batch, kv_heads, sets, n_qtiles, n_units]``."""
    p = attention_probs(jnp.asarray(q), jnp.asarray(k), causal=True, q_offset=q_offset, kv_len=kv_len)
    b, h, g, t, length = p.shape
    if pool == "group":
        p = p.sum(axis=2, keepdims=True)
    elif pool == "all":
        p = jnp.broadcast_to(p.sum(axis=(1, 2), keepdims=True), (b, h, 1, t, length))
    n_t, n_u = -(-t // q_tile), -(-length // unit)
    p = jnp.pad(p, [(0, 0)] * 3 + [(0, n_t * q_tile - t), (0, n_u * unit - length)])
    return p.reshape(*p.shape[:3], n_t, q_tile, n_u, unit).sum(axis=(4, 6))


def tile_starts(q_len: int, q_tile: int, q_offset: Any) -> jax.Array:
    """Absolute position of the first query of every query tile, ``[n_qtiles]``."""
    return jnp.arange(-(-q_len // q_tile)) * q_tile + q_offset


def units_to_keep(start: Any, q_tile: int, unit: int, kv_len: Any, *, budget: Any, min_keys: int,
                  rolling: bool) -> Any:
    """How many units a row keeps, written out: the budget minus the own tile's keys, at most the keys before it."""
    end = jnp.minimum(start + q_tile, kv_len)                                   # the tile sees keys [0, end)
    basis = end if rolling else jnp.broadcast_to(kv_len, jnp.shape(start))
    k_keys = jnp.minimum(jnp.maximum(keys_kept(jnp.asarray(basis), budget, min_keys) - (end - start), 0), start)
    return -(-k_keys // unit)


def forced_units(n_units: int, start: int, unit: int, sinks: int, recent: int) -> np.ndarray:
    """Bool ``[n_units]``: the units holding one of the first ``sinks`` positions or one of the ``recent`` positions
    just before ``start``, written out position by position."""
    wanted = set(range(sinks)) | set(range(start - recent, start))
    return np.array([any(p in wanted for p in range(u * unit, (u + 1) * unit)) for u in range(n_units)], bool)


def brute_topk(scores: np.ndarray, q_len: int, q_offset: int, kv_len: int, *, q_tile: int, unit: int,
               budget: Any, min_keys: int, rolling: bool = False, sinks: int = 0, recent: int = 0,
               mass: float | None = None) -> np.ndarray:
    """Chosen units, bool ``[batch, kv_heads, sets, n_qtiles, n_units]``, one sorted row at a time: the eligible
    `forced_units` first, then the rest, each by descending score. With ``mass``: the shortest prefix of that order
    whose scores, plus the scores outside the eligible units (the own tile), reach ``mass`` of the row's total,
    lengthened to the floor's ``min(basis, min_keys)`` keys and cut to the budget's count. ``budget`` as a tuple:
    one budget per KV head (head budgets), each head's rows counted with its own."""
    scores = np.asarray(scores, np.float64)
    chosen = np.zeros(scores.shape, bool)
    starts = np.asarray(tile_starts(q_len, q_tile, q_offset))
    per_head = budget if isinstance(budget, tuple) else (budget,) * scores.shape[1]
    counts = [np.asarray(units_to_keep(jnp.asarray(starts), q_tile, unit, kv_len, budget=b, min_keys=min_keys,
                                       rolling=rolling)) for b in per_head]
    forced = [forced_units(scores.shape[-1], int(start), unit, sinks, recent) for start in starts]
    for b, h, s, t in np.ndindex(*scores.shape[:4]):
        eligible = np.flatnonzero(np.arange(scores.shape[-1]) * unit < starts[t])
        order = np.lexsort((-scores[b, h, s, t, eligible], ~forced[t][eligible]))   # forced first, then by score
        count = counts[h][t]
        if mass is not None:
            row = scores[b, h, s, t]
            own_mass = row.sum() - row[eligible].sum()
            prefix = own_mass + np.concatenate([[0.0], np.cumsum(row[eligible][order])])
            reach = next((n for n, m in enumerate(prefix) if m >= mass * row.sum()), len(eligible))
            end = min(starts[t] + q_tile, kv_len)
            basis = end if rolling else kv_len
            floor = -(-min(max(min(basis, min_keys) - (end - starts[t]), 0), starts[t]) // unit)
            count = min(max(reach, floor), count)
        best = eligible[order][:count]
        chosen[b, h, s, t, best] = True
    return chosen


def chosen_units(sel: Selection, n_units: int) -> np.ndarray:
    """A `Selection` as bool ``[batch, kv_heads, sets, n_qtiles, n_units]``."""
    idx, keep = np.asarray(sel.idx), np.asarray(sel.keep)
    out = np.zeros(idx.shape[:-1] + (n_units,), bool)
    for pos in np.ndindex(*idx.shape):
        if keep[pos]:
            out[pos[:-1] + (idx[pos],)] = True
    return out


def selection_mask(chosen: Any, q_len: int, kv_total: int, *, q_tile: int, unit: int, q_offset: Any,
                   kv_len: Any) -> jax.Array:
    """Bool ``[batch, kv_heads, sets, q_len, kv_total]``: the chosen units strictly before the query's tile, plus the
    tile's own keys up to the query, below ``kv_len``."""
    chosen = jnp.repeat(jnp.asarray(chosen), unit, axis=-1)[..., :kv_total]
    chosen = jnp.repeat(chosen, q_tile, axis=-2)[..., :q_len, :]
    q_pos = q_offset + jnp.arange(q_len)
    start = tile_starts(q_len, q_tile, q_offset)[jnp.arange(q_len) // q_tile]
    k_pos = jnp.arange(kv_total)
    before = (k_pos < start[:, None]) & chosen
    own = (k_pos >= start[:, None]) & (k_pos <= q_pos[:, None])
    return (before | own) & (k_pos < kv_len)


def masked_attention(q: Any, k: Any, v: Any, mask: Any) -> jax.Array:
    """Dense GQA softmax over the allowed keys only: q ``[batch, q_len, heads, d]``, k, v ``[batch, kv_heads,
    kv_total, d]``, mask bool ``[batch, kv_heads, 1 | group, q_len, kv_total]`` -> ``[batch, q_len, heads, d]``."""
    kv_heads, group = check_qkv(q, k, v)
    s = jnp.where(mask, grouped_scores(q, k), NEG_INF)
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum("bhgqk,bhkd->bqhgd", p, v.astype(jnp.float32))
    return out.reshape(q.shape[0], q.shape[1], kv_heads * group, q.shape[-1]).astype(q.dtype)


def ranked_choice(scores: jax.Array, q_len: int, q_offset: Any, kv_len: Any, *, q_tile: int, unit: int, budget: Any,
                  min_keys: int, rolling: bool) -> jax.Array:
    """`brute_topk` written with ranks (a double argsort) so that it traces under ``jit``."""
    starts = tile_starts(q_len, q_tile, q_offset)
    eligible = jnp.arange(scores.shape[-1]) * unit < starts[:, None]            # [n_t, n_units]
    masked = jnp.where(eligible, scores, -jnp.inf)
    rank = jnp.argsort(jnp.argsort(-masked, axis=-1, stable=True), axis=-1)
    count = units_to_keep(starts, q_tile, unit, kv_len, budget=budget, min_keys=min_keys, rolling=rolling)
    return eligible & (rank < count[:, None])


@dataclass(frozen=True)
class MaskedKascade:
    """Kascade as masks: the same schedule semantics as `kascade.KascadeAttention`, none of its speed.
    ``carry``: ``{anchor layer: chosen units [batch, kv_heads, sets, n_qtiles, n_units]}``."""

    schedule: Schedule
    granularity: str = "position"
    pool: str = "group"
    remap: bool = True
    anchor_dense: bool = False
    rolling: bool = False

    def __call__(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array, *, q_offset: Any, kv_len: Any,
                 carry: Any) -> tuple[jax.Array, Any]:
        carry = dict(carry or {})
        sch, q_len, kv_total = self.schedule, q.shape[1], k.shape[2]
        q_tile = 1 if q_len == 1 else sch.tile_size
        unit = sch.tile_size if self.granularity == "tile" else 1
        kind = sch.layer_types[layer]
        if kind == "reuse":
            chosen = carry[sch.anchor_of[layer]]
            if self.remap:
                chosen = chosen[:, jnp.asarray(sch.head_map[layer])]
        else:
            scores = unit_scores(q, k, q_offset, kv_len, q_tile=q_tile, unit=unit, pool=self.pool)
            chosen = carry[layer] = ranked_choice(scores, q_len, q_offset, kv_len, q_tile=q_tile, unit=unit,
                                                  budget=sch.budget, min_keys=sch.min_keys, rolling=self.rolling)
            if kind == "dense" or self.anchor_dense:
                return masked_attention(q, k, v, _causal(q_len, kv_total, q_offset, kv_len)), carry
        mask = selection_mask(chosen, q_len, kv_total, q_tile=q_tile, unit=unit, q_offset=q_offset, kv_len=kv_len)
        return masked_attention(q, k, v, mask), carry


def _causal(q_len: int, kv_total: int, q_offset: Any, kv_len: Any) -> jax.Array:
    """The dense causal mask ``[q_len, kv_total]`` below ``kv_len``."""
    k_pos = jnp.arange(kv_total)
    return (k_pos <= q_offset + jnp.arange(q_len)[:, None]) & (k_pos < kv_len)
