"""End-to-end benchmark on SmolLM2-135M: prefill and decode step times, dense vs Kascade at every budget and both
granularities, each path against this machine's measured bandwidth and FLOP rate, in one process.

    python benchmarks/bench_e2e.py --out data        # prefill 512-8k, decode 512-32k; ~30 min on 2 CPU cores
    python benchmarks/bench_e2e.py --smoke           # tiny sizes (CI), writes to a temporary folder unless --out
    python benchmarks/bench_e2e.py --gpu --out data  # on a GPU (benchmarks/gpu.sh): bf16, writes bench_e2e_gpu.json

Every path runs the model's one forward step (`model.make_forward`: a program that reads the cache, then one that
writes the step's keys in place), float32. Paths: ``dense`` (the model's default: in decode the cache read in place
by two matmuls, in prefill the ``[T, T]`` scores materialised, up to 2k tokens), ``flash`` (prefill only:
`kernels.flash_attention`) and ``kascade_<granularity>@<budget>`` (`kascade.KascadeAttention` with key positions,
the paper's rule, or key tiles of 32; budgets 10 / 30 / 50 %, floor 128 keys), all with the schedule the accuracy
tables use (``data/schedules/smollm2-135m_greedy.json``: layer 0 dense + 5 anchors). Chapter 07 finds which
budgets keep accuracy; this file times them all.

Prefill = one forward of ``context`` WikiText-2 tokens (last position's logits only, as a server samples). Decode =
one step of one token after ``context`` cached positions, the cache donated to the step; beyond 8k (SmolLM2's
trained context) and for every decode context the cache holds random keys and values (what a step costs does not
depend on them). Each row records per path its FLOPs or bytes (`cost.model_step_cost`: weights + the K/V it
reads), its achieved GFLOP/s or GB/s, its speed-up over the fastest dense path, and for decode its bytes-moved
ceiling (dense bytes over its bytes) and how much of it the speed-up reaches. ``config.machine`` holds this
machine's copy and read bandwidth and matmul rate (`bench.measure_machine`), measured in the same run.
``--gpu`` runs SmolLM2's exact shapes with random bfloat16 weights and random token ids (the real weights and
WikiText-2 do not travel to the lent machine; timings do not depend on the values).
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from kascade_lite import bench as B
from kascade_lite.baselines import flash_dense_attention
from kascade_lite.config import SMOLLM2_135M
from kascade_lite.cost import model_step_cost
from kascade_lite.data import wikitext_windows
from kascade_lite.files import shipped_dir
from kascade_lite.kascade import GRANULARITIES, KascadeAttention, keys_read
from kascade_lite.model import KVCache, Llama, dense_attention, make_forward
from kascade_lite.models import smollm2_or_tiny
from kascade_lite.schedule import Schedule, default_schedule

TILE = 32
BUDGETS = (0.1, 0.3, 0.5)
SCHEDULE = "schedules/smollm2-135m_greedy.json"
DENSE_PREFILL_LIMIT = 2048  # the materialised [T, T] scores of `dense` prefill: 9 x 8k x 8k floats per layer above


def kascade_policies(schedule: Schedule, budgets: tuple[float, ...]) -> dict[str, KascadeAttention]:
    """``kascade_<granularity>@<budget>`` for every granularity and budget (floor: the schedule's)."""
    return {f"kascade_{g}@{b:g}": KascadeAttention(schedule, granularity=g, budget=b)
            for b in budgets for g in GRANULARITIES}


def work(cfg: Any, schedule: Schedule, policies: dict[str, Any], context: int, phase: str,
         bytes_per_value: int) -> dict[str, dict[str, float]]:
    """`cost.model_step_cost` of each path: ``{name: {"flops", "bytes", "keys"}}`` (keys: per sparse query)."""
    out = {}
    for name, pol in policies.items():
        sparse = isinstance(pol, KascadeAttention)
        keys = (keys_read(context, phase=phase, granularity=pol.granularity, tile=pol.q_tile,
                          budget=pol.budget_value, min_keys=pol.min_keys_value) if sparse else context)
        cost = model_step_cost(cfg, context, phase=phase, layer_types=schedule.layer_types if sparse else None,
                               keep_keys=keys, bytes_per_value=bytes_per_value)
        out[name] = {**cost, "keys": keys}
    return out


def summarise(phase: str, times: dict[str, dict], costs: dict[str, dict], dense_names: list[str]) -> dict[str, Any]:
    """Speed-ups over the fastest dense path, achieved rates and (decode) the bytes-moved ceilings."""
    best = min((n for n in dense_names if n in times), key=lambda n: times[n]["median_s"])
    row: dict[str, Any] = {"best_dense": best, "speedup": {n: B.speedup(times[best], t) for n, t in times.items()}}
    if phase == "decode":
        row["gb_per_s"] = B.rates(times, {n: c["bytes"] for n, c in costs.items()}, "gb")
        row["ceiling"] = {n: costs[best]["bytes"] / c["bytes"] for n, c in costs.items()}
        row["of_ceiling"] = {n: row["speedup"][n] / row["ceiling"][n] for n in times}
    else:
        row["gflop_per_s"] = B.rates(times, {n: c["flops"] for n, c in costs.items()}, "gflop")
    return row


def random_cache(cfg: Any, context: int, dtype: Any) -> KVCache:
    """A cache of ``context`` filled positions (random keys and values) with room for one more tile."""
    shape = (1, cfg.num_kv_heads, context + TILE, cfg.head_dim)
    key = jax.random.PRNGKey(context)
    layer = lambda i: jax.random.normal(jax.random.fold_in(key, i), shape, dtype)  # noqa: E731
    return KVCache(tuple(layer(2 * i) for i in range(cfg.num_layers)),
                   tuple(layer(2 * i + 1) for i in range(cfg.num_layers)), jnp.int32(context))


def decode_candidates(model: Llama, policies: dict[str, Any], context: int) -> dict[str, Callable[[], Any]]:
    """One decode step per policy, all on one shared cache that each step donates and hands to the next (its
    length reset to ``context``, so every step writes the same slot)."""
    shared = [random_cache(model.cfg, context, model.dtype)]
    token = jnp.ones((1, 1), jnp.int32)

    def candidate(step: Callable) -> Callable[[], Any]:
        def run() -> Any:
            logits, shared[0], _ = step(token, dataclasses.replace(shared[0], length=jnp.int32(context)))
            return logits, shared[0]
        return run

    return {name: candidate(make_forward(model, pol, donate=True)) for name, pol in policies.items()}


def run(model: Llama, schedule: Schedule, text: jax.Array, *, phase: str, contexts: list[int], reps: int,
        budgets: tuple[float, ...]) -> list[dict[str, Any]]:
    """One row per context of ``phase``: times, costs and `summarise`."""
    sparse = kascade_policies(schedule, budgets)
    bpv = jnp.dtype(model.dtype).itemsize
    rows = []
    for context in contexts:
        if phase == "decode":
            policies = {"dense": dense_attention, **sparse}
            cands = decode_candidates(model, policies, context)
            dense_names = ["dense"]
        else:
            policies = {**({"dense": dense_attention} if context <= DENSE_PREFILL_LIMIT else {}),
                        "flash": flash_dense_attention, **sparse}
            tokens = text[:, :context]
            cands = {n: (lambda f=make_forward(model, p, last_only=True): f(tokens, None)[0])
                     for n, p in policies.items()}
            dense_names = ["dense", "flash"]
        times = B.compare(cands, reps=reps)
        costs = work(model.cfg, schedule, policies, context, phase, bpv)
        row = {"phase": phase, "context": context, "times": times, "cost": costs,
               "settings": {n: {"granularity": p.granularity, "budget": p.budget_value, "min_keys": p.min_keys_value}
                            for n, p in sparse.items()},
               "skipped": {} if "dense" in policies else
               {"dense": f"skipped above {DENSE_PREFILL_LIMIT} tokens ([T, T] scores; flash is the dense path)"},
               **summarise(phase, times, costs, dense_names)}
        rate = row.get("gb_per_s") or row.get("gflop_per_s")
        best = row["best_dense"]
        print(f"{phase:7s} {context:6d}: best dense {best} {times[best]['median_s'] * 1e3:8.1f}"
              f" ms ({rate[best]:.1f} {'GB/s' if phase == 'decode' else 'GFLOP/s'}); "
              + ", ".join(f"{n.removeprefix('kascade_')} x{row['speedup'][n]:.2f}" for n in sparse), flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    p.add_argument("--gpu", action="store_true", help="the accelerator run (benchmarks/gpu.sh): SmolLM2 shapes, "
                                                      "random bf16 weights and tokens; writes bench_e2e_gpu.json")
    p.add_argument("--out", type=Path, help="output folder (required at full size, e.g. data/ to update the "
                                            "published results; with --smoke default: a new temporary folder)")
    args = p.parse_args(argv)
    if args.out is None and not args.smoke:
        p.error("--out is required at full size (e.g. --out data to update the published results)")
    out = args.out or Path(tempfile.mkdtemp(prefix="kascade-lite-smoke-"))
    command = ("python benchmarks/bench_e2e.py " + shlex.join(sys.argv[1:] if argv is None else argv)).strip()
    if args.smoke:
        prefill, decode, budgets = [256], [256, 512], (0.1, 0.5)
    elif args.gpu:
        prefill, decode, budgets = [2048, 8192], [8192, 32768], BUDGETS
    else:
        prefill, decode, budgets = [512, 2048, 8192], [512, 2048, 8192, 16384, 32768], BUDGETS
    if args.gpu and not args.smoke:
        model = Llama(SMOLLM2_135M, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    else:
        model = smollm2_or_tiny(args.smoke)
    cfg = model.cfg
    schedule = (default_schedule("tiny", cfg.num_layers, cfg.num_kv_heads, 2, TILE, 0.1) if args.smoke
                else Schedule.load(shipped_dir() / SCHEDULE))
    text = (jax.random.randint(jax.random.PRNGKey(0), (1, max(prefill)), 0, cfg.vocab_size, jnp.int32) if args.gpu
            else jnp.asarray(wikitext_windows("test", max(prefill), 1), jnp.int32))
    machine = B.measure_machine(64, 256, reps=2) if args.smoke else B.measure_machine()
    print(f"machine: copy {machine['copy_gb_per_s']:.1f} GB/s, read {machine['read_gb_per_s']:.1f} GB/s, "
          f"matmul {machine['matmul_gflop_per_s']:.0f} GFLOP/s", flush=True)
    rows = run(model, schedule, text, phase="decode", contexts=decode, reps=3 if args.smoke else 7, budgets=budgets)
    rows += run(model, schedule, text, phase="prefill", contexts=prefill, reps=2 if args.smoke else 1,
                budgets=budgets)
    model_name = ("tiny random Llama (smoke)" if args.smoke else "SmolLM2-135M shapes, random weights" if args.gpu
                  else "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to float32)")
    config = {"model": model_name, "dtype": str(jnp.dtype(model.dtype)), "batch": 1, "cache": "head-major",
              "tile": TILE, "budgets": list(budgets), "schedule": B.schedule_summary(schedule), "machine": machine,
              "prefill_tokens": "random ids" if args.gpu else "WikiText-2 test, first window",
              "decode_cache": "random keys and values", "smoke": args.smoke}
    target = out / ("bench_e2e_gpu.json" if args.gpu else "bench_e2e_cpu.json")
    B.write_results(target, command, config, rows, smoke=args.smoke)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
