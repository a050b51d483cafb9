"""End-to-end benchmark on SmolLM2-135M: prefill latency and decode tokens/s, dense vs Kascade, one process.

    python benchmarks/bench_e2e.py --out data # contexts 512, 2k, 8k; ~10 min on 2 CPU cores
    python benchmarks/bench_e2e.py --smoke    # one tiny context (CI), writes to a temporary folder unless --out

Policies (all through the model's forward, `bench.compiled_forward`, float32): ``dense`` (the model's default
`gqa_attention`, materialising the scores), ``flash`` (`kernels.flash_attention`) and ``kascade``
(`kascade.KascadeAttention` with key tiles, the gather path, a schedule with layer 0 dense + 4 evenly spaced
anchors, tile 32, budget 10 %). Prefill = one forward of ``context`` WikiText-2 tokens into an empty cache; decode = one
forward of a single token after ``context`` cached tokens (tokens/s = 1 / median step time).
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
from kascade_lite.convert import load_smollm2
from kascade_lite.data import wikitext_windows
from kascade_lite.kascade import KascadeAttention, tiles_kept
from kascade_lite.model import KVCache, dense_attention
from kascade_lite.schedule import default_schedule

TILE, BUDGET, ANCHORS = 32, 0.1, 5


def policies(schedule) -> dict[str, Any]:
    """The attention policies timed (Kascade's key budget follows the context: `kascade.keys_kept`)."""
    return {"dense": dense_attention, "flash": flash_dense_attention,
            "kascade": KascadeAttention(schedule, granularity="tile")}


def run_context(model, tokens: jax.Array, schedule, *, reps_prefill: int, reps_decode: int,
                dense_prefill_limit: int) -> dict[str, Any]:
    """Prefill and decode timings of every policy at ``context = tokens.shape[1]``."""
    context = tokens.shape[1]
    max_len = context + TILE  # room for the decoded token; a multiple of the tile
    pols = policies(schedule)
    fwd = {name: B.compiled_forward(model, pol) for name, pol in pols.items()}
    empty = KVCache.empty(model.cfg, 1, max_len)
    prefill = {name: (lambda f=f: f(tokens, empty)) for name, f in fwd.items()
               if name != "dense" or context <= dense_prefill_limit}
    prefill_times = B.compare(prefill, reps=reps_prefill)
    _, cache, _ = fwd["flash"](tokens, empty)  # the same cache for every decode policy
    nxt = tokens[:, -1:]
    decode = {name: (lambda f=f: f(nxt, cache)[0]) for name, f in fwd.items()}
    decode_times = B.compare(decode, reps=reps_decode)
    keep = tiles_kept(context, TILE, schedule.budget, schedule.min_keys)
    row = {"context": context, "keep_tiles": keep, "prefill": prefill_times, "decode": decode_times,
           "skipped": {} if "dense" in prefill else
           {"prefill dense": f"skipped above {dense_prefill_limit} tokens (time budget; flash is the dense baseline)"}}
    for phase, times in (("prefill", prefill_times), ("decode", decode_times)):
        best = min((n for n in ("dense", "flash") if n in times), key=lambda n: times[n]["median_s"])
        row[f"{phase}_speedup"] = {"best_dense": best, "vs_best": B.speedup(times[best], times["kascade"]),
                                   **{f"vs_{n}": B.speedup(times[n], times["kascade"]) for n in ("dense", "flash")
                                      if n in times}}
    row["decode_tokens_per_s"] = {n: 1.0 / t["median_s"] for n, t in decode_times.items()}
    pre, dec = row["prefill_speedup"], row["decode_speedup"]
    print(f"context {context:5d}: prefill x{pre['vs_best']:.2f} vs {pre['best_dense']}, decode x{dec['vs_best']:.2f} "
          f"vs {dec['best_dense']} ({row['decode_tokens_per_s']['kascade']:.1f} tok/s)", flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="one tiny context (CI)")
    p.add_argument("--out", type=Path, help="output folder (required at full size, e.g. data/ to update the "
                                            "published results; with --smoke default: a new temporary folder)")
    args = p.parse_args(argv)
    if args.out is None and not args.smoke:
        p.error("--out is required at full size (e.g. --out data to update the published results)")
    out = args.out or Path(tempfile.mkdtemp(prefix="kascade-lite-smoke-"))
    command = ("python benchmarks/bench_e2e.py " + shlex.join(sys.argv[1:] if argv is None else argv)).strip()
    contexts = [256] if args.smoke else [512, 2048, 8192]
    model = load_smollm2()
    cfg = model.cfg
    schedule = default_schedule("smollm2-135m", cfg.num_layers, cfg.num_kv_heads, ANCHORS, TILE, BUDGET)
    text = jnp.asarray(wikitext_windows("test", max(contexts), 1), jnp.int32)
    rows = []
    for context in contexts:
        big = context >= 8192
        rows.append(run_context(model, text[:, :context], schedule, reps_prefill=1 if big else 3,
                                reps_decode=5 if big else 10, dense_prefill_limit=2048))
    config = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to float32)", "dtype": "float32", "batch": 1,
              "tile": TILE, "budget": BUDGET, "schedule": B.schedule_summary(schedule),
              "tokens": "WikiText-2 test, first window", "smoke": args.smoke}
    B.write_results(out / "bench_e2e_cpu.json", command, config, rows, smoke=args.smoke)
    print(f"wrote {out / 'bench_e2e_cpu.json'}")


if __name__ == "__main__":
    main()
