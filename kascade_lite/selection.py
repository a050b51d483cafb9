"""Choices made on held-out data, never on the published cases: which Kascade schedule the book ships
(`choose_schedule`, chapter 06), whether our ``kascade_sw`` replaces the paper's Kascade (`choose_variant`,
chapter 07) and TidalDecode's re-selection layer (`choose_tidal_layer`, chapter 07's baseline).

**Schedule.** (1) Calibrate with the inference settings (query tiles of 32, 10 % of keys with the 128-key floor, the
tile's own keys counted in the budget) at the evaluation length (2048 tokens), on WikiText-2 *validation* windows
plus retrieval prompts of the calibration seed. (2) Candidates from that calibration: DP with the plain similarity
objective and with the paper's importance-weighted one, K = 2..8 anchors (layer 0 counted), and the greedy rule; plus
the schedule shipped before. (3) Held-out accuracy on needle cases of a *selection* seed (the published tables use
seed 0) and on the last WikiText-2 validation windows. Stage 1 ranks every candidate cheaply (perplexity with Kascade
in the whole forward, retrieval with Kascade in decode after one shared dense prefill); stage 2 runs the finalists
with Kascade in prefill and decode. (4) `choose`: most stage-2 needles, then lower perplexity, then fewer anchors.

**Variant.** On the held-out data of the schedule choice (its schedule, settings, selection seed), both variants run
with Kascade in prefill and decode on the same cases. `recommend`: ``kascade_sw`` only if it finds more needles with
an exact McNemar p < 0.05 *and* its held-out perplexity is not higher.

**Adaptive budgets** (`choose_adaptive`, chapter 07). Candidates (fixed budgets and our mass-targeted variant, with
sparse or dense prefill) answer held-out needle cases of the selection seed on the filler and the natural-text
(WikiText-2 validation) haystacks at 2k, 4k and 8k tokens, and their perplexity is measured on the last validation
windows (`accuracy.run_method_perplexity`). The rule, fixed before measuring (`adaptive_verdict`): among candidates
with recall of dense's needles >= 95 % at every haystack and length and perplexity within 2 % at 2048, the one with
the smallest K/V read per decode step (measured for adaptive methods); if none qualifies, none is chosen and the
frontier is reported.

**TidalDecode's re-selection layer.** Its paper picks the layer that re-selects tokens on held-out data (its
reference code uses layer 13 of 32-layer Llama-3-8B). Here every candidate layer runs TidalDecode in decode after one
shared dense prefill, at 10 % of the keys with the 128-key floor, on held-out 2k needle cases of the selection seed
in both haystacks (the filler, and WikiText-2 validation paragraphs with varied wording). `choose_layer`: most
needles summed over both haystacks; a tie goes to the paper's default ``num_layers // 2`` if it is among the best,
else to the earliest layer. The registry's ``tidal`` (`methods.tidal_reselect`) then runs the chosen layer.

**Anchor spacing** (`compare_spacing`, chapter 06). The control of the schedule choice: evenly spaced anchors
(`search.even_schedule`) beside the DP with both objectives at each K, on held-out data only (perplexity on the last
validation windows at K = 2..8; needles with Kascade in prefill and decode at K = 4, 6, 8 on both held-out
haystacks), with the chosen schedule in key tiles beside it in key positions (the granularity choice, re-validated
on both haystacks).

Each run rewrites its JSON after every measurement (atomically, with provenance). The scripts
``benchmarks/select_schedule.py``, ``benchmarks/select_variant.py``, ``benchmarks/select_tidal.py``,
``benchmarks/select_adaptive.py`` and ``benchmarks/bench_spacing.py`` are their command lines.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from .calibrate import Calibration, calibrate
from .config import LlamaConfig
from .data import held_out_windows, load_tokenizer, wikitext_windows
from .eval import nll_per_window
from .files import ResultsLog, provenance, write_json_atomic
from .kascade import SW_RECENT, SW_SINKS
from .methods import METHODS, TIDAL_SELECTION, Setting, attention, parse, retrieval
from .model import dense_attention
from .models import smollm2_or_tiny
from .schedule import SMOKE_MIN_KEYS, Schedule, default_schedule
from .search import OBJECTIVES, write_schedules
from .tasks import RetrievalMethod, answer_case, make_cases, mcnemar_p, paired_outcomes
from .accuracy import kascade_schedules, main_schedule, result_name, run_method_perplexity, run_retrieval
from .tradeoff import TARGET, kv_read_share, paired_recall, parse_retrieval_name

MODEL = "smollm2-135m"
CALIBRATION_SEED = 1  # retrieval prompts mixed into the calibration set
SELECTION_SEED = 2    # held-out retrieval cases for choosing; the published tables use seed 0
SETTINGS = dict(tile_size=32, budget=0.1, min_keys=128)
VARIANTS = ("kascade", "kascade_sw")


# ------------------------------------------------------------------------------------------------ schedule
def kascade(schedule: Schedule) -> Any:
    """Paper-faithful Kascade at the experiment's settings: key positions, query tiles of 32, 10 % + 128 floor."""
    return attention("kascade", Setting(schedule, budget=SETTINGS["budget"], min_keys=SETTINGS["min_keys"],
                                        tile=SETTINGS["tile_size"]))


