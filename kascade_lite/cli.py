"""Command line: ``kascade-lite <command> ...`` (also ``python -m kascade_lite.cli``).

Each command is one ``add_<name>(subparsers)`` function that registers its parser and sets ``func``, a callable
taking the parsed ``argparse.Namespace`` and returning an exit status. To add a command, write such a function and
append it to `COMMANDS`; imports of heavy modules stay inside the ``func`` so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert_checkpoint

    out = convert_checkpoint(args.src, args.out, dtype=args.dtype, force=args.force, progress=not args.quiet)
    print(f"converted {args.src} -> {out}")
    return 0


def add_convert(sub: argparse._SubParsersAction) -> None:
    from .convert import DTYPES

    p = sub.add_parser(
        "convert", help="convert a Llama checkpoint (GGUF, Hugging Face, Meta) into kascade-lite's layout",
        description="Convert a Llama checkpoint into a directory of config.json, embeddings.safetensors, "
                    "layer_XX.safetensors and manifest.json (weights [in, out], KV heads not expanded). "
                    "SRC is a .gguf file, a Hugging Face directory (config.json + *.safetensors or "
                    "pytorch_model*.bin) or a Meta directory (params.json + consolidated.*.pth). "
                    "Rerunning resumes: files whose checksum matches the manifest are skipped.")
    p.add_argument("src", metavar="SRC", help="checkpoint file or directory")
    p.add_argument("out", metavar="OUT", help="output directory")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="stored weight dtype (default float32)")
    p.add_argument("--force", action="store_true", help="overwrite OUT even if it holds a different model")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_convert)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_convert]
"""Every subcommand's registration function, in the order ``--help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kascade-lite",
                                     description="Kascade sparse attention on real Llama weights, in JAX.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kascade-lite`` script. Bad input (a ``ValueError``) prints one line and returns 2."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as e:
        print(f"kascade-lite {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
