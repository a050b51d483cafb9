"""Attention-op benchmark: Kascade anchor / reuse layers (`kascade.py`) at both granularities and several budgets vs
the dense baselines, one process, median of repetitions, each path against this machine's measured rates.

    python benchmarks/bench_attention.py --out data        # Llama-3.1-8B shape, ~25 min on 2 CPU cores
    python benchmarks/bench_attention.py --smoke           # tiny sizes (CI), writes to a temporary folder unless --out
    python benchmarks/bench_attention.py --gpu --out data  # on a GPU (benchmarks/gpu.sh): bf16, + cuDNN, longer

Writes ``bench_attention_cpu.json`` (decode 2k-32k, prefill 2k-16k; key positions, the paper's rule, and key tiles
of 32, at budgets 10 / 30 / 50 % without a floor) and ``bench_headline_cpu.json`` (512 tokens, tile 16, 25 % of the
keys, for the Llama-3.1-8B and SmolLM2-135M head shapes). Times are per layer, batch 1, float32, on the model's
head-major cache ``[batch, kv_heads, L, head_dim]``. Decode candidates: ``dense`` (two matmuls over the cache, read
in place), ``flash``, ``xla`` (the dense baselines; the fastest is the reference), ``anchor_<g>@<budget>`` and
``reuse_<g>@<budget>`` (Kascade, granularity ``position`` or ``tile``), and two counter-examples that are not
baselines: ``dense_seq`` (the same dense step on a sequence-major ``[batch, L, kv_heads, head_dim]`` copy: what the
layout costs) and ``reuse_masked`` (a reuse layer at 10 % key tiles written as a mask over the whole cache: the same
selection, no gather). Every row records the bytes (decode) or FLOPs (prefill) of each candidate (`cost.
attention_cost`) and its achieved GB/s or GFLOP/s; ``config.machine`` is this machine's copy and read bandwidth and
matmul rate (`bench.measure_machine`), measured in the same run. With ``--gpu`` the run is in bfloat16 at longer
contexts, adds ``cudnn`` (``jax.nn.dot_product_attention(implementation="cudnn")`` on its own ``[batch, L, heads, d]``
layout, the fused dense kernel a GPU user would compare against) and writes ``bench_attention_gpu.json`` only.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from kascade_lite import bench as B
from kascade_lite import kernels as K
from kascade_lite.attention import NEG_INF
from kascade_lite.config import LLAMA_3_1_8B, SMOLLM2_135M, LlamaConfig
from kascade_lite.cost import attention_cost, whole_model_time
from kascade_lite.kascade import GRANULARITIES, Selection, attend, keys_read, select
from kascade_lite.schedule import default_schedule

DENSE_DECODE = ("dense", "flash", "xla", "cudnn")
DENSE_PREFILL = ("flash", "xla", "cudnn")
BUDGETS = (0.1, 0.3, 0.5)


def masked_decode(q: jax.Array, k: jax.Array, v: jax.Array, sel: Selection, kv_len: int) -> jax.Array:
    """A reuse step written as a mask: scores over the whole head-major cache ``[batch, kv_heads, L, d]``, every key
    outside ``sel``'s tiles masked, softmax, values over the whole cache. Same output as `kascade.attend` (up to
    float rounding), dense cost. q: ``[batch, 1, heads, d]`` -> ``[batch, heads, d]``."""
    b, h, length, d = k.shape
    tiles = jnp.zeros((b, h, length // sel.unit), bool)
    rows = (jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None], sel.idx[:, :, 0, 0])
    mask = jnp.repeat(tiles.at[rows].set(sel.keep[:, :, 0, 0]), sel.unit, axis=-1)
    mask = mask | (jnp.arange(length) == kv_len - 1)                    # the query's own key
    qg = q[:, 0].astype(jnp.float32).reshape(b, h, -1, d) * d ** -0.5
    s = jnp.einsum("bhgd,bhnd->bhgn", qg, k, preferred_element_type=jnp.float32)
    p = jax.nn.softmax(jnp.where(mask[:, :, None] & (jnp.arange(length) < kv_len), s, NEG_INF), axis=-1)
    return jnp.einsum("bhgn,bhnd->bhgd", p, v, preferred_element_type=jnp.float32).reshape(b, -1, d)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool,
                    kv_len: int | None = None) -> tuple[Callable[[], Any] | None, str]:
    """``(callable, "")`` timing cuDNN's fused attention on ``[batch, L, kv_heads, d]`` copies of head-major k, v, or
    ``(None, reason)`` where this backend has no cuDNN (any CPU) or the call fails."""
    if jax.default_backend() != "gpu":
        return None, f"skipped: no cuDNN on the {jax.default_backend()} backend"
    ks, vs = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    lengths = None if kv_len is None else jnp.full((q.shape[0],), kv_len, jnp.int32)
    fn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn",
                                                              key_value_seq_lengths=lengths))
    try:
        jax.block_until_ready(fn(q, ks, vs))
    except Exception as e:  # noqa: BLE001 ; an unsupported shape or dtype: record why, time the rest
        return None, f"skipped: cuDNN failed: {str(e).splitlines()[0][:200]}"
    return (lambda: fn(q, ks, vs)), ""


def settings(budgets: tuple[float, ...]) -> list[tuple[str, float]]:
    """``(granularity, budget)`` of every Kascade setting timed."""
    return [(g, b) for b in budgets for g in GRANULARITIES]


def sparse_pair(q: jax.Array, k: jax.Array, v: jax.Array, *, q_offset: int, t: int, unit: int, q_tile: int,
                budget: float) -> tuple[Callable, Callable]:
    """An anchor (select + attend) and a reuse (attend over the anchor's selection) step, zero-argument callables."""
    choose = lambda q, k: select(q, k, q_offset, q_offset + t, q_tile=q_tile, unit=unit, pool="group",  # noqa: E731
                                 budget=budget, min_keys=0)
    anchor = jax.jit(lambda q, k, v: attend(q, k, v, choose(q, k), q_offset, q_offset + t))
    sel = jax.jit(choose)(q, k)  # what a reuse layer receives (head map = identity: same cost)
    reuse = jax.jit(lambda q, k, v, s: attend(q, k, v, s, q_offset, q_offset + t))
    return (lambda: anchor(q, k, v)), (lambda: reuse(q, k, v, sel))


def decode_candidates(cfg: LlamaConfig, context: int, tile: int, budgets: tuple[float, ...],
                      dtype: Any = jnp.float32) -> tuple[dict[str, Callable], dict]:
    """Zero-argument callables for one decode step at ``context`` cached keys."""
    q, k, v = B.random_qkv(jax.random.PRNGKey(context), 1, 1, context, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                           dtype)
    ks, vs, q1, n = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), q[:, 0], context
    jit = jax.jit
    dense = jit(lambda q, k, v: K.dense_decode_attention(q, k, v, n))
    dense_s = jit(lambda q, k, v: K.dense_decode_attention(q, k, v, n, layout="seq"))
    flash = jit(lambda q, k, v: K.flash_attention(q, k, v, q_offset=n - 1, kv_len=n, block_k=min(4096, n)))
    xla = jit(lambda q, k, v: K.xla_attention(q, k, v, q_offset=n - 1, kv_len=n))
    tile_sel = jit(lambda q, k: select(q, k, n - 1, n, q_tile=1, unit=tile, pool="group", budget=budgets[0],
                                       min_keys=0))(q, k)
    masked = jit(lambda q, k, v, s: masked_decode(q, k, v, s, n))
    cands = {"dense": lambda: dense(q1, k, v), "dense_seq": lambda: dense_s(q1, ks, vs),
             "flash": lambda: flash(q, k, v), "xla": lambda: xla(q, k, v),
             "reuse_masked": lambda: masked(q, k, v, tile_sel)}
    for g, b in settings(budgets):
        cands[f"anchor_{g}@{b:g}"], cands[f"reuse_{g}@{b:g}"] = sparse_pair(
            q, k, v, q_offset=n - 1, t=1, unit=tile if g == "tile" else 1, q_tile=1, budget=b)
    cudnn, why = cudnn_attention(q, k, v, causal=False, kv_len=n)
    if cudnn is not None:
        cands["cudnn"] = cudnn
    return cands, {"cudnn": why} if why else {}


