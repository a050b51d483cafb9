"""The book's pipeline, what ``kascade-lite reproduce`` runs: convert → calibrate → schedules → eval → the
book's benchmarks → figures, each a `Step` skipped when its stamp (``ROOT/data/.stamps/<step>.json``,
`files.write_stamp`: settings, input fingerprints, output checksums) still matches; the registry of the book's
benchmarks (`BENCHMARKS`: each a script of ``benchmarks/`` run in its own process, with its arguments at full and
smoke size and the method lists of the published tables); and the figures step, which executes the chapter
notebooks.

Nothing heavy is imported at module level (the CLI imports this module for its ``--help``).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .data import checkout_root, local_data_dir
from .files import RESULTS_ENV, shipped_dir, stamp_inputs, stamp_is_current, write_stamp
from .progress import tqdm

if TYPE_CHECKING:
    from .models import ModelSpec


# ------------------------------------------------------------------------------------------------ benchmarks
@dataclass(frozen=True)
class Benchmark:
    """A script in ``benchmarks/``: its arguments at full size and with ``--smoke``, and what it writes.

    ``args`` and ``smoke_args`` may contain ``{data}`` (``ROOT/data``); ``outputs`` are paths under ``ROOT/data``."""

    script: str
    args: tuple[str, ...]
    smoke_args: tuple[str, ...]
    outputs: tuple[str, ...]
    reads_schedules: bool = False  # passed --schedule-dir ROOT/data/schedules when ROOT has schedules
    modules: tuple[str, ...] = ()  # the package modules that hold its logic (fingerprinted with the script)


ABLATION = "dense,oracle_decode,pooled_decode,kascade_decode,pooled_tiles_decode,kascade_tiles_decode"
"""The decode-only ladder of chapter 07: from the per-head oracle to Kascade, one change at a time."""
FRONTIER = ",".join(f"kascade_decode{s}{b}" for s in ("", "+dp_k3", "+dpimp_k8") for b in ("", "@0.2", "@0.3", "@0.5"))
"""Decode-only Kascade over anchors (the chosen schedule, DP K=3, DP+importance K=8) x key budget (10-50 %)."""
LONG_FRONTIER = "dense,kascade_decode@0.2,kascade_decode@0.3,kascade@0.3,kascade@0.5"
"""The 8k frontier of chapter 07: decode-only and full Kascade (the chosen schedule) above the 10 % budget."""
RETRIEVAL = "dense,kascade,kascade_decode,kascade_sw,tidal,oracle_decode,quest"
"""The methods of chapter 07's retrieval table: dense, Kascade (prefill and decode, decode only, with sinks and
window), TidalDecode, the per-head oracle and Quest."""

LADDER = "dense,oracle,pooled_decode,pooled,kascade_decode,kascade,kascade+dp_k6,kascade+dpimp_k6"
"""Chapter 07's perplexity ladder at 2048 tokens, one change at a time: the per-head oracle, pooling over the GQA group
per query (as a decode step selects) and per query tile of 32, reuse under the evenly spaced anchors the selection
chose and under the DP's at the same K (key tiles: ``accuracy_ppl.json``)."""
ADAPTIVE = ("kascade_decode@0.1,kascade_decode@0.2,kascade_decode@0.3,kascade_mass90_decode@0.3,"
            "kascade_mass95_decode@0.3,kascade_mass98_decode@0.5,kascade_decode+dpimp_k8@0.1,pooled_decode@0.1,"
            "kascade_decode+greedy_t90@0.1,kascade_decode+greedy_t90@0.2,kascade_decode+greedy_hb@0.1,"
            "kascade_decode+greedy_hb@0.2")