def calibration_set(seq_len: int, num_wiki: int, num_prompts: int, tok: Any) -> np.ndarray:
    """``[num_wiki + num_prompts, seq_len]``: the first WikiText-2 validation windows, then retrieval prompts."""
    wiki = wikitext_windows("validation", seq_len, num_wiki, tokenizer=tok)
    prompts = [c.ids for c in make_cases(seq_len, num_prompts, seed=CALIBRATION_SEED, tokenizer=tok)]
    return np.concatenate([wiki, np.stack(prompts)]).astype(np.int32)


def candidates(cal_dir: Path, sched_dir: Path, previous: Path | None, command: str, smoke: bool
               ) -> dict[str, Schedule]:
    """The candidates among the schedules of the new calibration (all written to ``sched_dir`` as
    ``<model>_<name>.json`` by `search.write_schedules`): DP with both objectives, K = 2..8, and greedy; and the
    previously shipped one (``shipped_dpimp_k5_512``, not written). The evenly spaced controls and the refresh
    thresholds are the subject of other experiments (`compare_spacing`, `choose_adaptive`)."""
    cal = Calibration.load(cal_dir / f"{MODEL}-2k.safetensors")
    paths = write_schedules(cal, sched_dir, model=MODEL, command=command, smoke=smoke, min_keys=SETTINGS["min_keys"])
    names = {p.stem.removeprefix(f"{MODEL}_"): p for p in paths}
    found = {n: Schedule.load(p) for n, p in names.items() if n == "greedy" or n.startswith(("dp_", "dpimp_"))}
    if previous is not None and previous.is_file():
        old = Schedule.load(previous)
        if (old.num_layers, old.num_kv_heads) == (cal.num_layers, cal.num_kv_heads):
            found["shipped_dpimp_k5_512"] = old
    return found


def objective_of(sched: Schedule) -> str | None:
    """``"similarity"`` or ``"importance"`` for a DP schedule (older files state the formula), None for greedy."""
    if sched.method != "dp":
        return None
    objective = str(dict(sched.meta).get("objective", "importance"))
    return objective if objective in OBJECTIVES else "importance"


def choose(rows: dict[str, dict[str, Any]]) -> str:
    """Most held-out needles found; then lower held-out perplexity; then fewer anchors."""
    return min(rows, key=lambda n: (-rows[n]["retrieval_correct"], rows[n]["ppl"], rows[n]["num_anchors"]))