def prefill_candidates(cfg: LlamaConfig, t: int, tile: int, budgets: tuple[float, ...],
                       dtype: Any = jnp.float32) -> tuple[dict[str, Callable], dict]:
    """Zero-argument callables for a causal prefill of ``t`` tokens; dense XLA skipped when it would not fit."""
    q, k, v = B.random_qkv(jax.random.PRNGKey(t), 1, t, t, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, dtype)
    flash = jax.jit(lambda q, k, v: K.flash_attention(q, k, v))
    cands = {"flash": lambda: flash(q, k, v)}
    for g, b in settings(budgets):
        cands[f"anchor_{g}@{b:g}"], cands[f"reuse_{g}@{b:g}"] = sparse_pair(
            q, k, v, q_offset=0, t=t, unit=tile if g == "tile" else 1, q_tile=tile, budget=b)
    skipped = {}
    score_bytes = K.xla_attention_bytes(t, t, cfg.num_heads)
    if score_bytes <= B.MEMORY_LIMIT_BYTES:
        xla = jax.jit(lambda q, k, v: K.xla_attention(q, k, v))
        cands["xla"] = lambda: xla(q, k, v)
    else:
        skipped["xla"] = f"skipped: the [{cfg.num_heads}, {t}, {t}] float32 scores need {score_bytes / 1e9:.1f} GB"
    cudnn, why = cudnn_attention(q, k, v, causal=True)
    if cudnn is not None:
        cands["cudnn"] = cudnn
    else:
        skipped["cudnn"] = why
    return cands, skipped


