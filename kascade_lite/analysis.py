"""Diagnostics the chapters draw, on a loaded model: attention maps (`attention_maps`, through `ProbsHook`) and where
a schedule loses a needle (`reuse_survival`). Calibration itself, the statistics that schedules are made from, is
`kascade_lite.calibrate`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .attention import attention_probs, gqa_attention
from .kascade import topk_count
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