"""Chapter 07's budget rules, all with dense prefill: the paper's Kascade at fixed budgets, our mass-targeted
variant at three shares, 8 anchors (the DP's), every layer its own pooled anchor, coverage-triggered refresh
(the greedy rule at a threshold that fires, `search.REFRESH_THRESHOLDS`) and per-(layer, KV head) budgets from
calibration (the greedy schedule with head budgets, `head_budgets`). Chosen among on held-out data
(`selection.choose_adaptive`), then measured on the published cases and test windows."""
ADAPTIVE_CASES = "2048:16,4096:8,8192:4"
"""Needle cases per length of the budget-rule runs, held-out and published alike (each haystack)."""

ACCURACY = ("accuracy", "methods", "tasks", "baselines")
"""The package modules the accuracy benchmarks run: the harness, the registry and what it builds."""

BENCHMARKS: dict[str, Benchmark] = {
    "schedule-selection": Benchmark("select_schedule.py", ("--out", "{data}"), ("--smoke", "--out", "{data}"),
                                    ("schedule_selection.json",), modules=("selection", "methods")),
    "variant-selection": Benchmark("select_variant.py",
                                   ("--selection", "{data}/schedule_selection.json", "--out", "{data}"),
                                   ("--smoke", "--out", "{data}"),
                                   ("variant_selection.json",), reads_schedules=True,
                                   modules=("selection", "methods")),
    "variant-selection-natural": Benchmark(
        "select_variant.py", ("--selection", "{data}/schedule_selection.json", "--haystack", "wikitext-valid",
                              "--wording", "varied", "--cases", "30", "--out", "{data}"),
        ("--smoke", "--haystack", "wikitext-valid", "--wording", "varied", "--out", "{data}"),
        ("variant_selection_wikitext-valid.json",), reads_schedules=True, modules=("selection", "methods", "tasks")),
    "tidal-selection": Benchmark("select_tidal.py", ("--cases", "16", "--out", "{data}"),
                                 ("--smoke", "--out", "{data}"), ("tidal_selection.json",),
                                 modules=("selection", "methods", "tasks", "baselines")),
    "accuracy-ppl": Benchmark("bench_accuracy.py",
                              ("ppl", "--windows-512", "24", "--windows-2048", "6", "--time-budget", "0",
                               "--out", "{data}/accuracy_ppl.json"),
                              ("ppl", "--smoke", "--out", "{data}/accuracy_ppl.json"), ("accuracy_ppl.json",),
                              reads_schedules=True, modules=ACCURACY),
    "accuracy-retrieval": Benchmark("bench_accuracy.py",
                                    ("retrieval", "--cases", "2048:100,4096:100,8192:100", "--methods", RETRIEVAL,
                                     "--every", "kascade_sw:2", "--time-budget", "0",
                                     "--out", "{data}/accuracy_retrieval.json"),
                                    ("retrieval", "--smoke", "--out", "{data}/accuracy_retrieval.json"),
                                    ("accuracy_retrieval.json",), reads_schedules=True, modules=ACCURACY),
    "accuracy-retrieval-ablation": Benchmark(
        "bench_accuracy.py", ("retrieval", "--cases", "2048:40", "--methods", f"{ABLATION},{FRONTIER.split(',', 1)[1]}",
                              "--time-budget", "0",
                              "--out", "{data}/accuracy_retrieval_ablation.json"),
        ("retrieval", "--smoke", "--methods", ABLATION, "--out", "{data}/accuracy_retrieval_ablation.json"),
        ("accuracy_retrieval_ablation.json",), reads_schedules=True, modules=ACCURACY),
    "accuracy-retrieval-frontier": Benchmark(
        "bench_accuracy.py", ("retrieval", "--cases", "8192:20", "--methods", LONG_FRONTIER, "--time-budget", "0",
                              "--out", "{data}/accuracy_retrieval_frontier.json"),
        ("retrieval", "--smoke", "--methods", LONG_FRONTIER, "--out", "{data}/accuracy_retrieval_frontier.json"),
        ("accuracy_retrieval_frontier.json",), reads_schedules=True, modules=ACCURACY),
    "accuracy-retrieval-natural": Benchmark(
        "bench_accuracy.py", ("retrieval", "--haystack", "wikitext-test", "--wording", "varied", "--cases",
                              "2048:24,4096:6", "--methods", RETRIEVAL, "--time-budget", "0",
                              "--out", "{data}/accuracy_retrieval_natural.json"),
        ("retrieval", "--smoke", "--haystack", "wikitext-test", "--wording", "varied", "--methods", RETRIEVAL,
         "--out", "{data}/accuracy_retrieval_natural.json"),
        ("accuracy_retrieval_natural.json",), reads_schedules=True, modules=ACCURACY),
    "schedule-spacing": Benchmark(
        "bench_spacing.py", ("--out", "{data}"), ("--smoke", "--out", "{data}"),
        ("schedule_spacing.json", "spacing_heldout_ppl.json", "spacing_heldout_noise.json",
         "spacing_heldout_wikitext-valid.json"), reads_schedules=True, modules=("selection", "search", *ACCURACY)),
    "accuracy-ppl-ladder": Benchmark(
        "bench_accuracy.py", ("ppl-methods", "--windows-2048", "6", "--methods", LADDER,
                              "--out", "{data}/accuracy_ppl_ladder.json"),
        ("ppl-methods", "--smoke", "--methods", LADDER, "--out", "{data}/accuracy_ppl_ladder.json"),
        ("accuracy_ppl_ladder.json",), reads_schedules=True, modules=ACCURACY),
    "head-budgets": Benchmark("head_budgets.py", ("--out", "{data}/schedules"),
                              ("--smoke", "--out", "{data}/schedules"), ("schedules/smollm2-135m_greedy_hb.json",),
                              reads_schedules=True, modules=("head_budgets", "selection", "tradeoff", "schedule")),
    "adaptive-selection": Benchmark(
        "select_adaptive.py", ("--cases", ADAPTIVE_CASES, "--out", "{data}"), ("--smoke", "--out", "{data}"),
        ("variant_selection_adaptive.json", "adaptive_heldout_noise.json", "adaptive_heldout_wikitext-valid.json",
         "adaptive_heldout_ppl.json"), reads_schedules=True, modules=("selection", *ACCURACY, "kascade", "tradeoff")),
    "accuracy-retrieval-adaptive": Benchmark(
        "bench_accuracy.py", ("retrieval", "--cases", ADAPTIVE_CASES, "--methods", f"dense,{ADAPTIVE}",
                              "--time-budget", "0", "--out", "{data}/accuracy_retrieval_adaptive.json"),
        ("retrieval", "--smoke", "--methods", f"dense,{ADAPTIVE}", "--out", "{data}/accuracy_retrieval_adaptive.json"),
        ("accuracy_retrieval_adaptive.json",), reads_schedules=True, modules=(*ACCURACY, "kascade", "tradeoff")),
    "accuracy-retrieval-adaptive-natural": Benchmark(
        "bench_accuracy.py", ("retrieval", "--haystack", "wikitext-test", "--wording", "varied", "--cases",
                              ADAPTIVE_CASES, "--methods", f"dense,{ADAPTIVE}", "--time-budget", "0",
                              "--out", "{data}/accuracy_retrieval_adaptive_natural.json"),
        ("retrieval", "--smoke", "--haystack", "wikitext-test", "--wording", "varied", "--methods",
         f"dense,{ADAPTIVE}", "--out", "{data}/accuracy_retrieval_adaptive_natural.json"),
        ("accuracy_retrieval_adaptive_natural.json",), reads_schedules=True,
        modules=(*ACCURACY, "kascade", "tradeoff")),
    "accuracy-ppl-decode": Benchmark(
        "bench_accuracy.py", ("ppl-methods", "--windows-2048", "2", "--methods", f"dense,{ADAPTIVE}",
                              "--out", "{data}/accuracy_ppl_decode.json"),
        ("ppl-methods", "--smoke", "--methods", f"dense,{ADAPTIVE}", "--out", "{data}/accuracy_ppl_decode.json"),
        ("accuracy_ppl_decode.json",), reads_schedules=True, modules=(*ACCURACY, "kascade")),
    "perplexity": Benchmark("bench_perplexity.py", ("--windows", "64", "--out", "{data}/perplexity.json"),
                            ("--smoke", "--out", "{data}/perplexity.json"), ("perplexity.json",)),
    "attention": Benchmark("bench_attention.py", ("--out", "{data}"), ("--smoke", "--out", "{data}"),
                           ("bench_attention_cpu.json", "bench_headline_cpu.json"), modules=("speed",)),
    "e2e": Benchmark("bench_e2e.py", ("--out", "{data}"), ("--smoke", "--out", "{data}"), ("bench_e2e_cpu.json",),
                     modules=("speed", "methods")),
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
    MEMORY_PLAN: ("schedule_selection.json", "variant_selection_adaptive.json")}