def costs(cfg: LlamaConfig, phase: str, context: int, tile: int, budgets: tuple[float, ...], names: list[str],
          bytes_per_value: int) -> dict[str, dict[str, float]]:
    """`cost.attention_cost` of every candidate (dense baselines and counter-examples cost a dense layer)."""
    def cost(kind: str, keep: int) -> dict[str, float]:
        return attention_cost(phase, kind, context, keep, q_heads=cfg.num_heads, kv_heads=cfg.num_kv_heads,
                              head_dim=cfg.head_dim, bytes_per_value=bytes_per_value)
    out = {n: cost("dense", context) for n in names}
    for g, b in settings(budgets):
        keep = keys_read(context, phase=phase, granularity=g, tile=tile, budget=b, min_keys=0)
        out[f"anchor_{g}@{b:g}"], out[f"reuse_{g}@{b:g}"] = cost("anchor", keep), cost("reuse", keep)
    return {n: c for n, c in out.items() if n in names}


def summarise(phase: str, times: dict[str, dict], cost: dict[str, dict], schedule,
              budgets: tuple[float, ...]) -> dict[str, Any]:
    """Per setting: anchor, reuse and whole-model speed-ups (median ratios) over the fastest dense baseline; the
    achieved rate of every candidate (GB/s in decode, GFLOP/s in prefill)."""
    dense_names = [n for n in (DENSE_DECODE if phase == "decode" else DENSE_PREFILL) if n in times]
    best = min(dense_names, key=lambda n: times[n]["median_s"])
    t = times[best]["median_s"]
    out: dict[str, Any] = {"best_dense": best, "vs_best": {}}
    for g, b in settings(budgets):
        anchor, reuse = times[f"anchor_{g}@{b:g}"]["median_s"], times[f"reuse_{g}@{b:g}"]["median_s"]
        whole = whole_model_time(schedule, t, anchor, reuse)
        out["vs_best"][f"{g}@{b:g}"] = {
            "anchor": t / anchor, "reuse": t / reuse, "whole_model": schedule.num_layers * t / whole,
            # layer 0 also has to emit Top-k: count it as dense + a full anchor step (an upper bound on the cost)
            "whole_model_conservative": schedule.num_layers * t / (whole + anchor)}
    if phase == "decode":
        out["gb_per_s"] = B.rates(times, {n: c["bytes"] for n, c in cost.items()}, "gb")
    else:
        out["gflop_per_s"] = B.rates(times, {n: c["flops"] for n, c in cost.items()}, "gflop")
    return out


def run_grid(cfg: LlamaConfig, *, phase: str, contexts: list[int], tile: int, budgets: tuple[float, ...], reps: int,
             schedule, dtype: Any = jnp.float32) -> list[dict]:
    """Time every candidate at every context; one row per context."""
    rows = []
    for n in contexts:
        make = decode_candidates if phase == "decode" else prefill_candidates
        cands, skipped = make(cfg, n, tile, budgets, dtype)
        times = B.compare(cands, reps=reps)
        cost = costs(cfg, phase, n, tile, budgets, list(times), jnp.dtype(dtype).itemsize)
        row = {"phase": phase, "context": n, "tile": tile,
               "keep_keys": {f"{g}@{b:g}": keys_read(n, phase=phase, granularity=g, tile=tile, budget=b, min_keys=0) for g, b in settings(budgets)},
               "times": times, "cost": cost, "skipped": skipped, "speedup": summarise(phase, times, cost, schedule,
                                                                                      budgets)}
        s = row["speedup"]
        print(f"{phase:7s} {n:6d}  best dense {s['best_dense']:6s} {times[s['best_dense']]['median_s'] * 1e3:9.1f} ms  "
              + "  ".join(f"{k} reuse x{v['reuse']:.2f} whole x{v['whole_model']:.2f}"
                          for k, v in s["vs_best"].items()),
              flush=True)
        rows.append(row)
    return rows


