"""Choose the shipped Kascade schedule by held-out accuracy, not by the DP score.

The experiment behind chapter 06's "which schedule?" section:

1. **Calibrate with the inference settings** (query tiles of 32, 10 % of keys with the 128-key floor, the tile's own
   keys counted in the budget) at the evaluation length (2048 tokens), on text that looks like the task: WikiText-2
   *validation* windows plus retrieval prompts generated with the calibration seed.
2. **Candidate schedules** from that calibration: DP with the plain similarity objective and with the paper's
   importance-weighted objective, K = 2..8 anchors (layer 0 counted), and the greedy distance-and-threshold
   rule; plus the schedule shipped before this experiment (DP K=5 with importance, calibrated at 512 tokens, no floor).
3. **Held-out accuracy** of every candidate, on needle-retrieval cases from a *selection* seed (never used for the
   published tables, which use seed 0) and on WikiText-2 validation windows taken from the end of the split
   (disjoint from the calibration windows). Kascade is paper-faithful (Top-k over key positions, decode Top-k per
   token). Stage 1 ranks every candidate cheaply: perplexity with Kascade in the whole forward, and retrieval with
   Kascade in decode after one shared dense prefill. Stage 2 runs the ``--finalists`` best of stage 1 with Kascade
   in prefill *and* decode, the setting the published tables report.
4. **Pick** the finalist with the most held-out needles found in stage 2; ties go to the lower held-out perplexity,
   then to fewer anchors.

The JSON is rewritten after every measurement (atomically, with provenance), so a stopped run keeps what it
measured. Full size on a 2-core CPU (about an hour)::

    python benchmarks/select_schedule.py --out /tmp/selection          # then copy into data/ when satisfied
    python benchmarks/select_schedule.py --out data                    # writes data/schedule_selection.json,
                                                                       # data/calibration/smollm2-135m-2k.*,
                                                                       # data/schedules/smollm2-135m_*.json
``--smoke`` runs a tiny random model (seconds; for the tests) and records ``"smoke": true`` in every file's
provenance; smoke and full runs alike need ``--out`` or write into a new temporary folder. The experiment is
`kascade_lite.selection.choose_schedule`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from kascade_lite.files import shipped_dir
from kascade_lite.selection import MODEL, choose_schedule


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="output folder (default: a new temporary folder)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--cal-wiki", type=int, default=16, help="WikiText-2 validation windows in the calibration set")
    p.add_argument("--cal-prompts", type=int, default=16, help="retrieval prompts in the calibration set")
    p.add_argument("--cases", type=int, default=30, help="held-out retrieval cases (selection seed)")
    p.add_argument("--ppl-windows", type=int, default=6, help="held-out WikiText-2 validation windows")
    p.add_argument("--previous", default=str(shipped_dir() / "schedules" / f"{MODEL}_previous_dpimp_k5_512.json"),
                   help="the schedule shipped before, compared on the same held-out data ('' to skip)")
    p.add_argument("--finalists", type=int, default=4, help="stage-1 best candidates run in stage 2")
    p.add_argument("--smoke", action="store_true", help="tiny random model, tiny sizes")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.seq_len, args.cal_wiki, args.cal_prompts, args.cases, args.ppl_windows = 256, 2, 2, 2, 1
        args.finalists = 2
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="kascade-select-")
    command = " ".join(["python benchmarks/select_schedule.py", *(sys.argv[1:] if argv is None else argv)])
    doc = choose_schedule(Path(args.out), command, smoke=args.smoke, seq_len=args.seq_len, cal_wiki=args.cal_wiki,
                          cal_prompts=args.cal_prompts, cases=args.cases, ppl_windows=args.ppl_windows,
                          previous=Path(args.previous) if args.previous else None, finalists=args.finalists,
                          quiet=args.quiet)
    print(json.dumps({"out": args.out, "dense": doc["dense"], "chosen": doc.get("chosen")}))


if __name__ == "__main__":
    main()
