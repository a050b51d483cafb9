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
WikiText-2 do not travel to the lent machine; timings do not depend on the values). The benchmark itself is
`kascade_lite.speed` (`run_e2e`).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

from kascade_lite.speed import run_e2e


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
    print(f"wrote {run_e2e(out, command, smoke=args.smoke, gpu=args.gpu)}")


if __name__ == "__main__":
    main()