def choose_schedule(out: Path, command: str, *, smoke: bool, seq_len: int = 2048, cal_wiki: int = 16,
                    cal_prompts: int = 16, cases: int = 30, ppl_windows: int = 6, previous: Path | None = None,
                    finalists: int = 4, quiet: bool = False) -> dict[str, Any]:
    """The schedule choice into ``out``: ``schedule_selection.json``, ``calibration/<model>-2k.*`` and
    ``schedules/<model>_*.json``. Returns the document (``chosen`` once stage 2 has run)."""
    model, tok = smollm2_or_tiny(smoke, num_layers=6), load_tokenizer()
    settings = dict(SETTINGS, model=MODEL, seq_len=seq_len,
                    calibration=dict(wikitext_windows=cal_wiki, retrieval_prompts=cal_prompts, seed=CALIBRATION_SEED),
                    held_out=dict(retrieval_cases=cases, seed=SELECTION_SEED, ppl_windows=ppl_windows,
                                  ppl_source="last WikiText-2 validation windows"), granularity="position",
                    rule=("stage 1: every candidate, ppl + decode-only retrieval; stage 2: the best finalists with "
                          "Kascade in prefill and decode; chosen: most stage-2 needles, then lower ppl, then fewer "
                          "anchors"))
    rec = ResultsLog(out / "schedule_selection.json", command, settings, smoke=smoke,
                     fields={"candidates": {}, "dense": {}})
    doc = rec.doc
    cal_dir, sched_dir = out / "calibration", out / "schedules"
    cal_stem = cal_dir / f"{MODEL}-2k"
    cal_dir.mkdir(parents=True, exist_ok=True)
    seqs = calibration_set(seq_len, cal_wiki, cal_prompts, tok)
    dataset = (f"wikitext-2-v1 validation first {cal_wiki} x {seq_len} + {cal_prompts} retrieval "
               f"prompts (seed {CALIBRATION_SEED})")
    if not (cal_stem.with_suffix(".safetensors").is_file()
            and Calibration.load(cal_stem.with_suffix(".safetensors")).settings.get("dataset") == dataset):
        cal = calibrate(model, seqs, model_name=MODEL, progress=not quiet, dataset=dataset,
                        partial=cal_stem.with_suffix(".partial.safetensors"), save_every=2,
                        coverage_stride=128, **SETTINGS)  # coverage is chapter 05's (512 tokens); sorting is slow
        cal.save(cal_stem, command=command, smoke=smoke)
    schedules = candidates(cal_dir, sched_dir, previous, command, smoke)
    windows = held_out_windows(seq_len, ppl_windows, cal_wiki, tok)
    held_out = make_cases(seq_len, cases, seed=SELECTION_SEED, tokenizer=tok)

    # stage 1: perplexity (Kascade everywhere) and decode-only retrieval (one dense prefill shared by all)
    dense = dense_attention  # the reference: the model's own attention (the registry's "dense")
    dense_nll = nll_per_window(model, windows, batch_size=1, progress=False)
    doc["dense"] = dict(ppl=float(np.exp(dense_nll.mean())))
    rows = doc["candidates"]
    for name, sched in schedules.items():
        nll = nll_per_window(model, windows, attention=kascade(sched), batch_size=1, progress=False)
        ppl = float(np.exp(nll.mean()))
        rows[name] = dict(anchors=list(sched.anchors), num_anchors=len(sched.anchors), method=sched.method,
                          objective=objective_of(sched), ppl=ppl, ppl_delta=ppl / doc["dense"]["ppl"] - 1)
        rec.save()
        print(name, sched.anchors, f"ppl {ppl:.3f}", flush=True)
    methods = {"dense": RetrievalMethod(dense, dense)}
    methods.update({n: RetrievalMethod(dense, kascade(s)) for n, s in schedules.items()})
    hits = {n: 0 for n in methods}
    for case in held_out:
        for n, res in answer_case(model, case, methods, tokenizer=tok).items():
            hits[n] += int(res["correct"])
    doc["dense"]["retrieval_correct"] = hits.pop("dense")
    for n, h in hits.items():
        rows[n]["decode_only_correct"] = h
    rec.save()
    print("stage 1 decode-only hits:", hits, flush=True)

    # stage 2: the finalists with Kascade in prefill and decode
    ranked = sorted(rows, key=lambda n: (-rows[n]["decode_only_correct"], rows[n]["ppl"], rows[n]["num_anchors"]))
    for name in ranked[:finalists]:
        attn = kascade(schedules[name])
        method = {"k": RetrievalMethod(attn, attn)}
        rows[name]["retrieval_correct"] = sum(int(answer_case(model, c, method, tokenizer=tok)["k"]["correct"])
                                              for c in held_out)
        doc["chosen"] = choose({n: r for n, r in rows.items() if "retrieval_correct" in r})
        rec.save()
        print(name, "full Kascade hits:", rows[name]["retrieval_correct"], flush=True)
    return doc


# ------------------------------------------------------------------------------------------------ variant
def variants(sched: Schedule, settings: dict[str, Any]) -> dict[str, Any]:
    """The paper's Kascade and ``kascade_sw`` at the schedule choice's settings (granularity, tiles, budget, floor)."""
    s = Setting(sched, budget=settings["budget"], min_keys=settings["min_keys"], tile=settings["tile_size"],
                granularity=settings["granularity"])
    return {name: attention(name, s) for name in VARIANTS}


def recommend(rows: dict[str, dict[str, Any]], only_sw: int, only_k: int, p: float) -> str:
    """``"kascade_sw"`` if it finds significantly more held-out needles (p < 0.05) at no higher perplexity."""
    better = only_sw > only_k and p < 0.05 and rows["kascade_sw"]["ppl"] <= rows["kascade"]["ppl"]
    return "kascade_sw" if better else "kascade"


