"""The accuracy harness of chapter 07: perplexity and needle retrieval of every method, in one resumable run each.

* `run_perplexity`: WikiText-2 (raw, test) perplexity at 512 tokens (query/key tiles of 16; 10 % of 512 is below the
  128-key floor, so both "10 % with the floor" and "10 % without it" are measured) and at 2048 tokens (tiles of 32),
  budgets 10/20/30/50 % (`perplexity_configs`), into ``accuracy_ppl.json``.
* `run_retrieval`: the needle task of `kascade_lite.tasks`, every method on the same cases, into
  ``accuracy_retrieval*.json``.

The methods are `kascade_lite.methods`' (names in its ``method+schedule@budget`` form); the files grow one finished
configuration or case at a time through `files.ResultsLog`, so a run cut by its time budget keeps what it measured
and ``resume`` continues it. This module holds the harness so that the script ``benchmarks/bench_accuracy.py`` (its
command line), the CLI (``kascade-lite bench accuracy-*``) and the tests run one and the same code.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from .data import held_out_windows, load_tokenizer, token_windows, wikitext_windows
from .eval import nll_per_window
from .files import ResultsLog, shipped_dir
from .methods import METHODS, Setting, attention, build, descriptions, parse, setting
from .models import smollm2_or_tiny
from .schedule import Schedule, default_schedule
from .tasks import answer_case, make_cases
from .tradeoff import selection_read_share, uses_schedule

MODEL = "smollm2-135m"
"""The model whose schedules the harness reads (``<MODEL>_*.json``)."""

PPL_FRONTIER = (0.2, 0.3, 0.5)
"""Kascade budgets beyond 10 %: the perplexity frontier."""

RETRIEVAL_SETTING = dict(budget=0.1, min_keys=128, tile=32)
"""Every retrieval method's setting unless its name sets another budget."""

SMOKE_MODEL = "tiny-random (smoke)"

Config = dict[str, Any]


# ------------------------------------------------------------------------------------------------ schedules
def kascade_schedules(model: Any, schedule_dir: Path | None = None) -> dict[str, Schedule]:
    """Calibrated schedules from ``schedule_dir`` (default: the shipped ones; DP for each K, greedy) that fit
    ``model``; otherwise an evenly spaced 5-anchor schedule with the identity head map."""
    cfg = model.cfg
    found = {}
    for path in sorted((schedule_dir or shipped_dir() / "schedules").glob(f"{MODEL}_*.json")):
        sched = Schedule.load(path)
        if sched.num_layers == cfg.num_layers and sched.num_kv_heads == cfg.num_kv_heads:
            found[path.stem.removeprefix(f"{MODEL}_")] = sched
    if not found:
        anchors = min(5, cfg.num_layers)
        found["evenly_k%d" % anchors] = default_schedule(MODEL, cfg.num_layers, cfg.num_kv_heads, anchors, 32, 0.1)
    return found


def main_schedule(schedules: dict[str, Schedule]) -> str:
    """The schedule Kascade runs in the tables: the one chosen by held-out accuracy (``schedule_selection.json``'s
    ``chosen``, `selection.choose_schedule`) when it is among ``schedules``; else DP with 5 anchors, else the
    first."""
    chosen = None
    if (path := shipped_dir() / "schedule_selection.json").is_file():
        chosen = json.loads(path.read_text()).get("chosen")
    for name in (chosen, "dp_k5", "dp_k4", "dp_k6"):
        if name in schedules:
            return name
    return next(iter(schedules))


# ------------------------------------------------------------------------------------------------ perplexity
def perplexity_configs(schedules: dict[str, Schedule], main: str, lengths: list[int]) -> list[Config]:
    """What to measure, most important first (a time budget cuts the tail): dense and Kascade at 10 %, then
    Kascade at 20/30/50 % (the frontier the perplexity target is read from), the baselines at 10 %, the other
    schedules, tile granularity and the per-query oracle at the longer windows. At 512 tokens the 10 % rows have no
    floor (10 % of 512 is below 128), plus one row with it."""
    def row(seq_len: int, method: str, budget: float = 0.1, schedule: str | None = main, **kw: Any) -> Config:
        short = seq_len <= 512
        return dict(dict(seq_len=seq_len, tile_size=16 if short else 32, granularity="position", method=method,
                         schedule=schedule, budget=budget, min_keys=0 if short else 128), **kw)

    short, long = [n for n in lengths if n <= 512], [n for n in lengths if n > 512]
    tiers = [[row(n, "dense", 1.0, None, min_keys=0) for n in lengths]
             + [row(n, "kascade", min_keys=128) for n in short] + [row(n, "kascade") for n in lengths]
             + [row(n, "kascade_sw", min_keys=128) for n in short] + [row(n, "kascade_sw") for n in long],
             [row(n, "kascade", budget) for n in lengths for budget in PPL_FRONTIER],
             [row(n, m, schedule=main if m in ("kascade_no_remap", "all_heads_pooled", "omnikv") else None)
              for n in lengths for m in ("kascade_no_remap", "all_heads_pooled", "omnikv", "sink_window", "quest")]
             + [row(n, "oracle", schedule=None) for n in short],
             [row(n, "kascade", schedule=name) for n in short for name in schedules if name != main],
             [row(n, "kascade", granularity="tile") for n in lengths]
             + [row(n, "oracle", schedule=None) for n in long]]
    return [c for tier in tiers for c in tier]


