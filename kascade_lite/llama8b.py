"""Llama-3.1-8B on one CPU machine: bfloat16 weights loaded from the converted files, a 2k prefill and 32 decode
steps, dense vs Kascade side by side in one process, with the process's peak resident memory (target <= 20 GB).
``benchmarks/bench_llama8b.py`` is its command line (`run_llama8b`).

Weights: a ``checkpoint`` is a converted checkpoint (``kascade-lite convert SRC DIR --dtype bfloat16``). Without
it the benchmark writes a synthetic one with the exact Llama-3.1-8B shapes (``layers`` of its layers) into a
temporary folder under ``tmp``, deleted afterwards (also on error), in the converted layout
(`convert.write_converted`, manifest included). Its values are a cheap pattern, not 8 billion fresh random numbers:
one block of 2^22 N(0, 0.02^2) samples in bfloat16, tiled over each matrix from an offset derived from the tensor's
name; the norms are ones. Writing runs at disk speed with one tensor in memory (at most the 1 GB embedding).

Loading is `convert.load_converted(param_dtype=bfloat16)`: one tensor at a time onto the device, no host copy.
Activations are bfloat16 too (``dtype="float32"`` to compare), so the model's ``w.astype(activation dtype)`` casts
are no-ops and the KV caches are half the size. XLA's CPU backend has no bfloat16 matmul: it converts the weight to
float32 before every matmul whatever the activations' dtype, so float32 activations would cost no extra weight
memory, and they decode no faster: side by side at 2 layers and 2k tokens, 1.01 s (bfloat16) against
0.95 s (float32) per dense step, within the noise of the shared 2-core machine. Those conversions are why every
forward is compiled with `COMPILER_OPTIONS` (XLA's memory-optimised scheduler): with the default one, a forward
pass of the 8B would hold float32 copies of all its weights at once. Memory at full size is then the weights
(16.06 GB), the float32 copy of the output head made for each forward (2.1 GB), two KV caches (0.27 GB each,
updated in place by `model.write_cache`) and the runtime.

Policies, both through the model's forward step (`aot_forward`) compiled ahead of time (no timed call compiles, and
no untimed 8B prefill runs only to compile): ``dense`` (exact: `baselines.flash_dense_attention` in prefill and the
model's default `gqa_attention` in decode, the faster dense path of each phase in ``bench_e2e_cpu.json``) and
``kascade`` (`kascade.KascadeAttention` with key tiles and the schedule of `schedule.default_schedule`: layer 0
dense plus evenly spaced anchors, 5 of the 32 layers, the same share of fewer ``layers``; tile 32, budget 10 %).
Prefill = one forward of ``context`` random token ids into an empty `model.KVCache`, timed once per policy; then
``steps`` greedy steps per policy, each policy from its own prefill cache, the two alternating step by
step so that a busy neighbour slows both alike (tokens/s = 1 / median step). Memory: VmRSS before and after load,
after prefill and after decode, and the peak as VmHWM (this process) and ``ru_maxrss`` (which on Linux also counts
the parent's size when the process was forked, e.g. from a large Python process).
"""

from __future__ import annotations

import dataclasses
import resource
import shutil
import statistics
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from . import bench as B
from .baselines import flash_dense_attention
from .config import LLAMA_3_1_8B, LlamaConfig
from .convert import load_converted, write_converted
from .cost import model_step_cost
from .kascade import keys_read
from .methods import Setting, attention
from .model import KVCache, Llama, decode_steps, forward_split, write_cache
from .progress import tqdm
from .schedule import default_schedule

TILE, BUDGET, ANCHORS = 32, 0.1, 5
TARGET_PEAK_RSS_GB = 20
BLOCK = 1 << 22  # samples in the synthetic weights' repeating block
SMOKE_CFG = dataclasses.replace(LLAMA_3_1_8B, vocab_size=4096, hidden_size=256, intermediate_size=896, num_layers=2,
                                num_heads=8, num_kv_heads=2, head_dim=32)
