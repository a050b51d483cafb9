"""Baselines for Kascade, in the same harness: each is a hashable `model.AttentionFn` with the same key budget.

| name | one line | citation |
|---|---|---|
| dense | exact causal attention in every layer (`model.dense_attention`) | Vaswani et al. 2017 |
| oracle | every layer an anchor, Top-k per query head and per query, no pooling: the ceiling of Top-k attention | Kascade, Deshmukh et al. 2025 (§ oracle) |
| kascade_no_remap | Kascade with the identity head map (KV head h reuses anchor head h) | Kascade ablation |
| all_heads_pooled | Kascade pooling over *all* query heads: one key set shared by every KV head | Kascade ablation |
| sink_window | 4 attention-sink tokens plus a sliding window of recent keys | StreamingLLM, Xiao et al. 2023 |
| quest | pages of 16 keys; per-page key min/max give an upper bound on q·k; per query head the query's own page plus the Top pages before it | Quest, Tang et al. 2024 |
| omnikv | a few dense "filter" layers choose tokens (pooled over all heads) that the following layers reuse | OmniKV, Hao et al. 2025 |
| tidal | decode: layers 0-1 dense, two token-selection layers (2 and one mid-stack) pick Top-k positions that every other layer reuses | TidalDecode, Yang et al. 2024 |

Their names and one-line descriptions, for the harnesses, are `kascade_lite.methods`. Every sparse baseline runs on
`kascade.py`: its key sets are `kascade.Selection` rows attended by `kascade.attend` (a gather over the cache), at
the budget of `kascade.keys_kept` (own key or tile included), so that the comparison is at equal keys per query.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from .attention import NEG_INF, check_qkv
from .kascade import KascadeAttention, Pool, Selection, attend, check_budget, keys_kept
from .kernels import flash_attention
from .schedule import Schedule


def flash_dense_attention(layer: int, q: jax.Array, k: jax.Array, v: jax.Array, *, q_offset: jax.Array,
                          kv_len: jax.Array, carry: Any) -> tuple[jax.Array, Any]:
    """`model.AttentionFn` for dense attention through :func:`kernels.flash_attention` (no ``[T, L]`` scores)."""
    return flash_attention(q, k, v, q_offset=q_offset, kv_len=kv_len), carry


def oracle_topk(num_layers: int, num_kv_heads: int, *, budget: float | int = 0.1, min_keys: int = 128,
                model: str = "model") -> KascadeAttention:
    """Oracle Top-k: every layer after 0 is an anchor that keeps its own exact Top-k per query head and per query
    token (no pooling, no reuse) — the accuracy ceiling of Top-k attention at this budget (Deshmukh et al. 2025)."""
    sched = Schedule.from_anchors(model, num_layers, num_kv_heads, list(range(1, num_layers)), tile_size=1,
                                  budget=float(budget) if isinstance(budget, float) else 1.0, min_keys=min_keys,
                                  method="oracle")
    return KascadeAttention(sched, pool="head", budget=budget)


def kascade_no_remap(schedule: Schedule, **options: Any) -> KascadeAttention:
    """Kascade without head remapping: reuse KV head h takes anchor head h (ablation, Deshmukh et al. 2025)."""
    return KascadeAttention(schedule, remap=False, **options)


def all_heads_pooled(schedule: Schedule, **options: Any) -> KascadeAttention:
    """Kascade with one key set per anchor pooled over all query heads and shared by all KV heads (ablation,
    Deshmukh et al. 2025)."""
    return KascadeAttention(schedule, pool="all", **options)


def omnikv(schedule: Schedule, **options: Any) -> KascadeAttention:
    """OmniKV-style (Hao et al. 2025): the schedule's anchors are dense *filter* layers; each picks the Top-k tokens
    by attention pooled over all heads, and the following layers attend to them, with no head awareness."""
    return KascadeAttention(schedule, pool="all", remap=False, anchor_dense=True, **options)


def sink_window_selection(q_len: int, kv_total: int, q_offset: Any, kv_len: Any, *, batch: int, kv_heads: int,
                          budget: float | int, min_keys: int, sinks: int = 4) -> Selection:
    """StreamingLLM's key set per query (a `Selection` with one-query tiles): the first ``sinks`` keys plus the most
    recent keys before the query, ``keys_kept(kv_len)`` in all with the query's own key. Shapes
    ``[batch, kv_heads, 1, q_len, k]`` with the static ``k = keys_kept(kv_total) - 1``."""
    k_max = max(1, keys_kept(kv_total, budget, min_keys) - 1)
    q_pos = (q_offset + jnp.arange(q_len))[:, None]                                 # [q_len, 1]
    n_sinks = min(sinks, k_max)
    window = jnp.maximum(keys_kept(jnp.asarray(kv_len), budget, min_keys) - 1 - n_sinks, 0)
    recent = q_pos - 1 - jnp.arange(k_max - n_sinks)                                # newest first
    idx = jnp.concatenate([jnp.broadcast_to(jnp.arange(n_sinks), (q_len, n_sinks)), recent], axis=1)
    keep = jnp.concatenate([jnp.arange(n_sinks) < q_pos, (jnp.arange(k_max - n_sinks) < window)
                            & (recent >= n_sinks)], axis=1)
    shape = (batch, kv_heads, 1, q_len, k_max)
    return Selection(idx=jnp.broadcast_to(jnp.maximum(idx, 0), shape).astype(jnp.int32),
                     keep=jnp.broadcast_to(keep, shape), q_tile=1, unit=1)


@dataclass(frozen=True)
class SinkWindowAttention:
    """StreamingLLM (Xiao et al. 2023): ``sinks`` attention-sink tokens plus a sliding window, at the same key budget
    as Kascade (per query token). Layers in ``dense_layers`` stay dense."""

    budget: float | int = 0.1
    min_keys: int = 128
    sinks: int = 4
    dense_layers: tuple[int, ...] = (0,)

    def __call__(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array, *, q_offset: jax.Array,
                 kv_len: jax.Array, carry: Any) -> tuple[jax.Array, Any]:
        if layer in self.dense_layers:
            return flash_attention(q, k, v, q_offset=q_offset, kv_len=kv_len), carry
        sel = sink_window_selection(q.shape[1], k.shape[2], q_offset, kv_len, batch=q.shape[0], kv_heads=k.shape[1],
                                    budget=self.budget, min_keys=self.min_keys, sinks=self.sinks)
        return attend(q, k, v, sel, q_offset, kv_len), carry


def sink_window_tiles(tile_pos: jax.Array, keep: int) -> jax.Array:
    """Key tiles of StreamingLLM at tile granularity: tile 0 (the attention sinks) plus the ``keep - 1`` most recent
    tiles up to ``tile_pos`` (the query's own tile); ``arange(keep)`` while ``tile_pos < keep`` (keys at or after
    the query are left to the own tile by `kascade.attend`). tile_pos: ``[n]`` int -> ``[n, keep]`` distinct int32."""
    tile_pos = jnp.asarray(tile_pos, jnp.int32)[:, None]
    recent = tile_pos - (keep - 2) + jnp.arange(keep - 1)          # [n, keep - 1], ends at the query's tile
    window = jnp.concatenate([jnp.zeros_like(tile_pos), recent], axis=1)
    return jnp.where(tile_pos < keep, jnp.arange(keep), window).astype(jnp.int32)


@dataclass(frozen=True)
class TiledSinkWindow:
    """StreamingLLM at tile granularity, at the budget of ``keep`` key tiles per query tile (``kascade.tiles_kept``):
    tile 0 holds the sinks, the other ``keep - 1`` tiles are the most recent ones, the query's own included.
    Layers in ``dense_layers`` run :func:`kernels.flash_attention`. Prefill query tiles are ``tile`` queries."""

    keep: int
    tile: int = 32
    dense_layers: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        if self.keep < 2 or self.tile <= 0:
            raise ValueError(f"TiledSinkWindow needs keep >= 2 tiles (sink + window) and tile > 0, got "
                             f"keep={self.keep}, tile={self.tile}")

    def __call__(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array, *, q_offset: jax.Array,
                 kv_len: jax.Array, carry: Any) -> tuple[jax.Array, Any]:
        if layer in self.dense_layers:
            return flash_attention(q, k, v, q_offset=q_offset, kv_len=kv_len), carry
        b, t, kv_heads = q.shape[0], q.shape[1], k.shape[1]
        q_tile = 1 if t == 1 else self.tile
        keep = min(self.keep, -(-k.shape[2] // self.tile))
        first_query = q_offset + jnp.arange(-(-t // q_tile)) * q_tile
        idx = sink_window_tiles(first_query // self.tile, keep)                    # [n_qtiles, keep]
        shape = (b, kv_heads, 1) + idx.shape
        sel = Selection(idx=jnp.broadcast_to(idx, shape), keep=jnp.ones(shape, bool), q_tile=q_tile, unit=self.tile)
        return attend(q, k, v, sel, q_offset, kv_len), carry


def page_min_max(k: jax.Array, page_size: int, kv_len: Any) -> tuple[jax.Array, jax.Array]:
    """Per-page, per-channel key extremes over the valid keys: ``k: [batch, kv_heads, kv_total, d]`` ->
    ``(kmin, kmax)`` each ``[batch, kv_heads, n_pages, d]`` (a page with no valid key gets +inf / -inf)."""
    b, h, n, d = k.shape
    n_pages = -(-n // page_size)
    valid = (jnp.arange(n_pages * page_size) < kv_len)[None, None, :, None]
    kp = jnp.pad(k.astype(jnp.float32), [(0, 0), (0, 0), (0, n_pages * page_size - n), (0, 0)])
    kmin = jnp.where(valid, kp, jnp.inf).reshape(b, h, n_pages, page_size, d).min(axis=3)
    kmax = jnp.where(valid, kp, -jnp.inf).reshape(b, h, n_pages, page_size, d).max(axis=3)
    return kmin, kmax


def quest_upper_bound(q: jax.Array, kmin: jax.Array, kmax: jax.Array) -> jax.Array:
    r"""Quest's page score: :math:`\sum_d \max(q_d m_d, q_d M_d) \ge \max_{k \in \text{page}} q\cdot k` (scaled by
    :math:`1/\sqrt d`). q: ``[batch, q_len, heads, d]`` -> ``[batch, kv_heads, group, q_len, n_pages]``."""
    kv_heads, group = check_qkv(q, kmin, kmax)
    b, t, _, d = q.shape
    qg = q.reshape(b, t, kv_heads, group, d).astype(jnp.float32)
    lo, hi = jnp.where(jnp.isfinite(kmin), kmin, 0.0), jnp.where(jnp.isfinite(kmax), kmax, 0.0)
    bound = (jnp.einsum("bqhgd,bhpd->bhgqp", jnp.maximum(qg, 0), hi)
             + jnp.einsum("bqhgd,bhpd->bhgqp", jnp.minimum(qg, 0), lo))
    return bound * d ** -0.5


def quest_pages(context: Any, page_size: int, budget: float | int, min_keys: int) -> Any:
    """Quest's page budget, the page holding the query included: ``ceil(keys_kept(context) / page_size)`` (Quest's
    ``page_budget = token_budget / page_size``). Int, or int32 array like ``context``."""
    n = keys_kept(context, budget, min_keys)
    return -(-n // page_size)


def quest_selection(q: jax.Array, k: jax.Array, q_offset: Any, kv_len: Any, *, page_size: int,
                    budget: float | int, min_keys: int) -> Selection:
    """Quest's pages per query head and query token: a `Selection` ``[batch, kv_heads, group, q_len, k + 1]`` of page
    numbers (``unit = page_size``). As in Quest's decode kernels (the last page is excluded from the Top-k and always
    attended), the page holding the query is always kept (its keys up to the query), and the other
    ``quest_pages(kv_len) - 1`` pages are the Top pages by `quest_upper_bound` among the pages before it."""
    bound = quest_upper_bound(q, *page_min_max(k, page_size, kv_len))              # [b, h, g, q_len, pages]
    n_pages = bound.shape[-1]
    k_max = max(1, min(n_pages, quest_pages(k.shape[2], page_size, budget, min_keys) - 1))
    n_top = quest_pages(jnp.asarray(kv_len), page_size, budget, min_keys) - 1

    def one_query(scores: jax.Array, pos: jax.Array) -> tuple[jax.Array, jax.Array]:
        current = pos // page_size                                                 # the page holding the query
        earlier = jnp.arange(n_pages) < current
        vals, idx = jax.lax.top_k(jnp.where(earlier, scores, NEG_INF), k_max)
        keep = (jnp.arange(k_max) < n_top) & (vals > NEG_INF / 2)
        idx = jnp.concatenate([idx.astype(jnp.int32), jnp.broadcast_to(current, idx.shape[:-1] + (1,))], axis=-1)
        keep = jnp.concatenate([keep, jnp.broadcast_to(pos % page_size > 0, keep.shape[:-1] + (1,))], axis=-1)
        return jax.lax.sort((idx.astype(jnp.int32), keep), dimension=idx.ndim - 1, num_keys=1)  # key order

    idx, keep = jax.vmap(one_query, in_axes=(3, 0), out_axes=3)(bound, q_offset + jnp.arange(q.shape[1]))
    return Selection(idx=idx, keep=keep, q_tile=1, unit=page_size)


@dataclass(frozen=True)
class QuestAttention:
    """Quest (Tang et al. 2024): keys in pages of ``page_size``; each query head attends to the page holding its
    query and to the Top pages before it by the min/max upper bound on q·k, ``ceil(keys_kept / page_size)`` pages in
    all (`quest_selection`), per query token. The original applies it to decode only and leaves the first two
    layers dense (``dense_layers``)."""

    budget: float | int = 0.1
    min_keys: int = 128
    page_size: int = 16
    dense_layers: tuple[int, ...] = (0, 1)

    def __call__(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array, *, q_offset: jax.Array,
                 kv_len: jax.Array, carry: Any) -> tuple[jax.Array, Any]:
        if layer in self.dense_layers:
            return flash_attention(q, k, v, q_offset=q_offset, kv_len=kv_len), carry
        sel = quest_selection(q, k, q_offset, kv_len, page_size=self.page_size, budget=self.budget,
                              min_keys=self.min_keys)
        return attend(q, k, v, sel, q_offset, kv_len), carry


@dataclass(frozen=True)
class TidalDecode:
    """TidalDecode (Yang et al. 2024, arXiv 2410.05076): position-persistent sparse attention for decoding.

    Prefill (``q_len > 1``) is dense. In decode, layers 0 and 1 are dense; *token-selection* layers (layer 2 and
    one re-selection layer ``reselect``) run full attention and keep the Top-k token positions; every other layer
    attends only to the positions of the latest selection layer, unchanged (no head remapping). The public
    reference code enables it with ``sparse_layer_start=2, correction_layer=13`` for 32-layer Llama-3-8B, and its
    selector ranks ``attn_weights.topk(k, dim=-1)`` on the per-query-head attention (after ``repeat_kv``), i.e. one
    set per query head: ``pool="head"`` here (``"group"`` shares a set per KV head). ``reselect`` defaults to
    ``num_layers // 2`` (at least 3, for tiny test models). Budget: `kascade.keys_kept`, the query's own key included.

    Runs on `kascade.KascadeAttention` with a schedule whose anchors are layers 1, 2 and ``reselect``, dense anchors
    (``anchor_dense``) and ``remap=False``; layer 1's selection is never read.
    """

    num_layers: int
    num_kv_heads: int
    budget: float | int = 0.1
    min_keys: int = 128
    reselect: int | None = None
    pool: Pool = "head"

    def __post_init__(self) -> None:
        check_budget(self.budget)
        if not 2 < self.reselect_layer < self.num_layers:
            raise ValueError(f"TidalDecode: reselect={self.reselect_layer} must be in (2, num_layers="
                             f"{self.num_layers})")

    @property
    def reselect_layer(self) -> int:
        return max(3, self.num_layers // 2) if self.reselect is None else self.reselect

    def decode_attention(self) -> KascadeAttention:
        """The decode-time policy: dense layers 0-1, dense selection layers, position-persistent reuse."""
        sched = Schedule.from_anchors("tidal", self.num_layers, self.num_kv_heads, [1, 2, self.reselect_layer],
                                      tile_size=1, budget=1.0, min_keys=self.min_keys, method="tidaldecode")
        return KascadeAttention(sched, pool=self.pool, remap=False, anchor_dense=True, budget=self.budget)

    def __call__(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array, *, q_offset: jax.Array,
                 kv_len: jax.Array, carry: Any) -> tuple[jax.Array, Any]:
        if q.shape[1] > 1:
            return flash_attention(q, k, v, q_offset=q_offset, kv_len=kv_len), carry
        return self.decode_attention()(layer, q, k, v, q_offset=q_offset, kv_len=kv_len, carry=carry)