def run_perplexity(out: Path, command: str, *, smoke: bool, windows_512: int = 8, windows_2048: int = 2,
                   batch_size: int = 2, schedule_dir: Path | None = None, time_budget: float = 1200,
                   resume: bool = False, note: str | None = None, redo: tuple[str, ...] = ()) -> dict[str, Any]:
    """Measure `perplexity_configs` into ``out`` (``accuracy_ppl.json``); smoke: a tiny random model, 128-token
    windows, the first four dense / Kascade / Quest rows. A resumed run may find schedule files written since (their
    rows are then measured), never changed ones (`files.ResultsLog`'s ``grow``). Returns the document."""
    model = smollm2_or_tiny(smoke)
    schedules = kascade_schedules(model, schedule_dir)
    main = main_schedule(schedules)
    lengths = {128: min(windows_512, 2)} if smoke else {512: windows_512, 2048: windows_2048}
    windows = {}
    for seq_len, n in lengths.items():
        windows[seq_len] = (token_windows(np.random.default_rng(0).integers(0, model.cfg.vocab_size, seq_len * n),
                                          seq_len, n) if smoke else wikitext_windows("test", seq_len, n))
    configs = perplexity_configs(schedules, main, list(lengths))
    if smoke:
        configs = [c for c in configs if c["method"] in ("dense", "kascade", "quest")][:4]
    settings = dict(model=SMOKE_MODEL if smoke else MODEL, dataset="wikitext-2-raw-v1 test",
                    windows={str(k): int(v) for k, v in lengths.items()}, batch_size=batch_size,
                    main_schedule=main, schedules={k: v.to_dict() for k, v in schedules.items()},
                    methods=descriptions(dict.fromkeys(c["method"] for c in perplexity_configs(schedules, main,
                                                                                                list(lengths)))))
    log = ResultsLog(out, command, settings, smoke=smoke, time_budget=time_budget, resume=resume, redo=redo,
                     why=note, grow=("schedules",))
    log.note(note)
    dense_ppl: dict[int, float] = {}
    for cfg in configs:
        if (earlier := log.done(cfg)) is not None:
            if cfg["method"] == "dense":
                dense_ppl[cfg["seq_len"]] = earlier["ppl"]
            continue
        if log.out_of_time():
            log.add(cfg, "skipped")
            continue
        fn = attention(cfg["method"], Setting(schedules[cfg["schedule"] or main], budget=cfg["budget"],
                                              min_keys=cfg["min_keys"], tile=cfg["tile_size"],
                                              granularity=cfg["granularity"]))
        t0 = time.monotonic()
        nll = nll_per_window(model, windows[cfg["seq_len"]], attention=fn, batch_size=batch_size, progress=False)
        ppl = float(np.exp(nll.mean()))
        if cfg["method"] == "dense":
            dense_ppl[cfg["seq_len"]] = ppl
        ref = dense_ppl.get(cfg["seq_len"])
        log.add(dict(cfg, ppl=ppl, nll_per_window=[round(float(x), 5) for x in nll],
                     delta_vs_dense_pct=None if ref is None else round(100 * (ppl / ref - 1), 3),
                     seconds=round(time.monotonic() - t0, 1)))
    return log.doc


def decode_rule_setting(name: str, schedules: dict[str, Schedule], main: str, **fields: Any) -> Setting:
    """The `Setting` whose whole-forward perplexity measures method ``name`` as it runs in generation: a decode-only
    method with query tiles of one token (every position selects as a decode step does), the others at their own
    tile of 32 (as in prefill)."""
    base, s = setting(name, schedules, main, **fields)
    return dataclasses.replace(s, tile=1) if METHODS[base].decode_only else s