"""Llama-3.1-8B's head layout (GQA 4:1) and RoPE at tiny widths."""
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
COMPILER_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
"""XLA CPU computes a bfloat16 matmul in float32, converting the weight first. Its default (concurrency-optimised)
scheduler runs every weight's conversion early, so a forward pass holds a float32 copy of the whole model (31 GB of
temporaries for the 8B, by ``memory_analysis``); the memory-optimised one converts each weight just before its
matmul (2.1 GB of temporaries, the largest conversion: the output head)."""


# ------------------------------------------------------------------------------------------------ checkpoint
def synthetic_tensor(name: str, shape: tuple[int, ...], base: np.ndarray) -> np.ndarray:
    """Tensor ``name`` of the synthetic checkpoint, bfloat16: ones for a norm, otherwise ``base`` tiled from an
    offset derived from ``name`` (``zlib.crc32``, so every matrix and every run get the same values)."""
    if len(shape) == 1:
        return np.ones(shape, ml_dtypes.bfloat16)
    start = zlib.crc32(name.encode()) % base.size
    return np.resize(np.roll(base, -start), shape)


def write_synthetic(cfg: LlamaConfig, out: Path) -> None:
    """Write the synthetic bfloat16 checkpoint of ``cfg`` into ``out`` (converted layout, one tensor at a time)."""
    need = cfg.num_parameters * 2
    free = shutil.disk_usage(out.parent).free
    if free < 1.05 * need:
        raise OSError(f"{out.parent}: {free / 1e9:.1f} GB free, the synthetic checkpoint needs "
                      f"{need / 1e9:.1f} GB (choose another folder with --tmp)")
    base = (0.02 * np.random.default_rng(0).standard_normal(BLOCK, np.float32)).astype(ml_dtypes.bfloat16)
    write_converted(out, cfg, lambda name, shape: synthetic_tensor(name, shape, base), dtype="bfloat16",
                    source="synthetic Llama-3.1-8B shapes")


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


