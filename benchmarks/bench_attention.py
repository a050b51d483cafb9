"""Attention-op benchmark: Kascade anchor / reuse layers (`kascade.py`, key tiles) vs dense baselines, one process,
median of repetitions.

    python benchmarks/bench_attention.py            # Llama-3.1-8B shape, ~10 min on 2 CPU cores
    python benchmarks/bench_attention.py --smoke    # tiny sizes (CI), writes to a temporary folder unless --out

Writes ``data/bench_attention_cpu.json`` (decode 2k-32k, prefill 2k-16k, tile 32, budget 10 %) and
``data/bench_headline_cpu.json`` (the design's headline setting: 512 tokens, tile 16, 8 of 32 tiles, for the
Llama-3.1-8B and SmolLM2-135M head shapes). Times are per layer, batch 1, float32. Kascade reads the model's
sequence-major cache ``[batch, L, kv_heads, head_dim]`` (``anchor_seq`` / ``reuse_seq``); the dense decode baseline
is timed in both layouts.
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

from kascade_lite import bench as B
from kascade_lite import kernels as K
from kascade_lite.config import LLAMA_3_1_8B, SMOLLM2_135M, LlamaConfig
from kascade_lite.cost import whole_model_time
from kascade_lite.kascade import attend, select, tiles_kept
from kascade_lite.schedule import default_schedule

DENSE_DECODE = ("dense_heads", "dense_seq", "flash", "xla")
DENSE_PREFILL = ("flash", "xla")


def decode_candidates(cfg: LlamaConfig, context: int, tile: int, budget: float) -> tuple[dict[str, Callable], dict]:
    """Zero-argument callables for one decode step at ``context`` cached keys."""
    q, k, v = B.random_qkv(jax.random.PRNGKey(context), 1, 1, context, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    kt, vt, q1, n = K.to_tiles(k, tile), K.to_tiles(v, tile), q[:, 0], context
    jit = jax.jit
    choose = lambda q, k: select(q, k, n - 1, n, q_tile=1, unit=tile, pool="group", budget=budget,  # noqa: E731
                                 min_keys=0)
    anchor = jit(lambda q, k, v: attend(q, k, v, choose(q, k), n - 1, n))
    sel = jit(choose)(q, k)  # what a reuse layer receives (head map = identity: same cost)
    reuse = jit(lambda q, k, v, s: attend(q, k, v, s, n - 1, n))
    dense_h = jit(lambda q, k, v: K.dense_decode_attention(q, k, v, n, tile=tile))
    dense_s = jit(lambda q, k, v: K.dense_decode_attention(q, k, v, n, tile=tile, layout="seq"))
    flash = jit(lambda q, k, v: K.flash_attention(q, k, v, q_offset=n - 1, kv_len=n, block_k=min(4096, n)))
    xla = jit(lambda q, k, v: K.xla_attention(q, k, v, q_offset=n - 1, kv_len=n))
    return {
        "dense_heads": lambda: dense_h(q1, kt, vt), "dense_seq": lambda: dense_s(q1, k, v),
        "flash": lambda: flash(q, k, v), "xla": lambda: xla(q, k, v),
        "anchor_seq": lambda: anchor(q, k, v), "reuse_seq": lambda: reuse(q, k, v, sel),
    }, {}


def prefill_candidates(cfg: LlamaConfig, t: int, tile: int, budget: float) -> tuple[dict[str, Callable], dict]:
    """Zero-argument callables for a causal prefill of ``t`` tokens; dense XLA skipped when it would not fit."""
    q, k, v = B.random_qkv(jax.random.PRNGKey(t), 1, t, t, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    choose = lambda q, k: select(q, k, 0, t, q_tile=tile, unit=tile, pool="group", budget=budget,  # noqa: E731
                                 min_keys=0)
    anchor = jax.jit(lambda q, k, v: attend(q, k, v, choose(q, k), 0, t))
    sel = jax.jit(choose)(q, k)
    reuse = jax.jit(lambda q, k, v, s: attend(q, k, v, s, 0, t))
    flash = jax.jit(lambda q, k, v: K.flash_attention(q, k, v))
    cands = {"flash": lambda: flash(q, k, v), "anchor": lambda: anchor(q, k, v), "reuse": lambda: reuse(q, k, v, sel)}
    skipped = {}
    score_bytes = K.xla_attention_bytes(t, t, cfg.num_heads)
    if score_bytes <= B.MEMORY_LIMIT_BYTES:
        xla = jax.jit(lambda q, k, v: K.xla_attention(q, k, v))
        cands["xla"] = lambda: xla(q, k, v)
    else:
        skipped["xla"] = f"skipped: the [{cfg.num_heads}, {t}, {t}] float32 scores need {score_bytes / 1e9:.1f} GB"
    return cands, skipped


def summarise(phase: str, times: dict[str, dict], schedule, layout: str = "") -> dict[str, Any]:
    """Speedups (median ratios) of anchor, reuse and the whole-model mix vs each dense baseline and the best one."""
    dense_names = [n for n in (DENSE_DECODE if phase == "decode" else DENSE_PREFILL) if n in times]
    best = min(dense_names, key=lambda n: times[n]["median_s"])
    anchor, reuse = times[f"anchor{layout}"]["median_s"], times[f"reuse{layout}"]["median_s"]
    out: dict[str, Any] = {"best_dense": best}
    for name in dense_names + ["best"]:
        t = times[best if name == "best" else name]["median_s"]
        whole_dense = schedule.num_layers * t
        out[f"vs_{name}"] = {
            "anchor": t / anchor, "reuse": t / reuse,
            "whole_model": whole_dense / whole_model_time(schedule, t, anchor, reuse),
            # layer 0 also has to emit Top-k: count it as dense + a full anchor step (an upper bound on the cost)
            "whole_model_conservative": whole_dense / (whole_model_time(schedule, t, anchor, reuse) + anchor),
        }
    return out


def run_grid(cfg: LlamaConfig, *, phase: str, contexts: list[int], tile: int, budget: float, reps: int,
             schedule) -> list[dict]:
    """Time every candidate at every context; one row per context."""
    rows = []
    for n in contexts:
        keep = tiles_kept(n, tile, budget, 0)
        make = decode_candidates if phase == "decode" else prefill_candidates
        cands, skipped = make(cfg, n, tile, budget)
        times = B.compare(cands, reps=reps)
        row = {"phase": phase, "context": n, "tile": tile, "keep_tiles": keep, "keep_keys": keep * tile,
               "times": times, "skipped": skipped}
        row["speedup"] = summarise(phase, times, schedule, "_seq" if phase == "decode" else "")
        best = row["speedup"]["vs_best"]
        print(f"{phase:7s} {n:6d}  best dense {row['speedup']['best_dense']:11s} "
              f"{times[row['speedup']['best_dense']]['median_s'] * 1e3:9.1f} ms  "
              f"anchor x{best['anchor']:.2f}  reuse x{best['reuse']:.2f}  whole x{best['whole_model']:.2f}",
              flush=True)
        rows.append(row)
    return rows


def shape_config(cfg: LlamaConfig, **extra: Any) -> dict[str, Any]:
    return {"q_heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "batch": 1,
            "dtype": "float32", **extra}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    p.add_argument("--out", type=Path, help="output folder (required at full size, e.g. data/ to update the "
                                            "published results; with --smoke default: a new temporary folder)")
    p.add_argument("--only", choices=("attention", "headline"), help="run one of the two parts")
    args = p.parse_args(argv)
    if args.out is None and not args.smoke:
        p.error("--out is required at full size (e.g. --out data to update the published results)")
    out = args.out or Path(tempfile.mkdtemp(prefix="kascade-lite-smoke-"))
    command = ("python benchmarks/bench_attention.py " + shlex.join(sys.argv[1:] if argv is None else argv)).strip()
    cfg, tile, budget = LLAMA_3_1_8B, 32, 0.1
    schedule = default_schedule("llama-3.1-8b", cfg.num_layers, cfg.num_kv_heads, 5, tile, budget)
    if args.only != "headline":
        decode = [512, 1024] if args.smoke else [2048, 4096, 8192, 16384, 32768]
        prefill = [256, 512] if args.smoke else [2048, 4096, 8192, 16384]
        rows = run_grid(cfg, phase="decode", contexts=decode, tile=tile, budget=budget, reps=2 if args.smoke else 7,
                        schedule=schedule)
        rows += run_grid(cfg, phase="prefill", contexts=prefill, tile=tile, budget=budget,
                         reps=2 if args.smoke else 2, schedule=schedule)
        config = shape_config(cfg, model="llama-3.1-8b (attention shape only; random q/k/v)", tile=tile,
                              budget=budget, schedule=B.schedule_summary(schedule), smoke=args.smoke)
        B.write_results(out / "bench_attention_cpu.json", command, config, rows, smoke=args.smoke)
    if args.only != "attention":
        rows = []
        for name, shape in (("llama-3.1-8b", cfg), ("smollm2-135m", SMOLLM2_135M)):
            sched = default_schedule(name, shape.num_layers, shape.num_kv_heads, 5, 16, 0.25)
            for phase in ("decode", "prefill"):
                for row in run_grid(shape, phase=phase, contexts=[512], tile=16, budget=0.25,
                                    reps=3 if args.smoke else 15, schedule=sched):
                    rows.append({"shape": name, **row})
        config = {"setting": "512 tokens, tile 16, 8 of 32 tiles (budget 25 %)", "dtype": "float32", "batch": 1,
                  "claim": "original guide: 1.8-2.2x on CPU", "smoke": args.smoke}
        B.write_results(out / "bench_headline_cpu.json", command, config, rows, smoke=args.smoke)
    print(f"wrote results to {out}")


if __name__ == "__main__":
    main()