def run_method_perplexity(out: Path, command: str, names: list[str], *, smoke: bool, split: str = "test",
                          windows: int = 2, seq_len: int = 2048, schedule_dir: Path | None = None,
                          resume: bool = False) -> dict[str, Any]:
    """Perplexity of each method of ``names`` (``method+schedule@budget``, dense first) at ``seq_len`` on WikiText-2
    ``split`` windows ("test": the first ``windows``, as `run_perplexity`; "validation": the last ones, held out
    from calibration) into ``out``, rows in `run_perplexity`'s form (`decode_rule_setting` says how each is run;
    the row's ``tile_size`` records it). Smoke: a tiny random model, two 128-token random windows."""
    model = smollm2_or_tiny(smoke)
    schedules = kascade_schedules(model, schedule_dir)
    main = main_schedule(schedules)
    if smoke:
        seq_len, data = 128, token_windows(np.random.default_rng(0).integers(0, model.cfg.vocab_size, 256), 128, 2)
    elif split == "validation":
        data = held_out_windows(seq_len, windows, 16, load_tokenizer())
    else:
        data = wikitext_windows(split, seq_len, windows)
    names = ["dense", *[n for n in names if n != "dense"]]
    settings = dict(model=SMOKE_MODEL if smoke else MODEL, dataset=f"wikitext-2-raw-v1 {split}"
                    + (" (the last windows, held out from calibration)" if split == "validation" else ""),
                    windows={str(seq_len): int(len(data))}, batch_size=1, main_schedule=main,
                    schedules={k: v.to_dict() for k, v in schedules.items()}, methods=descriptions(names),
                    rule="decode-only methods: query tiles of one token (each position selects as a decode step); "
                         "the others: their query tiles of 32")
    log = ResultsLog(out, command, settings, smoke=smoke, resume=resume, free=("methods",), grow=("schedules",))
    dense_ppl = None
    for name in names:
        base, sched_name, budget = parse(name)
        s = decode_rule_setting(name, schedules, main, min_keys=128, tile=32)
        cfg = dict(seq_len=seq_len, method=base, schedule=sched_name or (main if uses_schedule(base) else None),
                   budget=1.0 if base == "dense" else s.budget, granularity=s.granularity, min_keys=128,
                   tile_size=s.tile)
        if (earlier := log.done(cfg)) is None:
            t0 = time.monotonic()
            nll = nll_per_window(model, data, attention=attention(base, s), batch_size=1, progress=False)
            earlier = dict(cfg, ppl=float(np.exp(nll.mean())), nll_per_window=[round(float(x), 5) for x in nll],
                           seconds=round(time.monotonic() - t0, 1))
            earlier["delta_vs_dense_pct"] = (None if dense_ppl is None
                                             else round(100 * (earlier["ppl"] / dense_ppl - 1), 3))
            log.add(earlier)
        if base == "dense":
            dense_ppl = earlier["ppl"]
    return log.doc


def result_name(row: dict[str, Any], main: str, *, budget: bool = False) -> str:
    """The registry name (``method[+schedule][@budget]``, `methods.parse`) of a perplexity result row of
    `run_method_perplexity`: the main schedule left out, the budget only with ``budget``."""
    name = row["method"] + ("" if row["schedule"] in (None, main) else f"+{row['schedule']}")
    return name + (f"@{row['budget']:g}" if budget else "")


# ------------------------------------------------------------------------------------------------ retrieval
def read_rule(schedule: Schedule) -> Any:
    """``f(carry, context)``: the measured K/V read share of one decode step under ``schedule``
    (`tradeoff.selection_read_share`), for `tasks.answer_case`'s ``reads``."""
    return lambda carry, context: selection_read_share(carry, schedule, context)


def parse_pairs(spec: str, flag: str, example: str) -> dict[str, int]:
    """``"a:1,b:2"`` -> ``{"a": 1, "b": 2}`` (the value of option ``flag``; ``example`` shows the form)."""
    try:
        return {a: int(b) for a, b in (part.split(":") for part in spec.split(","))}
    except ValueError as e:
        raise ValueError(f"{flag} must look like {example}, got {spec!r}") from e


def parse_cases(spec: str) -> dict[int, int]:
    """``"2048:8,4096:4"`` -> ``{2048: 8, 4096: 4}``."""
    try:
        return {int(length): n for length, n in parse_pairs(spec, "--cases", "2048:8,4096:4").items()}
    except ValueError as e:
        raise ValueError(f"--cases must look like 2048:8,4096:4, got {spec!r}") from e


def parse_every(spec: str, names: list[str]) -> dict[str, int]:
    """``"kascade_no_remap:4"`` -> ``{"kascade_no_remap": 4}``: that method answers only cases 0, 4, 8, ... (a
    costly baseline on a subsample; its row reports its own ``n_cases``)."""
    every = parse_pairs(spec, "--every", "kascade_no_remap:4") if spec else {}
    bad = sorted(m for m, k in every.items() if m not in names or k < 1)
    if bad:
        raise ValueError(f"--every names methods not in --methods or a stride below 1: {bad}")
    return every