"""Results files (globs under ROOT/data, besides the schedules) that the in-process steps read."""


def write_plan(root: Path, *, smoke: bool) -> Path:
    """`cost.write_memory_plan` into ``ROOT/data/memory_plan.json``: the schedule that ``schedule_selection.json``
    names ``chosen`` at 10 %, or the Kascade schedule and budget chosen on held-out data
    (``variant_selection_adaptive.json``, `tradeoff.recommended_plan`, with the reason when it is not used), each from
    ROOT/data or else the shipped copy."""
    import json

    from .cost import write_memory_plan
    from .models import SMOLLM2
    from .schedule import Schedule
    from .tradeoff import recommended_plan

    chosen = json.loads(results_source(root, "schedule_selection.json", SMOLLM2).read_text())["chosen"]
    picked = results_source(root, "variant_selection_adaptive.json", SMOLLM2)
    chosen, budget, note = recommended_plan(json.loads(picked.read_text()) if picked.is_file() else None, chosen)
    schedule = Schedule.load(results_source(root, f"schedules/{SMOLLM2}_{chosen}.json", SMOLLM2))
    out = root / "data" / "memory_plan.json"
    write_memory_plan(out, command=f"kascade-lite bench {MEMORY_PLAN} --out {shlex.quote(str(root))}"
                                   + (" --smoke" if smoke else ""), smoke=smoke, schedule=schedule,
                      schedule_name=chosen, budget=budget, budget_note=note)
    return out


