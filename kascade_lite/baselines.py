"""Baselines for Kascade, in the same harness: each is a hashable `model.AttentionFn` with the same key budget.

| name | one line | citation |
|---|---|---|
| dense | exact causal attention in every layer | Vaswani et al. 2017 |
| oracle | every layer an anchor, Top-k per query head and per query, no pooling: the ceiling of Top-k attention | Kascade, Deshmukh et al. 2025 (§ oracle) |
| kascade_no_remap | Kascade with the identity head map (KV head h reuses anchor head h) | Kascade ablation |
| all_heads_pooled | Kascade pooling over *all* query heads: one key set shared by every KV head | Kascade ablation |
| sink_window | 4 attention-sink tokens plus a sliding window of recent keys | StreamingLLM, Xiao et al. 2023 |
| quest | pages of 16 keys; per-page key min/max give an upper bound on q·k; Top pages per query head | Quest, Tang et al. 2024 |
| omnikv | a few dense "filter" layers choose tokens (pooled over all heads) that the following layers reuse | OmniKV, Hao et al. 2025 |

Every sparse baseline keeps the budget semantics of `sparse.budget_keys` (fraction of the keys with a floor, or a
fixed count) so that the comparison is at equal keys per query.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from .attention import causal_mask, check_qkv, gqa_attention
from .schedule import Schedule
from .sparse import KascadeAttention, budget_keys, masked_attention, select_topk, selection_mask, tile_starts

BASELINES: dict[str, str] = {
    "dense": "exact causal attention in every layer (Vaswani et al. 2017)",
    "kascade": "anchor layers pick Top-k keys pooled per GQA group; reuse layers attend to them through a head map "
               "(Deshmukh et al. 2025, arXiv 2512.16391)",
    "oracle": "every layer an anchor with its own exact Top-k per query head and per query, no pooling "
              "(Top-k ceiling; Deshmukh et al. 2025)",
    "kascade_no_remap": "Kascade with the identity head map (ablation, Deshmukh et al. 2025)",
    "all_heads_pooled": "Kascade with one key set pooled over all query heads, shared by every KV head "
                        "(ablation, Deshmukh et al. 2025)",
    "sink_window": "4 sink tokens + a sliding window of recent keys (StreamingLLM, Xiao et al. 2023, arXiv 2309.17453)",
    "quest": "pages of 16 keys ranked by a min/max upper bound on q·k, per query head "
             "(Quest, Tang et al. 2024, arXiv 2406.10774)",
    "omnikv": "dense filter layers choose tokens, pooled over all heads, reused by the following layers without "
              "head awareness (OmniKV, Hao et al. 2025, ICLR)",
}


@dataclass(frozen=True)
class DenseAttention:
    """Exact causal GQA in every layer (the reference). Vaswani et al. 2017."""

    def __call__(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array, *, q_offset: jax.Array,
                 kv_len: jax.Array, carry: Any) -> tuple[jax.Array, Any]:
        return gqa_attention(q, k, v, causal=True, q_offset=q_offset, kv_len=kv_len), carry


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


def sink_window_mask(q_len: int, kv_total: int, q_offset: Any, kv_len: Any, *, budget: float | int,
                     min_keys: int, sinks: int = 4) -> jax.Array:
    """Bool ``[q_len, kv_total]``: the first ``sinks`` keys plus the ``budget_keys(kv_len) - sinks`` most recent keys
    (the query's own key included), within the causal mask."""
    window = jnp.maximum(budget_keys(kv_len, budget, min_keys) - sinks, 1)
    q_pos = jnp.arange(q_len)[:, None] + q_offset
    k_pos = jnp.arange(kv_total)[None, :]
    return causal_mask(q_len, kv_total, q_offset, kv_len) & ((k_pos < sinks) | (k_pos > q_pos - window))


@dataclass(frozen=True)
class SinkWindowAttention:
    """StreamingLLM (Xiao et al. 2023): ``sinks`` attention-sink tokens plus a sliding window, at the same key budget
    as Kascade. Layers in ``dense_layers`` stay dense."""

    budget: float | int = 0.1
    min_keys: int = 128
    sinks: int = 4
    dense_layers: tuple[int, ...] = (0,)

    def __call__(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array, *, q_offset: jax.Array,
                 kv_len: jax.Array, carry: Any) -> tuple[jax.Array, Any]:
        if layer in self.dense_layers:
            return gqa_attention(q, k, v, causal=True, q_offset=q_offset, kv_len=kv_len), carry
        mask = sink_window_mask(q.shape[1], k.shape[1], q_offset, kv_len, budget=self.budget, min_keys=self.min_keys,
                                sinks=self.sinks)
        return masked_attention(q, k, v, mask), carry


def page_min_max(k: jax.Array, page_size: int, kv_len: Any) -> tuple[jax.Array, jax.Array]:
    """Per-page, per-channel key extremes over the valid keys: ``k: [batch, kv_total, kv_heads, d]`` ->
    ``(kmin, kmax)`` each ``[batch, n_pages, kv_heads, d]`` (a page with no valid key gets +inf / -inf)."""
    b, n, h, d = k.shape
    n_pages = -(-n // page_size)
    valid = (jnp.arange(n_pages * page_size) < kv_len)[None, :, None, None]
    kp = jnp.pad(k.astype(jnp.float32), [(0, 0), (0, n_pages * page_size - n), (0, 0), (0, 0)])
    kmin = jnp.where(valid, kp, jnp.inf).reshape(b, n_pages, page_size, h, d).min(axis=2)
    kmax = jnp.where(valid, kp, -jnp.inf).reshape(b, n_pages, page_size, h, d).max(axis=2)
    return kmin, kmax


def quest_upper_bound(q: jax.Array, kmin: jax.Array, kmax: jax.Array) -> jax.Array:
    r"""Quest's page score: :math:`\sum_d \max(q_d m_d, q_d M_d) \ge \max_{k \in \text{page}} q\cdot k` (scaled by
    :math:`1/\sqrt d`). q: ``[batch, q_len, heads, d]`` -> ``[batch, kv_heads, group, q_len, n_pages]``."""
    kv_heads, group = check_qkv(q, kmin, kmax)
    b, t, _, d = q.shape
    qg = q.reshape(b, t, kv_heads, group, d).astype(jnp.float32)
    lo, hi = jnp.where(jnp.isfinite(kmin), kmin, 0.0), jnp.where(jnp.isfinite(kmax), kmax, 0.0)
    bound = (jnp.einsum("bqhgd,bphd->bhgqp", jnp.maximum(qg, 0), hi)
             + jnp.einsum("bqhgd,bphd->bhgqp", jnp.minimum(qg, 0), lo))
    return bound * d ** -0.5


@dataclass(frozen=True)
class QuestAttention:
    """Quest (Tang et al. 2024): keys in pages of ``page_size``; each query head ranks the pages before it by the
    min/max upper bound on q·k and attends to the Top pages (same key budget), per query token. The original applies
    it to decode only and leaves the first two layers dense (``dense_layers``)."""

    budget: float | int = 0.1
    min_keys: int = 128
    page_size: int = 16
    dense_layers: tuple[int, ...] = (0, 1)

    def __call__(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array, *, q_offset: jax.Array,
                 kv_len: jax.Array, carry: Any) -> tuple[jax.Array, Any]:
        if layer in self.dense_layers:
            return gqa_attention(q, k, v, causal=True, q_offset=q_offset, kv_len=kv_len), carry
        q_len, kv_total = q.shape[1], k.shape[1]
        bound = quest_upper_bound(q, *page_min_max(k, self.page_size, kv_len))
        sel = select_topk(bound, tile_starts(q_len, 1, q_offset), kv_len, q_tile=1, unit=self.page_size,
                          budget=self.budget, min_keys=self.min_keys)
        return masked_attention(q, k, v, selection_mask(sel, q_len, kv_total, q_offset, kv_len)), carry