# ------------------------------------------------------------------------------------------------ memory
def proc_status_gb(key: str) -> float:
    """``key`` (``VmRSS``, ``VmHWM``) of ``/proc/self/status`` in GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024 / 1e9
    raise KeyError(f"/proc/self/status has no {key}")


def memory(samples: dict[str, float]) -> dict[str, Any]:
    """The sampled VmRSS and the peaks, in GB."""
    peak = proc_status_gb("VmHWM")
    return {"rss_gb": samples, "peak_rss_gb": round(peak, 3),
            "ru_maxrss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 3),
            "target_peak_rss_gb": TARGET_PEAK_RSS_GB, "within_target": peak <= TARGET_PEAK_RSS_GB}


# ------------------------------------------------------------------------------------------------ timing
def aot_forward(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, cache: KVCache, attention: Any, *,
                last_only: bool) -> tuple[Callable[[jax.Array, KVCache], tuple[jax.Array, KVCache]], float]:
    """``(f(tokens, cache) -> (logits, cache), compile seconds)``: the model's forward step (`model.forward_split`,
    which only reads the cache, then `model.write_cache`, which writes the new keys in place) with the forward
    compiled ahead of time for these shapes and `COMPILER_OPTIONS`, so the first timed call does not compile (an 8B
    prefill that only compiles would cost minutes). ``cache`` is donated: pass each cache once."""
    t0 = time.perf_counter()
    lowered = forward_split.lower(graphdef, state, tokens, cache, attention, False, last_only)
    compiled = lowered.compile(compiler_options=COMPILER_OPTIONS)

    def step(t: jax.Array, c: KVCache) -> tuple[jax.Array, KVCache]:
        logits, new, _ = compiled(state, t, c)
        return logits, write_cache(c, new)

    return step, time.perf_counter() - t0


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``(fn(), seconds)``, the result ready."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t0


def policies(cfg: LlamaConfig) -> dict[str, tuple[Any, Any]]:
    """Name -> (prefill attention, decode attention)."""
    anchors = max(1, round(ANCHORS * cfg.num_layers / LLAMA_3_1_8B.num_layers))
    s = Setting(default_schedule("llama-3.1-8b", cfg.num_layers, cfg.num_kv_heads, anchors, TILE, BUDGET))
    kascade = attention("kascade_tiles", s)
    return {"dense": (flash_dense_attention, attention("dense", s)), "kascade": (kascade, kascade)}


def add_rate(row: dict[str, Any], model: Llama, phase: str, context: int, schedule: Any) -> None:
    """Record in ``row`` what the step moved and computed (`cost.model_step_cost`; ``schedule`` None: dense) and its
    achieved rate: GB/s for a decode step (its median), GFLOP/s for the prefill."""
    keep = None if schedule is None else keys_read(context, phase=phase, granularity="tile", tile=TILE,
                                                    budget=BUDGET, min_keys=schedule.min_keys)
    row["cost"] = model_step_cost(model.cfg, context, phase=phase, keep_keys=keep,
                                  layer_types=None if schedule is None else schedule.layer_types,
                                  bytes_per_value=jnp.dtype(model.dtype).itemsize)
    if phase == "decode":
        row["gb_per_s"] = row["cost"]["bytes"] / row["median_s"] / 1e9
    else:
        row["gflop_per_s"] = row["cost"]["flops"] / row["seconds"] / 1e9


def run(model: Llama, context: int, steps: int, rss: dict[str, float]) -> dict[str, Any]:
    """Prefill ``context`` random tokens and decode ``steps`` tokens with every `policies` entry, recording VmRSS
    into ``rss``; times in seconds, the Kascade/dense ratios and the schedule."""
    cfg = model.cfg
    graphdef, state = nnx.split(model)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, context)), jnp.int32)
    max_len = -(-(context + steps) // TILE) * TILE
    pols = policies(cfg)
    prefill, decode, loops = {}, {}, {}
    for name, (pre, dec) in pols.items():
        empty = KVCache.empty(cfg, 1, max_len, model.dtype)
        fn, compile_s = aot_forward(graphdef, state, tokens, empty, pre, last_only=True)
        print(f"{name} prefill: compiled in {compile_s:.1f} s, running {context} tokens ...", flush=True)
        (logits, cache), seconds = timed(lambda: fn(tokens, empty))
        prefill[name] = {"seconds": seconds, "compile_s": compile_s,
                         "finite": bool(np.isfinite(np.asarray(logits)).all())}
        print(f"{name} prefill: {seconds:.1f} s", flush=True)
        step, compile_s = aot_forward(graphdef, state, tokens[:, :1], cache, dec, last_only=False)
        decode[name] = {"compile_s": compile_s, "times_s": []}
        loops[name] = decode_steps(step, logits, cache)
        next(loops[name])  # the first token comes from the prefill logits: no step
    rss["after_prefill"] = round(proc_status_gb("VmRSS"), 3)
    for _ in tqdm(range(steps), desc="decode", unit="step"):
        for name, loop in loops.items():
            (_, last), seconds = timed(lambda: next(loop))
            decode[name]["times_s"].append(seconds)
            decode[name]["finite"] = bool(np.isfinite(np.asarray(last)).all())
    rss["after_decode"] = round(proc_status_gb("VmRSS"), 3)
    for row in decode.values():
        row["median_s"] = statistics.median(row["times_s"])
        row["tokens_per_s"] = 1.0 / row["median_s"]
    ratios = {"prefill_speedup": prefill["dense"]["seconds"] / prefill["kascade"]["seconds"],
              "decode_speedup": decode["kascade"]["tokens_per_s"] / decode["dense"]["tokens_per_s"]}
    schedule = pols["kascade"][0].schedule
    for phase, rows in (("prefill", prefill), ("decode", decode)):
        for name, row in rows.items():
            add_rate(row, model, phase, context, schedule if name == "kascade" else None)
    return {"prefill": prefill, "decode": decode, "kascade_vs_dense": ratios,
            "schedule": B.schedule_summary(schedule)}


def measure(ckpt: Path, dtype: Any, context: int, steps: int) -> dict[str, Any]:
    """Load ``ckpt`` in bfloat16 and `run` it; the load time, bytes on disk and memory."""
    rss = {"before_load": round(proc_status_gb("VmRSS"), 3)}
    t0 = time.perf_counter()
    model = load_converted(ckpt, param_dtype=jnp.bfloat16, dtype=dtype, progress=True)  # blocks tensor by tensor
    load_s = time.perf_counter() - t0
    rss["after_load"] = round(proc_status_gb("VmRSS"), 3)
    print(f"loaded {dir_bytes(ckpt) / 1e9:.2f} GB in {load_s:.1f} s (RSS {rss['after_load']:.2f} GB)", flush=True)
    row = {"context": context, "decode_steps": steps, "checkpoint_bytes": dir_bytes(ckpt), "load_s": load_s,
           "num_parameters": model.cfg.num_parameters}
    row.update(run(model, context, steps, rss))
    row["memory"] = memory(rss)
    return row


# ------------------------------------------------------------------------------------------------ run
def synthetic_row(cfg: LlamaConfig, tmp_root: Path, dtype: Any, context: int, steps: int) -> dict[str, Any]:
    """`measure` on a synthetic checkpoint of ``cfg`` written into a temporary folder under ``tmp_root`` (deleted
    afterwards, also on error), with the time it took to write."""
    with tempfile.TemporaryDirectory(dir=tmp_root, prefix="kascade-bench-llama8b-") as tmp:
        ckpt = Path(tmp) / "llama-3.1-8b-synthetic"
        print(f"writing a synthetic checkpoint ({cfg.num_parameters * 2 / 1e9:.2f} GB) into {tmp}", flush=True)
        t0 = time.perf_counter()
        write_synthetic(cfg, ckpt)
        write_s = time.perf_counter() - t0
        print(f"wrote it in {write_s:.1f} s", flush=True)
        return {"write_s": write_s, **measure(ckpt, dtype, context, steps)}



def run_llama8b(out: Path, command: str, *, smoke: bool, checkpoint: Path | None = None, layers: int | None = None,
                context: int | None = None, steps: int | None = None, dtype: str = "bfloat16",
                tmp: Path | None = None) -> dict[str, Any]:
    """Measure ``checkpoint`` (a converted one) or a synthetic checkpoint of ``layers`` Llama-3.1-8B layers (smoke:
    `SMOKE_CFG`) written under ``tmp``, into ``out/bench_llama8b_cpu.json``; returns the row."""
    context = context or (256 if smoke else 2048)
    steps = steps or (4 if smoke else 32)
    machine = B.measure_machine(64, 256, reps=2) if smoke else B.measure_machine()
    config: dict[str, Any] = {"weights_dtype": "bfloat16", "activations_dtype": dtype, "batch": 1,
                              "machine": machine,
                              "tile": TILE, "budget": BUDGET, "tokens": "random ids (seed 0)",
                              "xla_compiler_options": COMPILER_OPTIONS, "smoke": smoke}
    if checkpoint is not None:
        config["model"] = f"converted checkpoint {checkpoint.name}"
        row = measure(checkpoint, DTYPES[dtype], context, steps)
    else:
        cfg = SMOKE_CFG if smoke else dataclasses.replace(LLAMA_3_1_8B, num_layers=layers or 32)
        config["model"] = (f"synthetic, Llama-3.1-8B shapes{' at smoke widths' if smoke else ''}, "
                           f"{cfg.num_layers} layers; values: a block of {BLOCK} N(0, 0.02^2) bfloat16 samples, "
                           f"tiled; norms: ones")
        row = synthetic_row(cfg, tmp or Path(tempfile.gettempdir()), DTYPES[dtype], context, steps)
    path = out / "bench_llama8b_cpu.json"
    B.write_results(path, command, config, [row], smoke=smoke)
    speedup, mem = row["kascade_vs_dense"], row["memory"]
    print(f"Kascade vs dense: prefill x{speedup['prefill_speedup']:.2f}, decode x{speedup['decode_speedup']:.2f}; "
          f"peak RSS {mem['peak_rss_gb']:.2f} GB; wrote {path}")
    return row
