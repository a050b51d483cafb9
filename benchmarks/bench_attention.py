"""Attention-op benchmark: Kascade anchor / reuse layers (`kascade.py`) at both granularities and several budgets vs
the dense baselines, one process, median of repetitions, each path against this machine's measured rates.

    python benchmarks/bench_attention.py --out data        # Llama-3.1-8B shape, ~25 min on 2 CPU cores
    python benchmarks/bench_attention.py --smoke           # tiny sizes (CI), writes to a temporary folder unless --out
    python benchmarks/bench_attention.py --gpu --out data  # on a GPU (benchmarks/gpu.sh): bf16, + cuDNN, longer

Writes ``bench_attention_cpu.json`` (decode 2k-32k, prefill 2k-16k; key positions, the paper's rule, and key tiles
of 32, at budgets 10 / 30 / 50 % without a floor) and ``bench_headline_cpu.json`` (512 tokens, tile 16, 25 % of the
keys, for the Llama-3.1-8B and SmolLM2-135M head shapes); with ``--gpu`` ``bench_attention_gpu.json`` only. What is
timed and recorded: `kascade_lite.speed` (`run_attention`).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

from kascade_lite.speed import run_attention


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
    run_attention(out, command, smoke=args.smoke, gpu=args.gpu, only=args.only)
    print(f"wrote results to {out}")


if __name__ == "__main__":
    main()