def run_retrieval(out: Path, command: str, names: list[str], *, smoke: bool, cases: dict[int, int] | None = None,
                  every: dict[str, int] | None = None, seed: int = 0, schedule_dir: Path | None = None,
                  time_budget: float = 1200, resume: bool = False, note: str | None = None,
                  redo: tuple[str, ...] = (), haystack: str = "noise", wording: str = "fixed",
                  **case_options: Any) -> dict[str, Any]:
    """Every method of ``names`` answers the same needle cases (``{length: count}``; smoke: two of 256 tokens), case
    by case, round-robin over the lengths (a time budget leaves every length with about as many cases); the file is
    rewritten after each case. ``every``: method -> stride (that method answers every stride-th case only);
    ``haystack``, ``wording`` and ``case_options`` go to `tasks.make_cases` (a file of the default filler task
    keeps the settings it always had; other haystacks or wordings are recorded in ``settings``); ``redo``: see
    `files.ResultsLog`. An adaptive method's rows and cases also carry ``kv_read_share``, the K/V read of its decode
    steps measured from the keys its selections kept (`read_rule`). Returns the document."""
    model = smollm2_or_tiny(smoke)
    schedules = kascade_schedules(model, schedule_dir)
    main = main_schedule(schedules)
    cases = {256: 2} if smoke else cases or {2048: 100, 4096: 100, 8192: 100}
    # built before anything is loaded, so that an unknown method or schedule fails at once
    methods = {n: {m: build(m, schedules, main, length=n, **RETRIEVAL_SETTING) for m in names} for n in cases}
    reads = {m: read_rule(setting(m, schedules, main, **RETRIEVAL_SETTING)[1].schedule)
             for m in names if METHODS[parse(m)[0]].adaptive}             # measured K/V read of adaptive methods
    every = every or {}
    tok = load_tokenizer()
    hay = "RULER noise haystack" if haystack == "noise" else f"{haystack} haystack (paragraphs)"
    hay += "" if wording == "fixed" else f", {wording} wording"
    settings = dict(model=SMOKE_MODEL if smoke else MODEL, task=f"single needle, {hay}, 7-digit value, exact "
                    "match of the greedy continuation", cases=cases,
                    budget=RETRIEVAL_SETTING["budget"], min_keys=RETRIEVAL_SETTING["min_keys"],
                    tile_size=RETRIEVAL_SETTING["tile"], main_schedule=main, schedule=schedules[main].to_dict(),
                    methods=descriptions(names), every=every, seed=seed)
    if (haystack, wording) != ("noise", "fixed"):
        settings.update(haystack=haystack, wording=wording)
    log = ResultsLog(out, command, settings, smoke=smoke, time_budget=time_budget, resume=resume,
                     free=("cases", "methods", "every"), redo=redo, why=note)
    log.note(note)
    rows = {(r["length"], r["method"]): r for r in log.doc["results"]}
    for length in cases:
        for name in names:
            if (length, name) not in rows:
                rows[length, name] = dict(length=length, method=name, n_cases=0, n_correct=0, accuracy=None,
                                          seconds=0.0, cases=[])
                log.doc["results"].append(rows[length, name])
    generated = {n: make_cases(n, count, seed=seed, tokenizer=tok, haystack=haystack, wording=wording,
                               **case_options) for n, count in cases.items()}
    for i in range(max(cases.values())):
        for length, batch in generated.items():
            todo = {n: m for n, m in methods[length].items()
                    if i % every.get(n, 1) == 0 and all(c["index"] != i for c in rows[length, n]["cases"])}
            if i >= len(batch) or not todo:
                continue
            if log.out_of_time():
                break
            case = batch[i]
            for name, res in answer_case(model, case, todo, tokenizer=tok, reads=reads).items():
                row = rows[length, name]
                row["cases"].append(dict(index=i, depth=round(case.depth, 4), answer=case.answer, **res))
                row["n_cases"] = len(row["cases"])
                row["n_correct"] = sum(c["correct"] for c in row["cases"])
                row["accuracy"] = row["n_correct"] / row["n_cases"]
                if name in reads:
                    row["kv_read_share"] = round(float(np.mean([c["kv_read_share"] for c in row["cases"]])), 5)
                row["seconds"] = round(row["seconds"] + res["seconds"], 1)
            log.save()
            print(f"case {i} at {length}: " + ", ".join(f"{n} {rows[length, n]['n_correct']}/"
                                                        f"{rows[length, n]['n_cases']}" for n in names), flush=True)
    wanted = {(n, m): len(range(0, count, every.get(m, 1))) for n, count in cases.items() for m in names}
    log.doc["skipped"] = [dict(length=n, method=m, n_cases=want - len(rows[n, m]["cases"]))
                          for (n, m), want in wanted.items() if len(rows[n, m]["cases"]) < want]
    log.save()
    return log.doc