def benchmark_command(name: str, root: Path, smoke: bool) -> list[str]:
    """The ``python ...`` argv of benchmark script ``name`` writing under ``root/data``; raises if the script is
    absent (the scripts live in the repository checkout only)."""
    from .models import SMOLLM2

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
    """Run one benchmark (a script in a child process, its own progress output showing, reading results from
    ``ROOT/data`` before the shipped ones, e.g. the TidalDecode layer choice; the trade-off table and the memory plan
    in this process) and return its output files."""
    if name == MEMORY_PLAN:
        return [write_plan(root, smoke=smoke)]
    if name == TRADEOFF:
        from .tradeoff import write_tradeoff

        write_tradeoff(root / "data", command=f"kascade-lite bench {TRADEOFF} --out {shlex.quote(str(root))}")
        return [root / "data" / "tradeoff.json"]
    cmd = benchmark_command(name, root, smoke)
    (root / "data").mkdir(parents=True, exist_ok=True)
    print(f"$ {' '.join(shlex.quote(c) for c in cmd[1:])}", flush=True)
    code = subprocess.run(cmd, cwd=checkout_root(), env={**os.environ, RESULTS_ENV: str(root / "data")}).returncode
    if code:
        raise RuntimeError(f"benchmark {name} failed (exit {code}): {' '.join(cmd[1:])}")
    outputs = [root / "data" / o for o in BENCHMARKS[name].outputs]
    missing = [str(p) for p in outputs if not p.is_file()]
    if missing:
        raise RuntimeError(f"benchmark {name} finished but did not write {missing}")
    return outputs


