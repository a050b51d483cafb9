r"""Benchmark harness: honest wall-clock timing and results I/O (cost models live in `cost.py`; the policies
timed live in `kascade.py` and `baselines.py`).

Timing rules (:func:`compare`): every candidate is compiled and run ``warmup`` times first; then the candidates are
timed *round-robin* (one run of each, ``reps`` times over), each run ending in ``jax.block_until_ready``, so that
a noisy neighbour on a shared CPU slows all candidates alike; we report the median (and the minimum).

What the timed work should cost (FLOPs, bytes) is `kascade_lite.cost`.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

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


def write_results(path: str | os.PathLike, command: str, config: dict[str, Any], rows: list[dict], *,
                  smoke: bool) -> dict:
    """Write ``{"provenance", "config", "results"}`` atomically and return it (``smoke``: a smoke-size run).

    The provenance also records the machine's load averages over the last 1, 5 and 15 minutes at writing time
    (``load_average``): on a 2-core machine a 15-minute load near 2 or above means the timings shared the CPU."""
    doc = {"provenance": {**provenance(command, smoke=smoke), "load_average": list(os.getloadavg())},
           "config": config, "results": rows}
    write_json_atomic(path, doc)
    return doc


# ------------------------------------------------------------------------------------------------ model timing
def schedule_summary(schedule: Schedule) -> dict[str, Any]:
    """The parts of a schedule a benchmark JSON records."""
    d = dataclasses.asdict(schedule)
    return {key: d[key] for key in ("model", "num_layers", "layer_types", "anchor_of", "tile_size", "budget")}


def random_qkv(key: jax.Array, batch: int, t: int, length: int, q_heads: int, kv_heads: int, head_dim: int,
               dtype: Any = jnp.float32) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Random q ``[batch, t, q_heads, d]`` and head-major k, v ``[batch, kv_heads, length, d]`` for kernel timing."""
    kq, kk, kv = jax.random.split(key, 3)
    return (jax.random.normal(kq, (batch, t, q_heads, head_dim), dtype),
            jax.random.normal(kk, (batch, kv_heads, length, head_dim), dtype),
            jax.random.normal(kv, (batch, kv_heads, length, head_dim), dtype))


# ------------------------------------------------------------------------------------------------ roofline, results
def measure_machine(copy_mb: int = 1024, n_matmul: int = 2048, reps: int = 5) -> dict[str, float]:
    """This machine's memory and compute rates, measured as XLA reaches them, for a roofline of the same run.

    * ``copy_gb_per_s``: a STREAM-style copy of a ``copy_mb`` MiB float32 buffer (far larger than any cache) into a
      preallocated output (donated, so no page faults are timed), counted as STREAM counts it: bytes read + written.
    * ``read_gb_per_s``: a sum over the same buffer (bytes read; what a decode step mostly does).
    * ``matmul_gflop_per_s``: an ``n_matmul`` square float32 matmul, ``2 n^3`` FLOPs.
    Each is the fastest of ``reps`` timed runs after one untimed run."""
    x = jax.random.normal(jax.random.PRNGKey(1), (copy_mb * 2**20 // 4,), jnp.float32)
    a = jax.random.normal(jax.random.PRNGKey(0), (n_matmul, n_matmul), jnp.float32)
    copy = jax.jit(lambda src, dst: dst.at[:].set(src), donate_argnums=1)
    total, matmul = jax.jit(jnp.sum), jax.jit(lambda a: a @ a)
    out = jax.block_until_ready(copy(x, jnp.zeros_like(x)))
    best: dict[str, float] = {}
    for _ in range(reps):
        t0 = time.perf_counter()
        out = jax.block_until_ready(copy(x, out))
        best["copy"] = min(best.get("copy", 1e9), time.perf_counter() - t0)
    for name, fn in (("read", lambda: total(x)), ("matmul", lambda: matmul(a))):
        time_once(fn)
        best[name] = min(time_once(fn) for _ in range(reps))
    return {"copy_gb_per_s": 2 * x.nbytes / best["copy"] / 1e9, "read_gb_per_s": x.nbytes / best["read"] / 1e9,
            "matmul_gflop_per_s": 2 * n_matmul**3 / best["matmul"] / 1e9, "copy_mib": copy_mb, "n_matmul": n_matmul}


def rates(times: dict[str, dict], work: dict[str, float], unit: str) -> dict[str, float]:
    """Achieved rate of each timed path: ``work[name]`` (bytes for ``unit="gb"``, FLOPs for ``unit="gflop"``) over
    its median time, in GB/s or GFLOP/s."""
    if unit not in ("gb", "gflop"):
        raise ValueError(f"unit must be 'gb' or 'gflop', got {unit!r}")
    return {name: work[name] / times[name]["median_s"] / 1e9 for name in times if name in work}


def whole_model_ratio(t_dense: float, t_anchor: float, t_reuse: float, *, num_layers: int = 32,
                      num_anchors: int = 4) -> float:
    """Dense time of ``num_layers`` layers over Kascade's (layer 0 dense, ``num_anchors`` anchors, the rest reuse)."""
    reuse = num_layers - 1 - num_anchors
    if reuse < 0:
        raise ValueError(f"{num_anchors} anchors do not fit in {num_layers} layers")
    return num_layers * t_dense / (t_dense + num_anchors * t_anchor + reuse * t_reuse)
