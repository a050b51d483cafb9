r"""Benchmark harness: honest wall-clock timing, cost models, and the kernel-backed Kascade policy for the model.

Timing rules (:func:`compare`): every candidate is compiled and run ``warmup`` times first; then the candidates are
timed *round-robin* (one run of each, ``reps`` times over), each run ending in ``jax.block_until_ready``, so that
a noisy neighbour on a shared CPU slows all candidates alike; we report the median (and the minimum).

Cost model (:func:`attention_cost`), per layer, batch 1, ``H`` query heads, ``H_kv`` KV heads, ``d`` head_dim,
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
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from . import kernels as K
from .files import provenance, write_json_atomic
from .schedule import Schedule

MEMORY_LIMIT_BYTES = 6 * 10**9  # skip a dense candidate whose score matrix would exceed this


# ------------------------------------------------------------------------------------------------ timing
def time_once(fn: Callable[[], Any]) -> float:
    """Seconds for one call of ``fn`` including ``jax.block_until_ready`` on its result."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def compare(candidates: dict[str, Callable[[], Any]], *, reps: int = 5, warmup: int = 1) -> dict[str, dict]:
    """Time zero-argument callables side by side in one process.

    Returns ``{name: {"median_s", "min_s", "times_s", "compile_s"}}`` (``compile_s``: the first, compiling call)."""
    if reps < 1 or warmup < 1:
        raise ValueError(f"need reps >= 1 and warmup >= 1, got reps={reps}, warmup={warmup}")
    out: dict[str, dict] = {}
    for name, fn in candidates.items():
        out[name] = {"compile_s": time_once(fn), "times_s": []}
        for _ in range(warmup - 1):
            time_once(fn)
    for _ in range(reps):
        for name, fn in candidates.items():
            out[name]["times_s"].append(time_once(fn))
    for row in out.values():
        row["median_s"] = statistics.median(row["times_s"])
        row["min_s"] = min(row["times_s"])
    return out


def speedup(baseline: dict, candidate: dict) -> float:
    """Ratio of median times ``baseline / candidate`` (> 1: the candidate is faster)."""
    return baseline["median_s"] / candidate["median_s"]


def write_results(path: str | os.PathLike, command: str, config: dict[str, Any], rows: list[dict]) -> dict:
    """Write ``{"provenance", "config", "results"}`` atomically and return it."""
    doc = {"provenance": provenance(command), "config": config, "results": rows}
    write_json_atomic(path, doc)
    return doc


