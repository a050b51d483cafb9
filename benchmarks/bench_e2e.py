"""End-to-end benchmark on SmolLM2-135M: prefill latency and decode tokens/s, dense vs Kascade, one process.

    python benchmarks/bench_e2e.py --out data # contexts 512, 2k, 8k; ~15 min on 2 CPU cores
    python benchmarks/bench_e2e.py --smoke    # one tiny context (CI), writes to a temporary folder unless --out
    python benchmarks/bench_e2e.py --gpu --out data  # on a GPU (benchmarks/gpu.sh): bf16, writes bench_e2e_gpu.json

Policies (all through the model's jitted forward, `bench.compiled_forward`, float32, on the model's head-major
`model.KVCache`): ``dense`` (the model's default `gqa_attention`: two batched matmuls over the cache, which in
prefill materialise the scores), ``flash`` (`kernels.flash_attention`), ``kascade`` (`kascade.KascadeAttention`
with key tiles, the speed variant: gathers of whole contiguous tiles) and, in decode, ``kascade_positions`` (the
paper's per-position Top-k). Kascade runs the schedule the accuracy tables use (``data/schedules/smollm2-135m_
greedy.json``: layer 0 dense + 5 anchors, tile 32, 10 % of keys, floor 128). Prefill = one forward of ``context``
WikiText-2 tokens into an empty cache; decode = one forward of a single token after ``context`` cached tokens
(tokens/s = 1 / median step time). Each row also records the bytes-moved ceiling of the decode speedup
(`cost.decode_ceiling`: weights + K/V read per step, dense over Kascade). ``--gpu`` runs SmolLM2's exact shapes
with random bfloat16 weights and random token ids (the real weights and WikiText-2 do not travel to the lent
machine; timings do not depend on the values) at 2k and 8k.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from kascade_lite import bench as B
from kascade_lite.baselines import flash_dense_attention
from kascade_lite.models import smollm2_or_tiny
from kascade_lite.cost import decode_ceiling
from kascade_lite.data import wikitext_windows
from kascade_lite.files import shipped_dir
from kascade_lite.kascade import KascadeAttention, tiles_kept
from kascade_lite.config import SMOLLM2_135M
from kascade_lite.model import KVCache, Llama, dense_attention
from kascade_lite.schedule import Schedule, default_schedule

TILE, BUDGET = 32, 0.1
SCHEDULE = "schedules/smollm2-135m_greedy.json"


def policies(schedule: Schedule, phase: str = "prefill") -> dict[str, Any]:
    """The attention policies timed (Kascade's key budget follows the context: `kascade.keys_kept`)."""
    pols = {"dense": dense_attention, "flash": flash_dense_attention,
            "kascade": KascadeAttention(schedule, granularity="tile")}
    if phase == "decode":
        pols["kascade_positions"] = KascadeAttention(schedule)
    return pols


def run_context(model, tokens: jax.Array, schedule: Schedule, *, reps_prefill: int, reps_decode: int,
                dense_prefill_limit: int) -> dict[str, Any]:
    """Prefill and decode timings of every policy at ``context = tokens.shape[1]``."""
    context = tokens.shape[1]
    max_len = context + TILE  # room for the decoded token; a multiple of the tile
    fwd = {phase: {name: B.compiled_forward(model, pol) for name, pol in policies(schedule, phase).items()}
           for phase in ("prefill", "decode")}
    empty = KVCache.empty(model.cfg, 1, max_len, model.dtype)
    prefill = {name: (lambda f=f: f(tokens, empty)) for name, f in fwd["prefill"].items()
               if name != "dense" or context <= dense_prefill_limit}
    prefill_times = B.compare(prefill, reps=reps_prefill)
    _, cache, _ = fwd["prefill"]["flash"](tokens, empty)  # the same cache for every decode policy
    nxt = tokens[:, -1:]
    decode = {name: (lambda f=f: f(nxt, cache)[0]) for name, f in fwd["decode"].items()}
    decode_times = B.compare(decode, reps=reps_decode)
    anchors = sum(t != "reuse" for t in schedule.layer_types)
    row = {"context": context, "keep_tiles": tiles_kept(context, TILE, schedule.budget, schedule.min_keys),
           "prefill": prefill_times, "decode": decode_times,
           "decode_ceiling": decode_ceiling(model.cfg, context, budget=schedule.budget, min_keys=schedule.min_keys,
                                            num_anchor_layers=anchors,
                                            bytes_per_value=jnp.dtype(model.dtype).itemsize),
           "skipped": {} if "dense" in prefill else
           {"prefill dense": f"skipped above {dense_prefill_limit} tokens (time budget; flash is the dense baseline)"}}
    for phase, times in (("prefill", prefill_times), ("decode", decode_times)):
        best = min((n for n in ("dense", "flash") if n in times), key=lambda n: times[n]["median_s"])
        row[f"{phase}_speedup"] = {"best_dense": best, "vs_best": B.speedup(times[best], times["kascade"]),
                                   **{f"vs_{n}": B.speedup(times[n], times["kascade"]) for n in ("dense", "flash")
                                      if n in times}}
    row["decode_speedup"]["positions_vs_best"] = B.speedup(decode_times[row["decode_speedup"]["best_dense"]],
                                                           decode_times["kascade_positions"])
    row["decode_tokens_per_s"] = {n: 1.0 / t["median_s"] for n, t in decode_times.items()}
    pre, dec = row["prefill_speedup"], row["decode_speedup"]
    print(f"context {context:5d}: prefill x{pre['vs_best']:.2f} vs {pre['best_dense']}, decode x{dec['vs_best']:.2f} "
          f"(positions x{dec['positions_vs_best']:.2f}) vs {dec['best_dense']}, ceiling x{row['decode_ceiling']:.2f} "
          f"({row['decode_tokens_per_s']['kascade']:.1f} tok/s)", flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="one tiny context (CI)")
    p.add_argument("--gpu", action="store_true", help="the accelerator run (benchmarks/gpu.sh): SmolLM2 shapes, "
                                                      "random bf16 weights and tokens; writes bench_e2e_gpu.json")
    p.add_argument("--out", type=Path, help="output folder (required at full size, e.g. data/ to update the "
                                            "published results; with --smoke default: a new temporary folder)")
    args = p.parse_args(argv)
    if args.out is None and not args.smoke:
        p.error("--out is required at full size (e.g. --out data to update the published results)")
    out = args.out or Path(tempfile.mkdtemp(prefix="kascade-lite-smoke-"))
    command = ("python benchmarks/bench_e2e.py " + shlex.join(sys.argv[1:] if argv is None else argv)).strip()
    contexts = [256] if args.smoke else [2048, 8192] if args.gpu else [512, 2048, 8192]
    if args.gpu and not args.smoke:
        model = Llama(SMOLLM2_135M, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    else:
        model = smollm2_or_tiny(args.smoke)
    cfg = model.cfg
    schedule = (default_schedule("tiny", cfg.num_layers, cfg.num_kv_heads, 2, TILE, BUDGET) if args.smoke
                else Schedule.load(shipped_dir() / SCHEDULE))
    text = (jax.random.randint(jax.random.PRNGKey(0), (1, max(contexts)), 0, cfg.vocab_size, jnp.int32) if args.gpu
            else jnp.asarray(wikitext_windows("test", max(contexts), 1), jnp.int32))
    rows = []
    for context in contexts:
        big = context >= 8192
        rows.append(run_context(model, text[:, :context], schedule, reps_prefill=1 if big else 3,
                                reps_decode=7 if big else 10, dense_prefill_limit=8192 if args.gpu else 2048))
    model_name = ("tiny random Llama (smoke)" if args.smoke else "SmolLM2-135M shapes, random weights" if args.gpu
                  else "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to float32)")
    config = {"model": model_name, "dtype": str(jnp.dtype(model.dtype)), "batch": 1, "cache": "head-major",
              "tile": TILE, "budget": schedule.budget, "schedule": B.schedule_summary(schedule),
              "tokens": "random ids" if args.gpu else "WikiText-2 test, first window", "smoke": args.smoke}
    target = out / ("bench_e2e_gpu.json" if args.gpu else "bench_e2e_cpu.json")
    B.write_results(target, command, config, rows, smoke=args.smoke)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
