"""Command line: ``kascade-lite <command> ...`` (also ``python -m kascade_lite.cli``).

Each command is one ``add_<name>(subparsers)`` function that registers its parser and sets ``func``, a callable
taking the parsed ``argparse.Namespace`` and returning an exit status. To add a command, write such a function and
append it to `COMMANDS`; imports of heavy modules stay inside the ``func`` so ``--help`` is instant.

Every command but ``convert`` writes under a results root ``--out ROOT``: ``ROOT/data/...`` for results and
``ROOT/book/figures`` for figures. Nothing is written into the repository unless ``--out`` names it: without
``--out`` a ``--smoke`` run writes into a new temporary folder (printed), and a full-size run is refused. Converted
weights go to the cache (``$KASCADE_CACHE`` or ``~/.cache/kascade-lite``, option ``--cache``), one folder per model.
``reproduce`` chains the steps of `pipeline` and records one stamp per step in ``ROOT/data/.stamps/<step>.json``
(its inputs' fingerprints and settings, its outputs' checksums); a step whose stamp still matches is skipped. This
module only parses arguments: the work is done by the package functions each command names. See ``docs/cli.md``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from .pipeline import BENCHMARK_NAMES, BENCHMARKS, MEMORY_PLAN, TRADEOFF
from .schedule import SMOKE_MIN_KEYS


# ================================================================================================ convert
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


# ================================================================================================ shared options
def _root(args: argparse.Namespace) -> Path:
    """The results root: ``--out``; for a ``--smoke`` run without it, a new temporary folder (printed, and kept in
    ``args.out`` so that every later use gets the same one). A full-size run without ``--out`` is refused, so that
    published results are only ever replaced on request."""
    if args.out is None:
        if not getattr(args, "smoke", False):
            raise ValueError("a full-size run writes only where --out ROOT says (results in ROOT/data); to update "
                             "the published results run it in the checkout with --out . (as `make reproduce` does), "
                             "or add --smoke for a quick run into a temporary folder")
        args.out = tempfile.mkdtemp(prefix=f"kascade-lite-{args.command}-smoke-")
        print(f"smoke run: writing under {args.out}", flush=True)
    return Path(args.out).expanduser().resolve()


def _command_line(args: argparse.Namespace) -> str:
    """The command as typed (for provenance): ``kascade-lite <argv>``."""
    return " ".join(["kascade-lite", *map(shlex.quote, args.argv)])


def _add_root(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", metavar="ROOT", default=None,
                   help="results root: writes ROOT/data/... and ROOT/book/figures (required at full size; with "
                        "--smoke default: a new temporary folder). --out . in the checkout updates the published "
                        "results")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="PATH", default=None,
                   help="a Llama checkpoint folder (Hugging Face or Meta) or .gguf file; default: the bundled "
                        "SmolLM2-135M-Instruct")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="converted weights' dtype (auto: float32 for SmolLM2, bfloat16 for a checkpoint)")
    p.add_argument("--cache", metavar="DIR", default=None,
                   help="where converted weights are kept (default $KASCADE_CACHE or ~/.cache/kascade-lite)")


def _csv(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


# ================================================================================================ calibrate
def _calibrate(args: argparse.Namespace) -> int:
    from .calibrate import CalibrationSettings, run_calibration
    from .models import SMOLLM2, load_spec, model_spec, spec_tokenizer

    spec = model_spec(args.model, args.dtype)
    base = CalibrationSettings.smoke() if args.smoke else CalibrationSettings()
    settings = CalibrationSettings(args.num_sequences or base.num_sequences, args.seq_len or base.seq_len,
                                   args.tile_size or base.tile_size, args.budget)
    root = _root(args)
    for path in run_calibration(load_spec(spec, args.cache), root, settings, model_name=spec.name,
                                tokenizer=spec_tokenizer(spec), smoke=args.smoke, command=_command_line(args),
                                coverage=spec.name == SMOLLM2):
        print(f"wrote {path}")
    return 0


def add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="measure attention sparsity and cross-layer Top-k similarity",
                       description="One dense forward pass per WikiText-2 validation window, recording coverage, "
                                   "layer importance and the cross-layer similarity of Top-k key sets. Writes "
                                   "ROOT/data/calibration/<model>.safetensors + .json (and ROOT/data/coverage.json "
                                   "for the bundled model).")
    _add_model(p)
    _add_root(p)
    p.add_argument("--num-sequences", type=int, help="calibration windows (default 100; 2 with --smoke)")
    p.add_argument("--seq-len", type=int,
                   help="tokens per window, a multiple of --tile-size (default 512; 256 with --smoke)")
    p.add_argument("--tile-size", type=int, choices=(16, 32, 64), help="query tile (default 32; 16 with --smoke)")
    p.add_argument("--budget", type=float, default=0.1, help="share of keys kept (default 0.1)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (seconds), recorded as smoke")
    p.set_defaults(func=_calibrate)


# ================================================================================================ schedule
def _schedule(args: argparse.Namespace) -> int:
    from .models import model_spec
    from .pipeline import results_source
    from .schedule import Schedule
    from .search import run_schedule

    root = _root(args)
    name = model_spec(args.model).name
    calibration = (Path(args.calibration) if args.calibration
                   else results_source(root, f"calibration/{name}.safetensors", name))
    for path in run_schedule(calibration, root / "data" / "schedules", smoke=args.smoke, min_keys=args.min_keys,
                             command=_command_line(args)):
        print(f"wrote {path}: anchors {list(Schedule.load(path).anchors)}")
    return 0


def add_schedule(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("schedule", help="choose anchor layers and head maps from a calibration",
                       description="Kascade's DP schedules (K = 2..8 anchors, layer 0 included) and the greedy "
                                   "schedule from ROOT/data/calibration/<model>.safetensors (for SmolLM2, the "
                                   "shipped calibration if ROOT has none), written to "
                                   "ROOT/data/schedules/<model>_dp_k<K>.json (similarity objective), "
                                   "<model>_dpimp_k<K>.json (importance-weighted), <model>_greedy.json, "
                                   "<model>_greedy_t90.json (coverage-triggered refresh) and the evenly spaced "
                                   "controls <model>_even_k<K>.json.")
    p.add_argument("--model", metavar="PATH", default=None, help="model whose calibration to read (default SmolLM2)")
    p.add_argument("--calibration", metavar="FILE", help="calibration .safetensors (default from --model and --out)")
    _add_root(p)
    p.add_argument("--min-keys", type=int, default=None,
                   help=f"inference-time floor on kept keys (default 128; {SMOKE_MIN_KEYS} for a smoke calibration)")
    p.add_argument("--smoke", action="store_true",
                   help="record the schedules as smoke (implied by a smoke calibration)")
    p.set_defaults(func=_schedule)


# ================================================================================================ eval
def _eval(args: argparse.Namespace) -> int:
    import json

    from .eval import EvalSettings, run_eval
    from .models import model_spec

    base = EvalSettings.smoke() if args.smoke else EvalSettings()
    settings = EvalSettings(args.windows or base.windows, args.seq_len or base.seq_len,
                            args.batch_size or base.batch_size,
                            tuple(_csv(args.schedules)) if args.schedules is not None else base.schedules)
    for path in run_eval(model_spec(args.model, args.dtype), _root(args), settings, smoke=args.smoke,
                         cache=args.cache, command=_command_line(args)):
        for row in json.loads(path.read_text())["results"]:
            print(f"{row['policy']:>20}: ppl {row['ppl']:.3f} ({row['delta_vs_dense_pct']:+.2f} % vs dense)")
        print(f"wrote {path}")
    return 0


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity: dense vs Kascade under each schedule",
                       description="WikiText-2 (raw, test) perplexity of the model with dense attention and with "
                                   "Kascade under each schedule in ROOT/data/schedules/<model>_*.json. Writes "
                                   "ROOT/data/eval_<model>.json. The book's full accuracy study (baselines, "
                                   "retrieval) is `kascade-lite bench accuracy-ppl accuracy-retrieval`.")
    _add_model(p)
    _add_root(p)
    p.add_argument("--windows", type=int, help="test windows (default 16; 2 with --smoke)")
    p.add_argument("--seq-len", type=int, help="tokens per window (default 512; 256 with --smoke)")
    p.add_argument("--batch-size", type=int, help="windows per forward (default 4; 2 with --smoke)")
    p.add_argument("--schedules", metavar="NAMES", help="comma-separated schedule names, e.g. dp_k5,greedy "
                                                        "(default: all; dp_k4 with --smoke)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (seconds)")
    p.set_defaults(func=_eval)


# ================================================================================================ bench
def _bench(args: argparse.Namespace) -> int:
    from .pipeline import run_benchmark

    names = list(BENCHMARK_NAMES) if "all" in args.names else args.names
    root = _root(args)
    for name in names:
        for path in run_benchmark(name, root, args.smoke):
            print(f"wrote {path}")
    return 0


def add_bench(sub: argparse._SubParsersAction) -> None:
    lines = "\n".join([*(f"  {n:<19} benchmarks/{b.script} -> {', '.join(b.outputs)}" for n, b in BENCHMARKS.items()),
                       f"  {TRADEOFF:<19} kascade_lite.tradeoff.write_tradeoff -> tradeoff.json",
                       f"  {MEMORY_PLAN:<19} kascade_lite.cost.write_memory_plan -> memory_plan.json"])
    p = sub.add_parser("bench", help="run the book's benchmarks (scripts in benchmarks/)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run benchmark scripts from the repository's benchmarks/ folder, each in its own "
                                   f"process, writing ROOT/data/*.json. Benchmarks:\n{lines}\n\nFull sizes take "
                                   "minutes to hours on a laptop CPU; --smoke runs tiny sizes.")
    p.add_argument("names", nargs="+", metavar="NAME", choices=[*BENCHMARK_NAMES, "all"],
                   help=f"one or more of: {', '.join(BENCHMARK_NAMES)}, or all")
    _add_root(p)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (forwarded as --smoke where the script has it)")
    p.set_defaults(func=_bench)


# ================================================================================================ figures
def _figures(args: argparse.Namespace) -> int:
    from .pipeline import run_figures

    root = _root(args)
    written = run_figures(root, _csv(args.only or ""), smoke=args.smoke)
    for path in written:
        print(f"wrote {path}")
    print(f"{len(written)} figures in {root / 'book' / 'figures'}")
    return 0


def add_figures(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("figures", help="regenerate the book's figures by executing the chapter notebooks",
                       description="Execute notebooks/NN_*.ipynb (nbclient; the notebooks on disk are not modified). "
                                   "Each chapter draws its figures from ROOT/data/*.json (the shipped results where "
                                   "ROOT has none) and saves them to ROOT/book/figures/*.png. With --smoke the "
                                   "notebooks run at KASCADE_SMOKE=1 sizes.")
    _add_root(p)
    p.add_argument("--only", metavar="NAMES", help="comma-separated chapters, e.g. 01_rope,05 (default: all)")
    p.add_argument("--smoke", action="store_true", help="KASCADE_SMOKE=1: tiny sizes")
    p.set_defaults(func=_figures)


# ================================================================================================ reproduce
def _reproduce(args: argparse.Namespace) -> int:
    from .models import SMOLLM2, model_spec
    from .pipeline import pipeline, run_pipeline

    spec = model_spec(args.model, args.dtype)
    book = spec.name == SMOLLM2
    choice = args.figures or ("01_rope" if args.smoke else "all")
    figures = None if choice == "all" else [] if choice == "none" else _csv(choice)
    root = _root(args)
    if not book:
        print(f"--model {spec.source}: running convert, calibrate, schedules, eval for {spec.name}; the book's "
              f"benchmarks and figures are for the bundled SmolLM2 (run `kascade-lite reproduce` without --model)")
    steps = pipeline(spec, root, smoke=args.smoke, cache=args.cache, figures=figures, book=book)
    status = run_pipeline(steps, root, force=args.force, only=_csv(args.steps or ""), skip=_csv(args.skip or ""))
    ran = [k for k, v in status.items() if v == "ran"]
    print(f"reproduce: {len(ran)} steps ran, {len(status) - len(ran)} up to date; results in {root / 'data'}"
          + (f", figures in {root / 'book' / 'figures'}" if book else ""))
    return 0


def add_reproduce(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce",
                       help="the whole pipeline: weights -> calibration -> schedules -> results -> figures",
                       description="convert -> calibrate -> schedules -> eval -> the book's benchmarks (accuracy, "
                                   "perplexity, attention, e2e, convert, memory plan) -> figures, into ROOT/data and "
                                   "ROOT/book/figures. A step is skipped when its stamp (ROOT/data/.stamps/<step>"
                                   ".json: settings, input fingerprints, output checksums) still matches; --force "
                                   "reruns. "
                                   "--model PATH runs convert, calibrate, schedules and eval on a checkpoint "
                                   "(e.g. Llama-3.1-8B-Instruct downloaded with huggingface-cli), with its own "
                                   "tokenizer.")
    _add_model(p)
    _add_root(p)
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes everywhere (a few minutes); figures only from 01_rope unless --figures")
    p.add_argument("--force", action="store_true", help="rerun every step even if up to date")
    p.add_argument("--steps", metavar="NAMES", help="comma-separated steps to consider (default: all), e.g. "
                                                    "calibrate,schedules")
    p.add_argument("--skip", metavar="NAMES", help="comma-separated steps to leave out, e.g. bench-e2e")
    p.add_argument("--figures", metavar="NAMES",
                   help="notebooks to execute for figures: all, none, or e.g. 01_rope,05 (default: all; 01_rope "
                        "with --smoke)")
    p.set_defaults(func=_reproduce)


# ================================================================================================ entry point
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_convert, add_calibrate, add_schedule, add_eval, add_bench, add_figures, add_reproduce]
"""Every subcommand's registration function, in the order ``--help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kascade-lite",
                                     description="Kascade sparse attention on real Llama weights, in JAX.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kascade-lite`` script. Bad input (``ValueError``, a missing file) prints one line
    ``kascade-lite <cmd>: error: ...`` and returns 2; a failed step (``RuntimeError``) returns 1; ``--debug``
    raises instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = [a for a in argv if a != "--debug"]
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if args.debug:
            raise
        print(f"kascade-lite {args.command}: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, RuntimeError) else 2


if __name__ == "__main__":
    sys.exit(main())