def shape_config(cfg: LlamaConfig, dtype: str = "float32", **extra: Any) -> dict[str, Any]:
    return {"q_heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "batch": 1,
            "dtype": dtype, "cache": "head-major [batch, kv_heads, L, head_dim]", **extra}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    p.add_argument("--out", type=Path, help="output folder (required at full size, e.g. data/ to update the "
                                            "published results; with --smoke default: a new temporary folder)")
    p.add_argument("--only", choices=("attention", "headline"), help="run one of the two parts")
    p.add_argument("--gpu", action="store_true", help="the accelerator run (benchmarks/gpu.sh): bfloat16, longer "
                                                      "contexts, cuDNN; writes bench_attention_gpu.json only")
    args = p.parse_args(argv)
    if args.out is None and not args.smoke:
        p.error("--out is required at full size (e.g. --out data to update the published results)")
    out = args.out or Path(tempfile.mkdtemp(prefix="kascade-lite-smoke-"))
    command = ("python benchmarks/bench_attention.py " + shlex.join(sys.argv[1:] if argv is None else argv)).strip()
    cfg, tile = LLAMA_3_1_8B, 32
    schedule = default_schedule("llama-3.1-8b", cfg.num_layers, cfg.num_kv_heads, 5, tile, 0.1)
    dtype, name = (jnp.bfloat16, "bfloat16") if args.gpu else (jnp.float32, "float32")
    machine = B.measure_machine(64, 256, reps=2) if args.smoke else B.measure_machine()
    print(f"machine: copy {machine['copy_gb_per_s']:.1f} GB/s, read {machine['read_gb_per_s']:.1f} GB/s, "
          f"matmul {machine['matmul_gflop_per_s']:.0f} GFLOP/s", flush=True)
    if args.only != "headline":
        decode = ([512, 1024] if args.smoke else [8192, 32768, 131072] if args.gpu
                  else [2048, 4096, 8192, 16384, 32768])
        prefill = [256, 512] if args.smoke else [8192, 32768] if args.gpu else [2048, 4096, 8192, 16384]
        budgets = (0.1, 0.5) if args.smoke else BUDGETS
        reps = 2 if args.smoke else 30 if args.gpu else 7
        rows = run_grid(cfg, phase="decode", contexts=decode, tile=tile, budgets=budgets, reps=reps,
                        schedule=schedule, dtype=dtype)
        rows += run_grid(cfg, phase="prefill", contexts=prefill, tile=tile, budgets=budgets,
                         reps=2 if args.smoke else 10 if args.gpu else 2, schedule=schedule, dtype=dtype)
        config = shape_config(cfg, name, model="llama-3.1-8b (attention shape only; random q/k/v)", tile=tile,
                              budgets=list(budgets), min_keys=0, schedule=B.schedule_summary(schedule),
                              machine=machine, smoke=args.smoke)
        target = "bench_attention_gpu.json" if args.gpu else "bench_attention_cpu.json"
        B.write_results(out / target, command, config, rows, smoke=args.smoke)
    if args.only != "attention" and not args.gpu:
        rows = []
        for name, shape in (("llama-3.1-8b", cfg), ("smollm2-135m", SMOLLM2_135M)):
            sched = default_schedule(name, shape.num_layers, shape.num_kv_heads, 5, 16, 0.25)
            for phase in ("decode", "prefill"):
                for row in run_grid(shape, phase=phase, contexts=[512], tile=16, budgets=(0.25,),
                                    reps=3 if args.smoke else 15, schedule=sched):
                    rows.append({"shape": name, **row})
        config = {"setting": "512 tokens, tile 16, 8 of 32 tiles (budget 25 %)", "dtype": "float32", "batch": 1,
                  "machine": machine, "smoke": args.smoke}
        B.write_results(out / "bench_headline_cpu.json", command, config, rows, smoke=args.smoke)
    print(f"wrote results to {out}")


if __name__ == "__main__":
    main()