def load_selection(path: Path, schedule_dir: Path | None) -> tuple[dict[str, Any], Schedule]:
    """The schedule choice's JSON and its chosen schedule (from ``schedule_dir``, default: next to the JSON)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no schedule choice here; run benchmarks/select_schedule.py "
                                f"(kascade-lite bench schedule-selection) first")
    doc = json.loads(path.read_text())
    if "chosen" not in doc:
        raise ValueError(f"{path}: no 'chosen' schedule (the schedule choice did not finish)")
    sched_path = (schedule_dir or path.parent / "schedules") / f"{MODEL}_{doc['chosen']}.json"
    return doc, Schedule.load(sched_path)


def choose_variant(out: Path, command: str, selection_path: Path, *, smoke: bool, schedule_dir: Path | None = None,
                   cases: int = 60, ppl_windows: int = 6, haystack: str = "noise",
                   wording: str = "fixed") -> dict[str, Any]:
    """The variant choice into ``out/variant_selection.json`` on the held-out data of ``selection_path`` (smoke:
    a tiny random model with as many layers as the chosen schedule, 256 tokens). With another ``haystack`` (the
    held-out natural text is ``"wikitext-valid"``) or ``wording``, the needle cases use it and the file is
    ``variant_selection_<haystack>.json``. Returns the document."""
    selection, sched = load_selection(selection_path, schedule_dir)
    s, held = selection["settings"], selection["settings"]["held_out"]
    seq_len = 256 if smoke else s["seq_len"]
    model, tok = smollm2_or_tiny(smoke, num_layers=sched.num_layers), load_tokenizer()
    attn = variants(sched, s)
    settings = dict(model=MODEL, schedule=selection["chosen"], anchors=list(sched.anchors), seq_len=seq_len,
                    **{k: s[k] for k in ("granularity", "tile_size", "budget", "min_keys")},
                    sinks=SW_SINKS, recent=SW_RECENT, selection=selection_path.name,
                    held_out=dict(retrieval_cases=cases, seed=held["seed"], ppl_windows=ppl_windows,
                                  ppl_source="last WikiText-2 validation windows"),
                    rule=("kascade_sw if it finds more held-out needles with exact McNemar p < 0.05 and its "
                          "held-out perplexity is not higher; else the paper's kascade"))
    if (haystack, wording) != ("noise", "fixed"):
        settings["held_out"].update(haystack=haystack, wording=wording)
    filename = "variant_selection.json" if haystack == "noise" else f"variant_selection_{haystack}.json"
    rec = ResultsLog(out / filename, command, settings, smoke=smoke, fields={"variants": {}})
    doc = rec.doc
    windows = held_out_windows(seq_len, ppl_windows, s["calibration"]["wikitext_windows"], tok)
    rows = doc["variants"]
    for name, fn in attn.items():
        nll = nll_per_window(model, windows, attention=fn, batch_size=1, progress=False)
        rows[name] = dict(ppl=float(np.exp(nll.mean())), cases=[])
        rec.save()
        print(name, f"held-out ppl {rows[name]['ppl']:.3f}", flush=True)
    methods = {n: RetrievalMethod(fn, fn) for n, fn in attn.items()}
    held_cases = make_cases(seq_len, cases, seed=held["seed"], tokenizer=tok, haystack=haystack, wording=wording)
    for i, case in enumerate(held_cases):
        for name, res in answer_case(model, case, methods, tokenizer=tok).items():
            rows[name]["cases"].append(dict(index=i, answer=case.answer, output=res["output"],
                                            correct=bool(res["correct"])))
        for row in rows.values():
            row["n_cases"], row["n_correct"] = len(row["cases"]), sum(c["correct"] for c in row["cases"])
        both, only_sw, only_k, neither = paired_outcomes(rows["kascade_sw"]["cases"], rows["kascade"]["cases"])
        p = mcnemar_p(only_sw, only_k)
        doc["paired"] = dict(both=both, only_kascade_sw=only_sw, only_kascade=only_k, neither=neither, p=p)
        doc["recommended"] = recommend(rows, only_sw, only_k, p)
        rec.save()
        print(f"case {i}: " + ", ".join(f"{n} {r['n_correct']}/{r['n_cases']}" for n, r in rows.items())
              + f" | p = {p:.2g}", flush=True)
    return doc


# ------------------------------------------------------------------------------------------------ adaptive budgets
HAYSTACKS_HELD_OUT = {"noise": "fixed", "wikitext-valid": "varied"}
"""The held-out needle cases of the budget-rule and TidalDecode layer choices: haystack -> needle wording of
`tasks.make_cases` (the filler, and WikiText-2 validation paragraphs)."""


def candidate_row(name: str, retrieval: dict[str, dict[str, Any]], ppl: dict[str, Any],
                  schedules: dict[str, Schedule], main: str, cfg: LlamaConfig, min_keys: int = 128
                  ) -> dict[str, Any]:
    """One candidate's held-out row: paired recall per haystack and length, perplexity change, the K/V read share
    per decode step by length (measured for an adaptive method and averaged over the haystacks, else
    `tradeoff.kv_read_share`), and the target's checks."""
    method, budget, sched, granularity = parse_retrieval_name(name, 0.1)
    schedule = schedules[sched or main]
    recall, share = {}, {}
    for hay, doc in retrieval.items():
        rows = {(r["length"], r["method"]): r for r in doc["results"]}
        for length in sorted({n for n, _ in rows}):
            row, dense = rows.get((length, name)), rows.get((length, "dense"))
            if row is None or dense is None or not row["cases"]:
                continue
            recall.setdefault(hay, {})[str(length)] = paired_recall(row["cases"], dense["cases"])
            share.setdefault(str(length), []).append(
                row["kv_read_share"] if METHODS[method].adaptive else
                kv_read_share(method, length, budget=budget, granularity=granularity, schedule=schedule, cfg=cfg,
                              min_keys=min_keys))
    delta = ppl.get("delta_vs_dense_pct")
    found = [c["recall"] for cells in recall.values() for c in cells.values()]     # None: dense found no needle
    checks = [r is not None and r >= TARGET.recall for r in found]
    meets_recall = bool(checks) and all(checks) and all(
        str(n) in cells for cells in recall.values() for n in TARGET.lengths)
    return dict(recall=recall, ppl=ppl.get("ppl"), ppl_delta_pct=delta,
                kv_read_share={n: float(np.mean(v)) for n, v in share.items()},
                meets=meets_recall and delta is not None and delta <= TARGET.ppl_within_pct,
                min_recall=min((r for r in found if r is not None), default=None))