def load_results(path: str | os.PathLike) -> dict:
    """Read a results JSON written by :func:`write_results`; ``ValueError`` naming the file if it is not one."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read benchmark JSON ({e})") from e
    missing = {"provenance", "config", "results"} - set(doc if isinstance(doc, dict) else {})
    if missing:
        raise ValueError(f"{path}: benchmark JSON lacks keys {sorted(missing)}")
    return doc


# ------------------------------------------------------------------------------------------------ cost model
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


def whole_model_time(schedule: Schedule, t_dense: float, t_anchor: float, t_reuse: float) -> float:
    """Attention time of all layers: layer 0 dense, anchors ``t_anchor``, reuse layers ``t_reuse``."""
    cost = {"dense": t_dense, "anchor": t_anchor, "reuse": t_reuse}
    return sum(cost[t] for t in schedule.layer_types)


# ------------------------------------------------------------------------------------------------ model policies
def flash_dense_attention(layer: int, q: jax.Array, k: jax.Array, v: jax.Array, *, q_offset: jax.Array,
                          kv_len: jax.Array, carry: Any) -> tuple[jax.Array, Any]:
    """`model.AttentionFn` for dense attention through :func:`kernels.flash_attention` (no ``[T, L]`` scores)."""
    return K.flash_attention(q, k, v, q_offset=q_offset, kv_len=kv_len), carry


@dataclass(frozen=True)
class KernelKascadeAttention:
    """Kascade through the gather kernels: a hashable `model.AttentionFn` for timing the whole model.

    Layer 0 (``"dense"``) runs :func:`kernels.flash_attention` and also emits Top-k tiles; anchors run
    :func:`kernels.anchor_decode_attention` / :func:`kernels.anchor_prefill_attention`; reuse layers gather the
    anchor's tiles through the head map. ``keep`` tiles per KV head (static: build one policy per context size;
    capped at the tiles there are).
    Decode reads the model's sequence-major cache in place (its ``max_len`` must be a multiple of the tile);
    prefill (``q_len > 1``) must start at position 0, as in `model.generate`. ``carry``: ``{anchor layer: tiles}``.
    """

    schedule: Schedule
    keep: int

    @property
    def tile(self) -> int:
        return self.schedule.tile_size

    def __call__(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array, *, q_offset: jax.Array,
                 kv_len: jax.Array, carry: Any) -> tuple[jax.Array, Any]:
        carry = dict(carry or {})
        kind, tile = self.schedule.layer_types[layer], self.tile
        if q.shape[1] == 1:
            return self._decode(layer, kind, q, k, v, kv_len, carry)
        t = q.shape[1]
        k, v, keep = k[:, :t], v[:, :t], min(self.keep, -(-t // tile))
        if kind == "reuse":
            idx = K.reuse_tile_indices(carry[self.schedule.anchor_of[layer]], self.schedule.head_map[layer])
            return K.sparse_prefill_attention(q, k, v, idx, tile=tile), carry
        if kind == "anchor":
            out, carry[layer] = K.anchor_prefill_attention(q, k, v, keep=keep, tile=tile)
            return out, carry
        carry[layer] = K.prefill_tile_scores_topk(q, k, keep=keep, tile=tile)
        return K.flash_attention(q, k, v), carry

    def _decode(self, layer: int, kind: str, q: jax.Array, k: jax.Array, v: jax.Array, kv_len: jax.Array,
                carry: dict) -> tuple[jax.Array, Any]:
        tile, q1 = self.tile, q[:, 0]
        keep = min(self.keep, k.shape[1] // tile)
        if kind == "reuse":
            idx = K.reuse_tile_indices(carry[self.schedule.anchor_of[layer]], self.schedule.head_map[layer])
            out = K.sparse_decode_attention(q1, k, v, idx, kv_len, tile=tile, layout="seq")
        elif kind == "anchor":
            out, carry[layer] = K.anchor_decode_attention(q1, k, v, kv_len, keep=keep, tile=tile, layout="seq")
        else:
            _, carry[layer] = K.anchor_decode_attention(q1, k, v, kv_len, keep=keep, tile=tile, layout="seq")
            out = K.flash_attention(q, k, v, q_offset=kv_len - 1, kv_len=kv_len)[:, 0]
        return out[:, None], carry


def sink_window_tiles(tile_pos: jax.Array, keep: int) -> jax.Array:
    """Key tiles of StreamingLLM at tile granularity: tile 0 (the attention sinks) plus the ``keep - 1`` most recent
    tiles up to ``tile_pos`` (the query's own tile); ``arange(keep)`` while ``tile_pos < keep`` (tiles after the
    query are then removed by causality). tile_pos: ``[n]`` int -> ``[n, keep]`` distinct int32 tile numbers."""
    tile_pos = jnp.asarray(tile_pos, jnp.int32)[:, None]
    recent = tile_pos - (keep - 2) + jnp.arange(keep - 1)          # [n, keep - 1], ends at the query's tile
    window = jnp.concatenate([jnp.zeros_like(tile_pos), recent], axis=1)
    return jnp.where(tile_pos < keep, jnp.arange(keep), window).astype(jnp.int32)


@dataclass(frozen=True)
class KernelSinkWindow:
    """StreamingLLM (sink tokens + sliding window, Xiao et al. 2023) through the same gather kernels as
    `KernelKascadeAttention`, at the same budget of ``keep`` key tiles: tile 0 holds the sinks, the other
    ``keep - 1`` tiles are the most recent ones. Layers in ``dense_layers`` run :func:`kernels.flash_attention`.
    Prefill must start at position 0; decode needs a cache ``max_len`` that is a multiple of ``tile``."""

    keep: int
    tile: int = 32
    dense_layers: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        if self.keep < 2 or self.tile <= 0:
            raise ValueError(f"KernelSinkWindow needs keep >= 2 tiles (sink + window) and tile > 0, got "
                             f"keep={self.keep}, tile={self.tile}")

    def __call__(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array, *, q_offset: jax.Array,
                 kv_len: jax.Array, carry: Any) -> tuple[jax.Array, Any]:
        b, t, kv_heads = q.shape[0], q.shape[1], k.shape[2]
        if layer in self.dense_layers:
            return K.flash_attention(q, k, v, q_offset=q_offset, kv_len=kv_len), carry
        if t == 1:  # decode: the query is position kv_len - 1
            keep = min(self.keep, k.shape[1] // self.tile)
            idx = sink_window_tiles(jnp.reshape((kv_len - 1) // self.tile, (1,)), keep)[0]
            idx = jnp.broadcast_to(idx, (b, kv_heads, keep))
            out = K.sparse_decode_attention(q[:, 0], k, v, idx, kv_len, tile=self.tile, layout="seq")
            return out[:, None], carry
        n_tiles = -(-t // self.tile)
        keep = min(self.keep, n_tiles)
        idx = jnp.broadcast_to(sink_window_tiles(jnp.arange(n_tiles), keep), (b, kv_heads, n_tiles, keep))
        return K.sparse_prefill_attention(q, k[:, :t], v[:, :t], idx, tile=self.tile), carry


def compiled_forward(model: Any, attention: Any = None) -> Callable[..., tuple[jax.Array, Any, Any]]:
    """``f(tokens, cache) -> (logits, cache, carry)``: `model.Llama.__call__` under one ``jax.jit``.

    The module is split into graph and state once, so a call costs only the compiled computation
    (`model.forward` splits on every call, ~10 ms, which matters for a small model's decode step)."""
    from flax import nnx

    from .model import dense_attention, forward_split

    graphdef, state = nnx.split(model)
    attention = dense_attention if attention is None else attention
    return lambda tokens, cache: forward_split(graphdef, state, tokens, cache, attention)


def schedule_summary(schedule: Schedule) -> dict[str, Any]:
    """The parts of a schedule a benchmark JSON records."""
    d = dataclasses.asdict(schedule)
    return {key: d[key] for key in ("model", "num_layers", "layer_types", "anchor_of", "tile_size", "budget")}


def default_schedule(model: str, num_layers: int, kv_heads: int, num_anchors: int, tile: int,
                     budget: float) -> Schedule:
    """Layer 0 dense plus ``num_anchors - 1`` evenly spread anchors (when no calibrated schedule is given)."""
    step = num_layers / num_anchors
    anchors = [round(i * step) for i in range(1, num_anchors)]
    return Schedule.from_anchors(model, num_layers, kv_heads, anchors, tile_size=tile, budget=budget, min_keys=0,
                                 method="evenly-spaced")


def random_qkv(key: jax.Array, batch: int, t: int, length: int, q_heads: int, kv_heads: int, head_dim: int,
               dtype: Any = jnp.float32) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Random q ``[batch, t, q_heads, d]`` and k, v ``[batch, length, kv_heads, d]`` for kernel timing."""
    kq, kk, kv = jax.random.split(key, 3)
    return (jax.random.normal(kq, (batch, t, q_heads, head_dim), dtype),
            jax.random.normal(kk, (batch, length, kv_heads, head_dim), dtype),
            jax.random.normal(kv, (batch, length, kv_heads, head_dim), dtype))


# ------------------------------------------------------------------------------------------------ roofline, results
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


def measure_peaks(n_matmul: int, copy_mb: int, reps: int = 5) -> dict[str, float]:
    """Rough peaks XLA reaches on this backend: FLOP/s of an ``n x n`` float32 matmul and bytes/s of an elementwise
    pass over ``copy_mb`` MiB (read + write)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n_matmul, n_matmul), jnp.float32)
    x = jax.random.normal(jax.random.PRNGKey(1), (copy_mb * 2**20 // 4,), jnp.float32)
    mm, cp = jax.jit(lambda a: a @ a), jax.jit(lambda x: x * 1.0001)
    t = compare({"matmul": lambda: mm(a), "copy": lambda: cp(x)}, reps=reps)
    return {"FLOP/s": 2 * n_matmul**3 / t["matmul"]["median_s"], "bytes/s": 2 * x.nbytes / t["copy"]["median_s"]}


def whole_model_ratio(t_dense: float, t_anchor: float, t_reuse: float, *, num_layers: int = 32,
                      num_anchors: int = 4) -> float:
    """Dense time of ``num_layers`` layers over Kascade's (layer 0 dense, ``num_anchors`` anchors, the rest reuse)."""
    reuse = num_layers - 1 - num_anchors
    if reuse < 0:
        raise ValueError(f"{num_anchors} anchors do not fit in {num_layers} layers")
    return num_layers * t_dense / (t_dense + num_anchors * t_anchor + reuse * t_reuse)


def min_ratio(result: dict, name: str, dense: str) -> float:
    """Speedup of ``name`` over ``dense`` from each candidate's fastest repetition (``min_s``) in one result."""
    return result["times"][dense]["min_s"] / result["times"][name]["min_s"]


def whole_model_ratio_from_minima(result: dict, dense: str, anchor: str, reuse: str, **kw: int) -> float:
    """`whole_model_ratio` of one benchmark result from each candidate's fastest repetition."""
    t = {n: result["times"][n]["min_s"] for n in (dense, anchor, reuse)}
    return whole_model_ratio(t[dense], t[anchor], t[reuse], **kw)


def find_result(doc: dict, phase: str, context: int | None = None, **match: Any) -> dict:
    """The result of ``doc["results"]`` with this phase and context (default: the largest context)."""
    rows = [r for r in doc["results"] if r["phase"] == phase and all(r.get(k) == v for k, v in match.items())]
    if not rows:
        raise KeyError(f"no {phase} result matching {match}")
    if context is None:
        return max(rows, key=lambda r: r["context"])
    for r in rows:
        if r["context"] == context:
            return r
    raise KeyError(f"no {phase} result at context {context}; have {sorted(r['context'] for r in rows)}")


def speedup_rows(doc: dict, key: str = "speedup") -> list[dict[str, Any]]:
    """One row per result of a ``bench_attention`` JSON: phase, context, the fastest dense baseline and its median
    time, the speedups over it (``vs_best``) and the reuse layer's speedup over each dense baseline."""
    rows = []
    for r in doc["results"]:
        s = r[key]
        rows.append({"phase": r["phase"], "context": r["context"], "best dense": s["best_dense"],
                     "dense ms": r["times"][s["best_dense"]]["median_s"] * 1e3, **s["vs_best"],
                     **{f"{k.removeprefix('vs_')} (reuse)": v["reuse"] for k, v in s.items()
                        if k.startswith("vs_") and k != "vs_best"}})
    return rows
