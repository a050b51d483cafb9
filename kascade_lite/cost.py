r"""Cost models: what attention and whole models cost in FLOPs, bytes and memory (arithmetic, not timing).

Attention (:func:`attention_cost`), per layer, batch 1, ``H`` query heads, ``H_kv`` KV heads, ``d`` head_dim,
``b`` bytes per value, ``L`` keys (decode) or ``T`` tokens (prefill), ``k`` kept keys:

==============  ==================================  =====================================
                FLOPs                               bytes of K/V read
==============  ==================================  =====================================
dense decode    :math:`4 H d L`                     :math:`2 H_{kv} d L b`
anchor decode   :math:`2 H d L + 4 H d k`           :math:`H_{kv} d L b + 2 H_{kv} d k b`
reuse decode    :math:`4 H d k`                     :math:`2 H_{kv} d k b`
dense prefill   :math:`2 H d T^2` (causal half)     :math:`2 H_{kv} d T b` (once, ideally)
anchor prefill  :math:`2 H d T^2 / 2 + 4 H d T k`   as dense
reuse prefill   :math:`4 H d T k`                   :math:`2 H_{kv} d T b \cdot k / t_q` (per query tile)
==============  ==================================  =====================================

Memory (:func:`memory_plan`): weights, the dense KV cache and Kascade's per-step reads on one device of a model
axis (`kascade_lite.sharding.param_spec` decides what is split), for Llama-3.1-8B / -70B on published accelerator
memory sizes and bandwidths (`ACCELERATORS`); `write_memory_plan` writes the tables chapter 09 shows, with the
shipped schedule's anchors carried over to each model's depth (`scaled_anchors`). `selection_bytes` is the size
of one layer's Top-k indices, what a sharded reuse layer gathers when its head map crosses devices.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .attention import kv_cache_bytes
from .config import PRESETS, LlamaConfig
from .files import provenance, write_json_atomic
from .model import expected_shapes
from .schedule import Schedule
from .sharding import REPLICATED, param_spec
from .kascade import keys_kept, topk_count


# ------------------------------------------------------------------------------------------------ attention
def attention_cost(phase: str, kind: str, context: int, keep_keys: int, *, q_heads: int, kv_heads: int,
                   head_dim: int, bytes_per_value: int = 4) -> dict[str, float]:
    """FLOPs and K/V bytes of one attention layer (batch 1), per the table in the module docstring.

    ``phase``: "decode" (``context`` = cache length) or "prefill" (``context`` = tokens); ``kind``: "dense",
    "anchor" or "reuse"; ``keep_keys``: keys kept per query (tile) = kept tiles * tile."""
    h, hk, d, b, n, k = q_heads, kv_heads, head_dim, bytes_per_value, context, keep_keys
    table = {
        ("decode", "dense"): (4 * h * d * n, 2 * hk * d * n * b),
        ("decode", "anchor"): (2 * h * d * n + 4 * h * d * k, hk * d * n * b + 2 * hk * d * k * b),
        ("decode", "reuse"): (4 * h * d * k, 2 * hk * d * k * b),
        ("prefill", "dense"): (2 * h * d * n * n, 2 * hk * d * n * b),
        ("prefill", "anchor"): (h * d * n * n + 4 * h * d * n * k, 2 * hk * d * n * b),
        ("prefill", "reuse"): (4 * h * d * n * k, 2 * hk * d * n * b),
    }
    if (phase, kind) not in table:
        raise ValueError(f"unknown phase/kind {phase!r}/{kind!r}")
    flops, nbytes = table[phase, kind]
    return {"flops": float(flops), "bytes": float(nbytes)}


def model_step_cost(cfg: LlamaConfig, context: int, *, phase: str, layer_types: Sequence[str] | None = None,
                    keep_keys: int | None = None, bytes_per_value: int = 4, last_only: bool = True
                    ) -> dict[str, float]:
    """FLOPs and bytes of one forward step of the whole model at batch 1, what a timing of it is compared with.

    ``phase="decode"``: one token after ``context`` cached ones; ``"prefill"``: ``context`` tokens into an empty
    cache (only the last position's logits with ``last_only``). ``layer_types``: per layer "dense" / "anchor" /
    "reuse" (a `Schedule`'s; default all dense) and ``keep_keys`` the keys a sparse layer attends per query. Bytes:
    every weight read once (the embedding table as the output head when tied, else one row) plus each layer's K/V
    reads by `attention_cost`; FLOPs: ``2 * weights * tokens`` for the projections and MLP, the output head, and
    each layer's attention by `attention_cost`."""
    if phase not in ("decode", "prefill"):
        raise ValueError(f"phase must be 'decode' or 'prefill', got {phase!r}")
    layer_types = list(layer_types or ["dense"] * cfg.num_layers)
    if len(layer_types) != cfg.num_layers:
        raise ValueError(f"{len(layer_types)} layer types for a {cfg.num_layers}-layer model")
    if keep_keys is None and any(t != "dense" for t in layer_types):
        raise ValueError("keep_keys is needed when some layer is sparse")
    per_layer = layer_params(cfg)
    head = cfg.hidden_size * cfg.vocab_size
    tokens = 1 if phase == "decode" else context
    flops = 2.0 * cfg.num_layers * per_layer * tokens + 2.0 * head * (1 if last_only else tokens)
    nbytes = step_weight_bytes(cfg, bytes_per_value)
    for kind in layer_types:
        c = attention_cost(phase, kind, context, min(context, keep_keys or context), q_heads=cfg.num_heads,
                           kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, bytes_per_value=bytes_per_value)
        flops, nbytes = flops + c["flops"], nbytes + c["bytes"]
    return {"flops": flops, "bytes": nbytes}


def layer_params(cfg: LlamaConfig) -> int:
    """Parameters of one decoder layer (attention, MLP, norms)."""
    return sum(math.prod(shape) for name, shape in expected_shapes(cfg).items() if name.startswith("layers.0."))


def step_weight_bytes(cfg: LlamaConfig, bytes_per_value: float = 4) -> float:
    """Bytes of weights one forward step reads: every layer's, the output head (the embedding table when tied) and,
    when untied, one embedding row."""
    head = cfg.hidden_size * cfg.vocab_size
    return float((cfg.num_layers * layer_params(cfg) + head + (0 if cfg.tie_word_embeddings else cfg.hidden_size))
                 * bytes_per_value)


def whole_model_time(schedule: Schedule, t_dense: float, t_anchor: float, t_reuse: float) -> float:
    """Attention time of all layers: layer 0 dense, anchors ``t_anchor``, reuse layers ``t_reuse``."""
    cost = {"dense": t_dense, "anchor": t_anchor, "reuse": t_reuse}
    return sum(cost[t] for t in schedule.layer_types)


def cost_rows(phase: str, context: int, keep_keys: int, *, q_heads: int, kv_heads: int, head_dim: int,
              bytes_per_value: int = 4) -> list[dict[str, Any]]:
    """`attention_cost` of a dense, an anchor and a reuse layer as table rows: GFLOP, MB, FLOPs per byte."""
    rows = []
    for kind in ("dense", "anchor", "reuse"):
        c = attention_cost(phase, kind, context, keep_keys, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim,
                           bytes_per_value=bytes_per_value)
        rows.append({"layer": kind, "GFLOP": c["flops"] / 1e9, "MB": c["bytes"] / 1e6,
                     "FLOPs/byte": c["flops"] / c["bytes"]})
    return rows


def roofline_time(cost: dict[str, float], peak_flops: float, bandwidth: float) -> float:
    """Lower bound on a kernel's time: the slower of its compute (``flops / peak``) and memory traffic."""
    return max(cost["flops"] / peak_flops, cost["bytes"] / bandwidth)


# ------------------------------------------------------------------------------------------------ memory
@dataclass(frozen=True)
class Accelerator:
    """Published memory capacity (bytes, decimal GB as vendors print them) and bandwidth (bytes/s) of one chip."""

    name: str
    memory_bytes: float
    bandwidth: float
    source: str


ACCELERATORS: dict[str, Accelerator] = {a.name: a for a in (
    Accelerator("A100 40GB", 40e9, 1.555e12, "https://www.nvidia.com/en-us/data-center/a100/"),
    Accelerator("A100 80GB", 80e9, 2.039e12, "https://www.nvidia.com/en-us/data-center/a100/"),
    Accelerator("H100 80GB", 80e9, 3.35e12, "https://www.nvidia.com/en-us/data-center/h100/"),
    Accelerator("H200 141GB", 141e9, 4.8e12, "https://www.nvidia.com/en-us/data-center/h200/"),
    Accelerator("TPU v5e 16GB", 16e9, 819e9, "https://cloud.google.com/tpu/docs/v5e"),
)}
"""SXM variants for A100 80GB / H100 / H200; HBM figures from the vendors' product pages (``source``)."""


def weight_bytes(cfg: LlamaConfig, model_size: int = 1, bytes_per_param: float = 2) -> float:
    """Bytes of weights on one device when the model axis has ``model_size`` devices (by `param_spec`)."""
    total = 0.0
    for name, shape in expected_shapes(cfg).items():
        split = model_size if param_spec(name) != REPLICATED else 1
        total += math.prod(shape) / split
    return total * bytes_per_param


def memory_plan(cfg: LlamaConfig, tokens: int, *, batch: int = 1, model_size: int = 1, num_anchor_layers: int,
                budget: float = 0.1, min_keys: int = 128, bytes_per_param: float = 2,
                kv_bytes: float = 2) -> dict[str, float]:
    """Per-device bytes for decoding ``batch`` sequences of ``tokens`` context with KV heads over ``model_size``.

    * ``weights``: resident weights (`weight_bytes`); ``kv_cache``: the full dense cache, which Kascade keeps too.
    * ``dense_read`` / ``kascade_read``: bytes one decode step reads from memory (weights + K/V). Dense attention
      reads every key and value in every layer; with Kascade (`attention_cost`'s rule) layer 0 does too, the other
      ``num_anchor_layers - 1`` anchors read every key and the keys and values they select, and the reuse layers
      only the selected ones: ``kascade.keys_kept(tokens, budget, min_keys)`` per KV head
      (``max(min_keys, ceil(budget * tokens))``, at most ``tokens``).
    * ``index_bytes``: the int32 Top-k indices one anchor layer hands to its reuse layers (per step, per device).
    """
    if not 1 <= num_anchor_layers <= cfg.num_layers:
        raise ValueError(f"num_anchor_layers={num_anchor_layers} must be in [1, num_layers={cfg.num_layers}]")
    if cfg.num_kv_heads % model_size:
        raise ValueError(f"model_size={model_size} does not divide num_kv_heads={cfg.num_kv_heads}")
    heads = cfg.num_kv_heads // model_size
    per_layer_full = kv_cache_bytes(1, heads, cfg.head_dim, tokens, kv_bytes, batch)
    keys = keys_kept(tokens, budget, min_keys)
    per_layer_sparse = kv_cache_bytes(1, heads, cfg.head_dim, keys, kv_bytes, batch)
    weights = weight_bytes(cfg, model_size, bytes_per_param)
    kv = per_layer_full * cfg.num_layers
    attn_kascade = (per_layer_full + (num_anchor_layers - 1) * (per_layer_full / 2 + per_layer_sparse)
                    + (cfg.num_layers - num_anchor_layers) * per_layer_sparse)
    return dict(tokens=tokens, batch=batch, model_size=model_size, weights=weights, kv_cache=kv,
                total=weights + kv, dense_read=weights + kv, kascade_read=weights + attn_kascade,
                kv_read_dense=kv, kv_read_kascade=attn_kascade, index_bytes=batch * heads * keys * 4)


def decode_ceiling(cfg: LlamaConfig, tokens: int, *, num_anchor_layers: int, budget: float = 0.1,
                   min_keys: int = 128, bytes_per_value: float = 4, keep_keys: int | None = None) -> float:
    """The bytes-moved ceiling of Kascade's whole-model decode speedup: bytes one decode step reads (all weights +
    K/V, `model_step_cost`) dense over Kascade with ``num_anchor_layers`` full-attention layers (layer 0 included)
    and ``keep_keys`` keys per reuse query (default ``kascade.keys_kept(tokens, budget, min_keys)``). A
    memory-bound decode step cannot beat this ratio: the weights are read either way."""
    if not 1 <= num_anchor_layers <= cfg.num_layers:
        raise ValueError(f"num_anchor_layers={num_anchor_layers} must be in [1, num_layers={cfg.num_layers}]")
    keep = keys_kept(tokens, budget, min_keys) if keep_keys is None else keep_keys
    types = ["dense"] + ["anchor"] * (num_anchor_layers - 1) + ["reuse"] * (cfg.num_layers - num_anchor_layers)
    dense = model_step_cost(cfg, tokens, phase="decode", bytes_per_value=bytes_per_value)
    sparse = model_step_cost(cfg, tokens, phase="decode", layer_types=types, keep_keys=keep,
                             bytes_per_value=bytes_per_value)
    return dense["bytes"] / sparse["bytes"]


def smallest_model_axis(cfg: LlamaConfig, tokens: int, accelerator: Accelerator, *, batch: int = 1,
                        num_anchor_layers: int, headroom: float = 0.9, **kw: Any) -> int | None:
    """Smallest model-axis size (a divisor of ``num_kv_heads``) whose per-device weights + dense cache fit in
    ``headroom`` of the accelerator's memory; ``None`` if even ``num_kv_heads`` devices do not suffice."""
    for m in (m for m in range(1, cfg.num_kv_heads + 1) if cfg.num_kv_heads % m == 0):
        plan = memory_plan(cfg, tokens, batch=batch, model_size=m, num_anchor_layers=num_anchor_layers, **kw)
        if plan["total"] <= headroom * accelerator.memory_bytes:
            return m
    return None


def plan_table(cfg: LlamaConfig, token_counts: Sequence[int], *, num_anchor_layers: int, batch: int = 1,
               accelerators: Sequence[Accelerator] | None = None, **kw: Any) -> list[dict[str, Any]]:
    """One row per context length: sizes for one device (``model_size=1``) in GB, the Kascade read ratio, and for
    each accelerator the smallest model axis that fits with a roofline decode-step time (bytes / bandwidth, a
    lower bound, not a measurement) dense vs Kascade."""
    rows = []
    for t in token_counts:
        p = memory_plan(cfg, t, batch=batch, num_anchor_layers=num_anchor_layers, **kw)
        row: dict[str, Any] = dict(tokens=t, weights_gb=p["weights"] / 1e9, kv_cache_gb=p["kv_cache"] / 1e9,
                                   kascade_kv_read_gb=p["kv_read_kascade"] / 1e9,
                                   kv_read_ratio=p["kv_read_kascade"] / p["kv_read_dense"])
        for acc in accelerators or ACCELERATORS.values():
            m = smallest_model_axis(cfg, t, acc, batch=batch, num_anchor_layers=num_anchor_layers, **kw)
            if m is None:
                row[acc.name] = None
                continue
            pm = memory_plan(cfg, t, batch=batch, model_size=m, num_anchor_layers=num_anchor_layers, **kw)
            row[acc.name] = dict(model_axis=m, gb_per_device=pm["total"] / 1e9,
                                 dense_step_ms=1e3 * pm["dense_read"] / acc.bandwidth,
                                 kascade_step_ms=1e3 * pm["kascade_read"] / acc.bandwidth)
        rows.append(row)
    return rows


DEFAULT_PLAN_MODELS: dict[str, LlamaConfig] = {name: PRESETS[name] for name in ("llama-3.1-8b", "llama-3.1-70b")}
DEFAULT_PLAN_TOKENS = (8192, 32_768, 131_072)


def scaled_anchors(schedule: Schedule, num_layers: int) -> list[int]:
    """The full-attention layers (layer 0 included) of ``schedule`` carried over to a model of ``num_layers``
    layers at the same relative depths: ``round(a * num_layers / schedule.num_layers)`` for each of its anchors."""
    return sorted({min(num_layers - 1, round(a * num_layers / schedule.num_layers)) for a in schedule.anchors} | {0})


def selection_bytes(cfg: LlamaConfig, tokens: int, *, phase: str, budget: float = 0.1, min_keys: int = 128,
                    tile: int = 32, granularity: str = "position", batch: int = 1) -> float:
    """Bytes of one layer's Top-k selection over all KV heads (an int32 index and a bool flag per entry,
    `kascade.Selection`): one row per KV head in a decode step, one per query tile of ``tile`` queries in a prefill
    of ``tokens``, each of ``kascade.topk_count`` units (key positions, or key tiles with ``granularity="tile"``).
    It is what `sharding.ShardedKascade` all-gathers for a reuse layer whose head map crosses devices."""
    if phase not in ("decode", "prefill"):
        raise ValueError(f"phase must be 'decode' or 'prefill', got {phase!r}")
    unit = tile if granularity == "tile" else 1
    rows = 1 if phase == "decode" else -(-tokens // tile)
    own = 1 if phase == "decode" else tokens - (rows - 1) * tile
    units = max(1, topk_count(tokens, own, budget=budget, min_keys=min_keys, unit=unit))
    return float(batch * cfg.num_kv_heads * rows * units * (4 + 1))


def write_memory_plan(path: str | os.PathLike, *, command: str, smoke: bool, schedule: Schedule,
                      schedule_name: str, budget: float = 0.1, budget_note: str | None = None,
                      min_keys: int = 128) -> dict[str, Any]:
    """Write chapter 09's plan tables (bf16 weights and cache, batch 1) to ``path`` with provenance and return them
    (``smoke``: the tables are arithmetic, the same at any size; recorded as the run was asked). ``schedule``
    (named ``schedule_name``): the calibrated schedule whose anchors, at the same relative depths
    (`scaled_anchors`), are each model's full-attention layers; ``budget``: the key budget, ``budget_note`` why it
    is not the trade-off table's recommendation (None when it is)."""
    out: dict[str, Any] = dict(
        provenance=provenance(command, smoke=smoke),
        assumptions=dict(bytes_per_param=2, kv_bytes=2, batch=1, budget=budget, budget_note=budget_note,
                         min_keys=min_keys, schedule=schedule_name, schedule_model=schedule.model,
                         schedule_layers=schedule.num_layers, schedule_anchors=list(schedule.anchors), headroom=0.9),
        accelerators={a.name: dict(memory_gb=a.memory_bytes / 1e9, bandwidth_gb_s=a.bandwidth / 1e9,
                                   source=a.source) for a in ACCELERATORS.values()},
        models={})
    for name, cfg in DEFAULT_PLAN_MODELS.items():
        anchors = scaled_anchors(schedule, cfg.num_layers)
        out["models"][name] = dict(num_anchor_layers=len(anchors), anchor_layers=anchors, rows=plan_table(
            cfg, DEFAULT_PLAN_TOKENS, num_anchor_layers=len(anchors), budget=budget, min_keys=min_keys))
    write_json_atomic(path, out)
    return out
