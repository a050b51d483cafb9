"""Llama-3.1-8B on one CPU machine: bfloat16 weights loaded from the converted files, a 2k prefill and 32 decode
steps, dense vs Kascade side by side in one process, with the process's peak resident memory (target <= 20 GB).

    python benchmarks/bench_llama8b.py --out /tmp/k8b             # synthetic 8B: writes 16 GB to a temporary folder
    python benchmarks/bench_llama8b.py --checkpoint DIR --out /tmp/k8b  # real weights, converted into DIR
    python benchmarks/bench_llama8b.py --layers 2 --out /tmp/k8b  # real shapes, 2 of the 32 layers (3 GB): quick
    python benchmarks/bench_llama8b.py --smoke                    # tiny widths (CI), into a temporary folder

Weights: ``--checkpoint DIR`` is a converted checkpoint (``kascade-lite convert SRC DIR --dtype bfloat16``); without
it a synthetic one with the exact Llama-3.1-8B shapes (``--layers`` of its layers) is written into a temporary
folder under ``--tmp`` and deleted afterwards. What is measured and how: `kascade_lite.llama8b`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

from kascade_lite.config import LLAMA_3_1_8B
from kascade_lite.llama8b import DTYPES, run_llama8b


def positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, help="a converted checkpoint (default: a synthetic one with the "
                                                   "Llama-3.1-8B shapes, written to a temporary folder)")
    p.add_argument("--layers", type=positive, help="layers of the synthetic checkpoint (default: all 32)")
    p.add_argument("--context", type=positive, help="prefill tokens (default 2048; smoke 256)")
    p.add_argument("--decode-steps", type=positive, help="timed decode steps per policy (default 32; smoke 4)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="activations (weights: bfloat16)")
    p.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()),
                   help="where the synthetic checkpoint is written (and deleted)")
    p.add_argument("--smoke", action="store_true", help="tiny widths, 2 layers, 256 tokens, 4 steps (CI)")
    p.add_argument("--out", type=Path, help="output folder (required at full size; with --smoke default: a new "
                                            "temporary folder)")
    args = p.parse_args(argv)
    if args.out is None and not args.smoke:
        p.error("--out is required at full size")
    if args.checkpoint is not None and (args.layers is not None or args.smoke):
        p.error("--layers and --smoke shape the synthetic checkpoint; they do not apply to --checkpoint")
    if args.layers is not None and args.layers > LLAMA_3_1_8B.num_layers:
        p.error(f"--layers: Llama-3.1-8B has {LLAMA_3_1_8B.num_layers} layers, got {args.layers}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="kascade-lite-smoke-"))
    command = ("python benchmarks/bench_llama8b.py " + shlex.join(sys.argv[1:] if argv is None else argv)).strip()
    run_llama8b(out, command, smoke=args.smoke, checkpoint=args.checkpoint, layers=args.layers,
                context=args.context, steps=args.decode_steps, dtype=args.dtype, tmp=args.tmp)


if __name__ == "__main__":
    main()
