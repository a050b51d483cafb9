"""Diagnostics the chapters draw, on a loaded model: attention maps (`attention_maps`, through `ProbsHook`), how
many keys each head needs for a share of its attention (`mass_curves`, `keys_for_mass`), what
pooling costs at equal key counts (`pooling_coverage`), coverage against context length (`coverage_at_context`) and
where a schedule loses a needle (`reuse_survival`). Calibration itself, the statistics that schedules are made from, is
`kascade_lite.calibrate`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .attention import attention_probs, gqa_attention
from .calibrate import COVERAGE_FRACTIONS, query_coverage
from .kascade import topk_count
from .kernels import flash_attention
from .model import AttentionFn, KVCache, Llama, dense_attention, forward
from .schedule import Schedule


@dataclass(frozen=True)
class ProbsHook:
    """Dense attention that also puts the post-softmax attention of the chosen ``layers`` in ``carry``
    (``[batch, kv_heads, group, q_len, kv_len]`` each): for looking at attention maps."""

    layers: tuple[int, ...] = (0,)

    def __call__(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array, *, q_offset: jax.Array,
                 kv_len: jax.Array, carry: Any) -> tuple[jax.Array, Any]:
        out = gqa_attention(q, k, v, causal=True, q_offset=q_offset, kv_len=kv_len)
        if layer in self.layers:
            carry = (carry or ()) + (attention_probs(q, k, causal=True, q_offset=q_offset, kv_len=kv_len),)
        return out, carry


def attention_maps(model: Llama, tokens: np.ndarray, layers: tuple[int, ...]) -> np.ndarray:
    """Post-softmax attention of ``tokens: [seq]`` in ``layers``: ``[len(layers), kv_heads, group, seq, seq]``."""
    _, _, maps = forward(model, jnp.asarray(np.asarray(tokens)[None, :], jnp.int32), None,
                         ProbsHook(tuple(sorted(set(layers)))))
    order = {layer: i for i, layer in enumerate(sorted(set(layers)))}
    return np.stack([np.asarray(maps[order[layer]][0]) for layer in layers])


def mass_curves(model: Llama, tokens: np.ndarray, layers: tuple[int, ...]) -> np.ndarray:
    """How many keys each KV head needs in a decode step: the last token of ``tokens: [seq]`` attends (exactly) to
    the others after a dense prefill; its attention in each of ``layers``, pooled over the query heads of each GQA
    group as a Kascade anchor pools it, sorted and summed. Returns ``[len(layers), kv_heads, seq]``: entry ``n - 1``
    is the share of the pooled attention the ``n`` heaviest keys hold (1 at ``n = seq``)."""
    tokens = np.asarray(tokens)
    order = tuple(sorted(set(layers)))
    cache = KVCache.empty(model.cfg, 1, len(tokens), model.dtype)
    _, cache, _ = forward(model, jnp.asarray(tokens[None, :-1], jnp.int32), cache, last_only=True)
    _, _, probs = forward(model, jnp.asarray(tokens[None, -1:], jnp.int32), cache, ProbsHook(order))
    curves = []
    for layer in layers:
        p = np.asarray(probs[order.index(layer)][0, :, :, 0, :len(tokens)], np.float64).sum(axis=1)  # [kv, seq]
        p = -np.sort(-p, axis=-1)
        curves.append(np.cumsum(p, axis=-1) / p.sum(axis=-1, keepdims=True))
    return np.stack(curves)


def keys_for_mass(curves: np.ndarray, mass: float) -> np.ndarray:
    """Fewest keys holding ``mass`` of each curve's attention: ``curves: [..., seq]`` (`mass_curves`) -> int
    ``[...]``."""
    return (curves < mass - 1e-12).sum(axis=-1) + 1


def reuse_survival(model: Llama, prompt: np.ndarray, schedules: Mapping[str, Schedule], span: tuple[int, int], *,
                   budget: float = 0.1, min_keys: int = 128, prefill: AttentionFn = dense_attention
                   ) -> dict[str, Any]:
    """Where a schedule loses a needle: exact attention of a prompt's last token (the query that starts the answer),
    per layer ``l`` and KV head ``h`` (means over the ``group`` query heads), ``[L, H]`` each:

    * ``needle``: the attention mass on the needle's tokens ``span = (start, end)``;
    * ``survival``: ``{name: [L, H]}``, for each of ``schedules``, the share of the mass on the keys the layer reads
      in a Kascade decode step — the Top-k of its anchor's pooled attention, through the head map, plus the query
      token itself;
    * ``own``: the same share with the layer's own pooled Top-k (every layer an anchor).

    Top-k keeps `kascade.topk_count` keys (``budget``, ``min_keys``, the query token counted) of those before the
    query. prompt: ``[length]`` token ids. Hidden states are the dense model's, so the layers are compared on the
    same queries. ``prefill``: the dense attention of the prompt pass (`model.dense_attention`; a long prompt
    wants `baselines.flash_dense_attention`, which never forms the ``[T, T]`` scores)."""
    ids = jnp.asarray(np.asarray(prompt, np.int32)[None])
    length = ids.shape[1]
    _, cache, _ = forward(model, ids[:, :-1], KVCache.empty(model.cfg, 1, length), prefill)
    _, _, probs = forward(model, ids[:, -1:], cache, ProbsHook(tuple(range(model.cfg.num_layers))))
    p = np.stack([np.asarray(x[0, :, :, 0, :length], np.float64) for x in probs])   # [L, H, G, length]
    q_pos, k = length - 1, int(topk_count(length, 1, budget=budget, min_keys=min_keys))
    pooled = p.sum(axis=2)[..., :q_pos]                                               # keys before the query
    top = np.argsort(-pooled, axis=-1, kind="stable")[..., :k]                        # [L, H, k]

    def kept(layer: int, rows: np.ndarray) -> np.ndarray:
        mask = np.zeros(p.shape[1:2] + (length,), bool)                                # [H, length]
        np.put_along_axis(mask, rows, True, axis=-1)
        mask[:, q_pos] = True
        return (p[layer] * mask[:, None, :]).sum(-1).mean(-1)                          # [H]

    own = np.stack([kept(layer, top[layer]) for layer in range(p.shape[0])])
    survival = {name: np.stack([kept(layer, top[a][list(sched.head_map[layer])])
                                for layer, a in enumerate(sched.anchor_of)]) for name, sched in schedules.items()}
    needle = p[..., span[0]:span[1]].sum(-1).mean(-1)
    return dict(needle=needle, survival=survival, own=own)


# ------------------------------------------------------------------------------------------------ coverage
POOLINGS = ("per query head and row", "per KV head, per row", "per query head, per tile", "per KV head and tile")
"""How `pooling_coverage` shares one set of earlier keys: the oracle (no sharing), over the ``group`` query heads of
a KV head, over the rows of a query tile, over both (Kascade's anchors in prefill)."""


def pooling_coverage(p: np.ndarray, tile_size: int, k_prev: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """What pooling costs at equal key counts, for one layer's attention ``p: [kv_heads, group, q_len, kv_len]``
    (queries from position 0, ``q_len`` a multiple of ``tile_size``).

    Every query row ``i`` of tile ``t`` (first position ``s_t``) reads its tile's keys ``s_t..i`` and
    ``min(k_prev, s_t)`` earlier keys; only who chooses the earlier keys changes (`POOLINGS`): the Top-``k_prev`` of
    the row's own attention, or of the attention summed over the group, over the tile's rows, or over both.
    Returns ``({pooling: [kv_heads]}, keys_read [q_len])``: the attention mass on the keys each row reads, mean over
    the group and the rows, and how many keys each row reads (the same for every pooling)."""
    p = np.asarray(p, np.float64)
    heads, group, q_len, kv_len = p.shape
    if tile_size <= 0 or q_len % tile_size:
        raise ValueError(f"q_len={q_len} must be a positive multiple of tile_size={tile_size}")
    start = np.arange(q_len) // tile_size * tile_size                        # s_t of each row
    before = np.arange(kv_len)[None, :] < start[:, None]                     # [q_len, kv_len]
    prev = np.where(before, p, 0.0)
    own = (p - prev).sum(-1)                                                 # mass on the tile's own keys

    def kept(scores: np.ndarray) -> np.ndarray:
        """Mass of each row on the Top-``k_prev`` earlier keys by ``scores`` (broadcast against ``prev``)."""
        top = np.argsort(-scores, axis=-1, kind="stable")[..., :k_prev]
        mask = np.zeros(scores.shape, bool)
        np.put_along_axis(mask, top, True, axis=-1)
        return (prev * (mask & before)).sum(-1)

    def tile_sum(x: np.ndarray) -> np.ndarray:
        tiles = x.reshape(x.shape[:2] + (q_len // tile_size, tile_size, kv_len)).sum(3)
        return np.repeat(tiles, tile_size, axis=2)                           # back to one row per query

    scores = {POOLINGS[0]: prev, POOLINGS[1]: prev.sum(1, keepdims=True), POOLINGS[2]: tile_sum(prev),
              POOLINGS[3]: tile_sum(prev.sum(1, keepdims=True))}
    coverage = {name: (own + kept(s)).mean(axis=(1, 2)) for name, s in scores.items()}
    keys_read = np.arange(q_len) - start + 1 + np.minimum(k_prev, start)
    return coverage, keys_read


@dataclass(frozen=True)
class LastQueriesCoverage:
    """Dense attention (`kernels.flash_attention`, no ``[T, T]`` scores) that also puts in ``carry``, per layer, the
    coverage ``[kv_heads, len(fractions)]`` (`calibrate.query_coverage`) of the last ``n_queries`` queries of a
    prefill from position 0: the queries that read (nearly) the whole context."""

    n_queries: int = 64
    fractions: tuple[float, ...] = COVERAGE_FRACTIONS

    def __call__(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array, *, q_offset: jax.Array,
                 kv_len: jax.Array, carry: Any) -> tuple[jax.Array, Any]:
        out = flash_attention(q, k, v, q_offset=q_offset, kv_len=kv_len)
        first = q.shape[1] - min(self.n_queries, q.shape[1])
        p = attention_probs(q[:, first:], k, causal=True, q_offset=q_offset + first, kv_len=kv_len)
        return out, (carry or ()) + (query_coverage(p, self.fractions, q_offset=first),)


def coverage_at_context(model: Llama, windows: np.ndarray, *, n_queries: int = 64,
                        fractions: tuple[float, ...] = COVERAGE_FRACTIONS) -> np.ndarray:
    """Coverage ``[layers, kv_heads, len(fractions)]`` of the last ``n_queries`` queries of each window
    ``[num, seq_len]`` (one prefill each), mean over the windows: how sparse attention is at that context length."""
    hook = LastQueriesCoverage(n_queries, tuple(fractions))
    per_window = [np.stack([np.asarray(c) for c in forward(model, jnp.asarray(w[None], jnp.int32), None, hook,
                                                           last_only=True)[2]])
                  for w in np.asarray(windows)]
    return np.mean(per_window, axis=0)
