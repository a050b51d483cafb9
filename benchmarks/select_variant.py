"""Choose between the paper's Kascade and our ``kascade_sw`` by held-out accuracy, not on the published cases.

Chapter 07's tables measure ``kascade_sw`` (the first 4 and the 32 latest key positions always among an anchor's
Top-k, inside the same budget) beside the paper's Kascade on the *test* cases (seed 0). Recommending it on that
evidence would be choosing a method on the test set, so the choice is made here, on the held-out data of the
schedule choice (``schedule_selection.json``, benchmarks/select_schedule.py): its schedule, its settings (tiles,
budget, floor, length), needle cases of its selection seed and the last WikiText-2 validation windows.

Both variants run with Kascade in prefill and decode, on the same cases. **Rule:** ``kascade_sw`` is recommended
only if it finds more held-out needles with an exact McNemar p < 0.05 *and* its held-out perplexity is not higher;
otherwise the paper's Kascade stays the recommendation. The JSON is rewritten after every case (atomically, with
provenance). Full size on a 2-core CPU (about 15 minutes)::

    python benchmarks/select_variant.py --out /tmp/variant   # then copy into data/ when satisfied
    python benchmarks/select_variant.py --out data           # writes data/variant_selection.json

``--smoke`` runs a tiny random model with as many layers as the chosen schedule, at 256 tokens (seconds; for the
tests), and records ``"smoke": true``; smoke and full runs alike need ``--out`` or write a new temporary folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from kascade_lite.data import held_out_windows, load_tokenizer
from kascade_lite.eval import nll_per_window
from kascade_lite.files import provenance, shipped_dir, write_json_atomic
from kascade_lite.kascade import SW_RECENT, SW_SINKS, KascadeAttention
from kascade_lite.models import smollm2_or_tiny
from kascade_lite.schedule import Schedule
from kascade_lite.tasks import RetrievalMethod, answer_case, make_cases, mcnemar_p, paired_outcomes

MODEL = "smollm2-135m"


def variants(sched: Schedule, settings: dict[str, Any]) -> dict[str, KascadeAttention]:
    """The paper's Kascade and ``kascade_sw`` at the schedule choice's settings (granularity, tiles, budget, floor)."""
    opts = dict(granularity=settings["granularity"], tile_size=settings["tile_size"], budget=settings["budget"],
                min_keys=settings["min_keys"])
    return {"kascade": KascadeAttention(sched, **opts),
            "kascade_sw": KascadeAttention.kascade_sw(sched, **opts)}


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


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    selection_path = Path(args.selection)
    selection, sched = load_selection(selection_path, Path(args.schedule_dir) if args.schedule_dir else None)
    s, held = selection["settings"], selection["settings"]["held_out"]
    seq_len = 256 if args.smoke else s["seq_len"]
    model, tok = smollm2_or_tiny(args.smoke, num_layers=sched.num_layers), load_tokenizer()
    attn = variants(sched, s)
    doc: dict[str, Any] = {
        "provenance": provenance(command, smoke=args.smoke),
        "settings": dict(model=MODEL, schedule=selection["chosen"], anchors=list(sched.anchors), seq_len=seq_len,
                         **{k: s[k] for k in ("granularity", "tile_size", "budget", "min_keys")},
                         sinks=SW_SINKS, recent=SW_RECENT, selection=selection_path.name,
                         held_out=dict(retrieval_cases=args.cases, seed=held["seed"], ppl_windows=args.ppl_windows,
                                       ppl_source="last WikiText-2 validation windows"),
                         rule=("kascade_sw if it finds more held-out needles with exact McNemar p < 0.05 and its "
                               "held-out perplexity is not higher; else the paper's kascade")),
        "variants": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path, start = out / "variant_selection.json", time.monotonic()

    def save() -> None:
        doc["elapsed_s"] = round(time.monotonic() - start, 1)
        write_json_atomic(path, doc)

    windows = held_out_windows(seq_len, args.ppl_windows, s["calibration"]["wikitext_windows"], tok)
    rows = doc["variants"]
    for name, fn in attn.items():
        nll = nll_per_window(model, windows, attention=fn, batch_size=1, progress=False)
        rows[name] = dict(ppl=float(np.exp(nll.mean())), cases=[])
        save()
        print(name, f"held-out ppl {rows[name]['ppl']:.3f}", flush=True)
    methods = {n: RetrievalMethod(fn, fn) for n, fn in attn.items()}
    for i, case in enumerate(make_cases(seq_len, args.cases, seed=held["seed"], tokenizer=tok)):
        for name, res in answer_case(model, case, methods, tokenizer=tok).items():
            rows[name]["cases"].append(dict(index=i, answer=case.answer, output=res["output"],
                                            correct=bool(res["correct"])))
        for row in rows.values():
            row["n_cases"], row["n_correct"] = len(row["cases"]), sum(c["correct"] for c in row["cases"])
        both, only_sw, only_k, neither = paired_outcomes(rows["kascade_sw"]["cases"], rows["kascade"]["cases"])
        p = mcnemar_p(only_sw, only_k)
        doc["paired"] = dict(both=both, only_kascade_sw=only_sw, only_kascade=only_k, neither=neither, p=p)
        doc["recommended"] = recommend(rows, only_sw, only_k, p)
        save()
        print(f"case {i}: " + ", ".join(f"{n} {r['n_correct']}/{r['n_cases']}" for n, r in rows.items())
              + f" | p = {p:.2g}", flush=True)
    return doc


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="output folder (default: a new temporary folder)")
    p.add_argument("--selection", default=str(shipped_dir() / "schedule_selection.json"),
                   help="schedule_selection.json of benchmarks/select_schedule.py (default: the shipped one)")
    p.add_argument("--schedule-dir", default=None, help="folder of the chosen schedule (default: next to --selection)")
    p.add_argument("--cases", type=int, default=60, help="held-out retrieval cases (the selection seed)")
    p.add_argument("--ppl-windows", type=int, default=6, help="held-out WikiText-2 validation windows")
    p.add_argument("--smoke", action="store_true", help="tiny random model, tiny sizes")
    args = p.parse_args(argv)
    if args.smoke:
        args.cases, args.ppl_windows = 2, 1
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="kascade-variant-")
    command = " ".join(["python benchmarks/select_variant.py", *(sys.argv[1:] if argv is None else argv)])
    doc = run(args, command)
    print(json.dumps({"out": args.out, "recommended": doc.get("recommended"), "paired": doc.get("paired")}))


if __name__ == "__main__":
    main()