def results_source(root: Path, rel: str, model: str) -> Path:
    """``ROOT/data/<rel>`` if it exists, else (for the bundled model) the shipped copy: a schedule or eval run
    without its own calibration/schedules uses the book's."""
    from .models import SMOLLM2

    mine = root / "data" / rel
    if mine.exists() or model != SMOLLM2:
        return mine
    return shipped_dir() / rel


# ------------------------------------------------------------------------------------------------ figures
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
    from .notebooks import execute_notebook

    figures = root / "book" / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    start = time.time()
    env = figures_env(root, smoke=smoke)
    for nb in tqdm(chapter_notebooks(only), desc="figures", unit="notebook"):
        tqdm.write(f"executing {nb.name}")
        execute_notebook(nb, env=env)
    return sorted(p for p in figures.glob("*.png") if p.stat().st_mtime >= start - 1)


# ------------------------------------------------------------------------------------------------ reproduce
@dataclass
class Step:
    """One pipeline step: what it depends on (``settings`` + ``input_files``, fingerprinted when the step is reached)
    and ``run``, which does the work and returns the files it wrote."""

    name: str
    run: Callable[[], list[Path]]
    settings: dict[str, Any] = field(default_factory=dict)
    input_files: Callable[[], list[Path]] = list


def stamp_path(root: Path, step: str) -> Path:
    return root / "data" / ".stamps" / f"{step}.json"


def step_inputs(step: Step, root: Path) -> dict[str, Any]:
    """What decides whether ``step`` is up to date (`files.stamp_inputs`)."""
    return stamp_inputs(step.settings, step.input_files(), root)


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
    from .eval import EvalSettings, run_eval
    from .models import SMOLLM2, cache_root, ensure_converted, load_spec, spec_tokenizer
    from .schedule import SMOKE_MIN_KEYS
    from .search import run_schedule

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
                 load_spec(spec, cache), root, cal, model_name=spec.name, tokenizer=spec_tokenizer(spec),
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
                else _sources(f"benchmarks/{bench.script}", "bench", "kernels", *bench.modules))
        deps = (lambda: sorted(schedule_dir.glob(f"{SMOLLM2}_*.json"))) if bench and bench.reads_schedules else list
        if name in DERIVED_INPUTS:  # the in-process steps read results of the steps before them
            deps = lambda name=name: [*sorted(p for pattern in DERIVED_INPUTS[name]  # noqa: E731
                                              for p in (root / "data").glob(pattern)),
                                      *sorted(schedule_dir.glob(f"{SMOLLM2}_*.json"))]
        if bench is not None and bench.script == "bench_accuracy.py":  # the registry's tidal reads the layer choice
            choice = root / "data" / BENCHMARKS["tidal-selection"].outputs[0]
            deps = lambda deps=deps, choice=choice: [*deps(), choice]  # noqa: E731
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
    unknown = sorted((set(only) | set(skip)) - {s.name for s in steps})
    if unknown:
        raise ValueError(f"unknown steps {unknown}; steps are {[s.name for s in steps]}")
    status = {}
    chosen = [s for s in steps if (not only or s.name in only) and s.name not in skip]
    bar = tqdm(chosen, desc="reproduce", unit="step")
    for i, step in enumerate(bar, 1):
        bar.set_postfix_str(step.name)
        inputs = step_inputs(step, root)
        if not force and stamp_is_current(stamp_path(root, step.name), inputs, root):
            status[step.name] = "skipped"
            tqdm.write(f"[{i}/{len(chosen)}] {step.name}: up to date, skipped")
            continue
        tqdm.write(f"[{i}/{len(chosen)}] {step.name}: running")
        t0 = time.monotonic()
        outputs = step.run()
        seconds = time.monotonic() - t0
        write_stamp(stamp_path(root, step.name), step.name, step_inputs(step, root), outputs, seconds, root)
        status[step.name] = "ran"
        tqdm.write(f"[{i}/{len(chosen)}] {step.name}: done in {seconds:.1f} s ({len(outputs)} files)")
    return status