def adaptive_verdict(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The rule fixed before measuring: the qualifying candidate (`candidate_row`'s ``meets``) with the smallest
    K/V read at 2048 tokens; else ``chosen`` None and ``closest``: the candidate with the highest worst-case recall,
    then the lowest perplexity change."""
    ok = [n for n, r in rows.items() if r["meets"]]
    if ok:
        return dict(chosen=min(ok, key=lambda n: rows[n]["kv_read_share"].get("2048", 1.0)), closest=None)
    ranked = sorted(rows, key=lambda n: (-(rows[n]["min_recall"] or 0), rows[n]["ppl_delta_pct"] or 1e9))
    return dict(chosen=None, closest=ranked[0] if ranked else None)


def choose_adaptive(out: Path, command: str, *, smoke: bool, candidates: tuple[str, ...], cases: dict[int, int],
                    ppl_windows: int = 2, schedule_dir: Path | None = None) -> dict[str, Any]:
    """The held-out choice among the budget rules ``candidates`` (the book's: `pipeline.ADAPTIVE`) into
    ``out/variant_selection_adaptive.json``, on ``cases`` (``{length: count}`` per haystack; smoke: two of 256
    tokens); the needle runs it rests on go to ``out/adaptive_heldout_<haystack>.json`` and the perplexities to
    ``out/adaptive_heldout_ppl.json`` (each resumable: an interrupted choice continues where it stopped). Returns
    the document."""
    cases = {256: 2} if smoke else dict(cases)
    names = ["dense", *candidates]
    retrieval = {}
    for hay, wording in HAYSTACKS_HELD_OUT.items():
        path = out / f"adaptive_heldout_{hay}.json"
        retrieval[hay] = run_retrieval(path, command, names, smoke=smoke, cases=cases, seed=SELECTION_SEED,
                                       schedule_dir=schedule_dir, time_budget=0, resume=path.is_file(),
                                       haystack=hay, wording=wording)
    ppl_path = out / "adaptive_heldout_ppl.json"
    ppl_doc = run_method_perplexity(ppl_path, command, names, smoke=smoke, split="validation", windows=ppl_windows,
                                    schedule_dir=schedule_dir, resume=ppl_path.is_file())
    model = smollm2_or_tiny(smoke)
    model_schedules = kascade_schedules(model, schedule_dir)
    main = main_schedule(model_schedules)
    ppl_rows = {result_name(r, main, budget=True): r for r in ppl_doc["results"]}
    rows = {n: candidate_row(n, retrieval, ppl_rows.get(n, {}), model_schedules, main, model.cfg) for n in candidates}
    doc = dict(provenance=provenance(command, smoke=smoke),
               settings=dict(model=MODEL, schedule=main, cases={str(k): v for k, v in cases.items()},
                             seed=SELECTION_SEED, haystacks=HAYSTACKS_HELD_OUT, ppl_windows=ppl_windows,
                             ppl_source="last WikiText-2 validation windows", candidates=list(candidates),
                             inputs=[p.name for p in (*[out / f"adaptive_heldout_{h}.json" for h in retrieval],
                                                      ppl_path)],
                             rule=("recall of dense's needles >= 95 % at every held-out haystack and length and "
                                   "perplexity within 2 % of dense at 2048 (decode-only methods measured as decode "
                                   "steps); among those, the smallest K/V read per decode step at 2048; if none "
                                   "qualifies, none is chosen and the closest (highest worst-case recall, then "
                                   "lowest perplexity change) is named")),
               candidates=rows, **adaptive_verdict(rows))
    write_json_atomic(out / "variant_selection_adaptive.json", doc)
    return doc


# ------------------------------------------------------------------------------------------------ TidalDecode layer
def tidal_candidates(num_layers: int, step: int = 2) -> list[int]:
    """Re-selection layers to try: every ``step``-th layer from 3 (the first after TidalDecode's selection layer 2)
    to the last, plus the paper's default ``num_layers // 2``."""
    default = max(3, num_layers // 2)
    return sorted({*range(3, num_layers, step), default})


def needles_found(haystacks: dict[str, dict[str, dict[str, Any]]], layers: list[int]) -> dict[int, int]:
    """``{layer: needles found summed over the haystacks}`` from a layer choice's ``haystacks`` field (per haystack,
    per method name: ``n_correct``)."""
    return {n: sum(rows[str(n)]["n_correct"] for rows in haystacks.values()) for n in layers}


def choose_layer(found: dict[int, int], default: int) -> int:
    """The re-selection layer with the most needles found (``{layer: needles summed over the haystacks}``); a tie
    goes to ``default`` (the paper's ``num_layers // 2``) if it is among the best, else to the earliest layer."""
    best = max(found.values())
    tied = sorted(layer for layer, n in found.items() if n == best)
    return default if default in tied else tied[0]


def choose_tidal_layer(out: Path, command: str, *, smoke: bool, seq_len: int = 2048, cases: int = 20,
                       layers: list[int] | None = None, budget: float = 0.1, min_keys: int = 128,
                       resume: bool = False) -> dict[str, Any]:
    """TidalDecode's re-selection layer chosen on held-out needle cases into ``out/tidal_selection.json`` (smoke: a
    tiny random model of 8 layers, 256 tokens). Every layer of ``layers`` (default `tidal_candidates`) and dense
    answer the same first ``cases`` cases of each haystack of `HAYSTACKS_HELD_OUT` (selection seed), round-robin over
    the haystacks; the TidalDecode runs share dense's prefill. ``chosen`` (`choose_layer`) is written once every case
    is answered. ``resume``: keep the cases a run with the same settings answered (`files.ResultsLog`; the case count
    may change) and answer the rest. Returns the document."""
    model, tok = smollm2_or_tiny(smoke, num_layers=8), load_tokenizer()
    seq_len = 256 if smoke else seq_len
    cfg = model.cfg
    layers = sorted(layers or tidal_candidates(cfg.num_layers))
    bad = [n for n in layers if not 2 < n < cfg.num_layers]
    if bad:
        raise ValueError(f"TidalDecode re-selection layers {bad} are not in (2, {cfg.num_layers})")
    default = max(3, cfg.num_layers // 2)
    base = Setting(default_schedule(MODEL, cfg.num_layers, cfg.num_kv_heads, 1, 1, budget), budget=budget,
                   min_keys=min_keys, length=seq_len)
    methods = {"dense": retrieval("dense", base)}
    methods.update({str(n): retrieval("tidal", dataclasses.replace(base, reselect=n)) for n in layers})
    settings = dict(model=MODEL, num_layers=cfg.num_layers, seq_len=seq_len, budget=budget,
                    min_keys=min_keys, candidates=layers, default=default, phase="decode only (dense prefill)",
                    held_out=dict(retrieval_cases=cases, seed=SELECTION_SEED,
                                  haystacks=dict(HAYSTACKS_HELD_OUT)),
                    rule=("most needles summed over both haystacks; a tie goes to the paper's default "
                          "num_layers // 2 if it is among the best, else to the earliest layer"))
    empty = {h: {m: dict(n_cases=0, n_correct=0, cases=[]) for m in methods} for h in HAYSTACKS_HELD_OUT}
    rec = ResultsLog(out / TIDAL_SELECTION, command, settings, smoke=smoke, fields={"haystacks": empty},
                     resume=resume, free=("held_out",))  # held_out: only the case count can differ
    doc = rec.doc
    doc.pop("chosen", None)
    done = {h: {c["index"] for c in rows["dense"]["cases"]} for h, rows in doc["haystacks"].items()}
    for hay, rows in doc["haystacks"].items():
        uneven = any({c["index"] for c in r["cases"]} != done[hay] for r in rows.values())
        if uneven or max(done[hay], default=-1) >= cases:
            raise ValueError(f"{out / TIDAL_SELECTION}: on {hay} its methods answered different cases, or more than "
                             f"{cases}; resume with at least as many cases")
    held = {h: make_cases(seq_len, cases, seed=SELECTION_SEED, tokenizer=tok, haystack=h, wording=w)
            for h, w in HAYSTACKS_HELD_OUT.items()}
    for i in range(cases):
        for hay, batch in held.items():
            rows = doc["haystacks"][hay]
            if i in done[hay]:
                continue
            for name, res in answer_case(model, batch[i], methods, tokenizer=tok).items():
                rows[name]["cases"].append(dict(index=i, answer=batch[i].answer, output=res["output"],
                                                correct=bool(res["correct"])))
                rows[name]["n_cases"] = len(rows[name]["cases"])
                rows[name]["n_correct"] = sum(c["correct"] for c in rows[name]["cases"])
            doc["found"] = {str(n): k for n, k in needles_found(doc["haystacks"], layers).items()}
            rec.save()
            print(f"case {i} ({hay}): dense {rows['dense']['n_correct']}/{rows['dense']['n_cases']}, "
                  + ", ".join(f"{n}: {rows[str(n)]['n_correct']}" for n in layers), flush=True)
    found = needles_found(doc["haystacks"], layers)
    doc["found"], doc["chosen"] = {str(n): k for n, k in found.items()}, choose_layer(found, default)
    rec.save()
    return doc


# ------------------------------------------------------------------------------------------------ anchor spacing
SPACING_FAMILIES = ("even", "dp", "dpimp")
"""Schedule families compared at each anchor count K: evenly spaced anchors (`search.even_schedule`, the control),
the DP with the similarity objective and with the paper's importance-weighted one (all with the calibration's head
maps)."""
SPACING_COUNTS = (2, 3, 4, 5, 6, 7, 8)
"""Anchor counts (layer 0 counted) of the held-out perplexity comparison."""
SPACING_NEEDLE_COUNTS = (4, 6, 8)
"""Anchor counts of the held-out needle comparison (Kascade in prefill and decode: the costly runs)."""


def spacing_names(counts: tuple[int, ...]) -> list[str]:
    """``kascade+<family>_k<K>`` for every family of `SPACING_FAMILIES` and K of ``counts``."""
    return [f"kascade+{fam}_k{k}" for k in counts for fam in SPACING_FAMILIES]


def distinct(names: list[str], schedules: dict[str, Schedule], main: str) -> dict[str, str]:
    """Each name of ``names`` (``kascade[_tiles][+schedule]``) -> the first name that runs the same method on the
    same anchors and head maps (itself if none before it): the runs a comparison needs once only."""
    seen: dict[tuple[Any, ...], str] = {}
    out = {}
    for name in names:
        base, sched, _ = parse(name)
        s = schedules[sched or main]
        out[name] = seen.setdefault((base, s.layer_types, s.anchor_of, s.head_map), name)
    return out


def spacing_row(name: str, retrieval: dict[str, dict[str, Any]], ppl: dict[str, dict[str, Any]],
                schedule: Schedule) -> dict[str, Any]:
    """One schedule's held-out row: anchors, perplexity change, and per haystack the needles paired with dense's
    (`tradeoff.paired_recall`); absent entries were not measured."""
    row: dict[str, Any] = dict(anchors=list(schedule.anchors), method=schedule.method)
    if name in ppl:
        row.update(ppl=ppl[name]["ppl"], ppl_delta_pct=ppl[name]["delta_vs_dense_pct"])
    for hay, rows in retrieval.items():
        if name in rows and rows[name]["cases"]:
            row.setdefault("needles", {})[hay] = paired_recall(rows[name]["cases"], rows["dense"]["cases"])
    return row


def compare_spacing(out: Path, command: str, *, smoke: bool, cases: int = 16, ppl_windows: int = 4,
                    counts: tuple[int, ...] = SPACING_COUNTS, needle_counts: tuple[int, ...] = SPACING_NEEDLE_COUNTS,
                    schedule_dir: Path | None = None) -> dict[str, Any]:
    """Where should the anchors go? Evenly spaced anchors against both DP objectives at the same K, on held-out
    data: perplexity on the last WikiText-2 validation windows (Kascade in the whole forward, tiles of 32) at every
    K of ``counts``, and needles found by Kascade in prefill and decode on ``cases`` held-out 2k cases of the
    selection seed per haystack (`HAYSTACKS_HELD_OUT`) at every K of ``needle_counts``, beside the shipped schedule
    with key tiles (the granularity choice, re-validated on both haystacks). Runs that would repeat another (the
    same anchors and head maps, `distinct`) are made once. The runs go to ``out/spacing_heldout_ppl.json`` and
    ``out/spacing_heldout_<haystack>.json`` (resumable), the summary to ``out/schedule_spacing.json``. Smoke: a
    tiny random model with a calibration of two random sequences, K = 2 and 3, two cases of 256 tokens."""
    if smoke:
        model = smollm2_or_tiny(True)
        seqs = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (2, 256))
        cal = calibrate(model, seqs, model_name=MODEL, progress=False, tile_size=32, budget=0.1,
                        min_keys=SMOKE_MIN_KEYS)
        schedule_dir = out / "schedules"
        schedule_dir.mkdir(parents=True, exist_ok=True)
        write_schedules(cal, schedule_dir, model=MODEL, command=command, smoke=True, min_keys=SMOKE_MIN_KEYS,
                        anchor_counts=(2, 3))
        counts, needle_counts = (2, 3), (2,)
    model = smollm2_or_tiny(smoke)
    schedules = kascade_schedules(model, schedule_dir)
    main = main_schedule(schedules)
    missing = sorted({n.split("+")[1] for n in spacing_names(counts)} - set(schedules))
    if missing:
        raise FileNotFoundError(f"{schedule_dir or 'the shipped schedules'}: no schedule {', '.join(missing)} "
                                f"(`kascade-lite schedule` writes them)")
    ppl_names = ["kascade_tiles", *spacing_names(counts)]
    needle_names = ["kascade", "kascade_tiles", *spacing_names(needle_counts)]
    names = list(dict.fromkeys(["kascade", *ppl_names, *needle_names]))
    same = distinct(names, schedules, main)
    ppl_path = out / "spacing_heldout_ppl.json"
    ppl_doc = run_method_perplexity(ppl_path, command, ["dense", *dict.fromkeys(same[n] for n in ppl_names)],
                                    smoke=smoke, split="validation", windows=ppl_windows, schedule_dir=schedule_dir,
                                    resume=ppl_path.is_file())
    ppl = {result_name(r, main): r for r in ppl_doc["results"]}
    retrieval = {}
    for hay, wording in HAYSTACKS_HELD_OUT.items():
        path = out / f"spacing_heldout_{hay}.json"
        doc = run_retrieval(path, command, ["dense", *dict.fromkeys(same[n] for n in needle_names)], smoke=smoke,
                            cases={2048: cases}, seed=SELECTION_SEED, schedule_dir=schedule_dir, time_budget=0,
                            resume=path.is_file(), haystack=hay, wording=wording)
        retrieval[hay] = {r["method"]: r for r in doc["results"]}
    rows = {name: dict(spacing_row(same[name], retrieval, ppl, schedules[parse(name)[1] or main]),
                       same_as=None if same[name] == name else same[name])
            for name in names}
    summary = dict(provenance=provenance(command, smoke=smoke),
                   settings=dict(model=MODEL, main_schedule=main, families=list(SPACING_FAMILIES),
                                 ppl_counts=list(counts), needle_counts=list(needle_counts), seed=SELECTION_SEED,
                                 cases={"2048": 2 if smoke else cases}, haystacks=HAYSTACKS_HELD_OUT,
                                 ppl_windows=ppl_windows, ppl_source="last WikiText-2 validation windows",
                                 budget=0.1, min_keys=128, tile_size=32,
                                 inputs=[ppl_path.name, *(f"spacing_heldout_{h}.json" for h in retrieval)]),
                   rows=rows)
    write_json_atomic(out / "schedule_spacing.json", summary)
    return summary
