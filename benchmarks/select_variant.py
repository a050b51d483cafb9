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
    python benchmarks/select_variant.py --haystack wikitext-valid --wording varied --out data
        # the same choice on natural-text held-out cases -> data/variant_selection_wikitext-valid.json

``--smoke`` runs a tiny random model with as many layers as the chosen schedule, at 256 tokens (seconds; for the
tests), and records ``"smoke": true``; smoke and full runs alike need ``--out`` or write a new temporary folder.
The experiment is `kascade_lite.selection.choose_variant`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from kascade_lite.files import shipped_dir
from kascade_lite.selection import choose_variant


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="output folder (default: a new temporary folder)")
    p.add_argument("--selection", default=str(shipped_dir() / "schedule_selection.json"),
                   help="schedule_selection.json of benchmarks/select_schedule.py (default: the shipped one)")
    p.add_argument("--schedule-dir", default=None, help="folder of the chosen schedule (default: next to --selection)")
    p.add_argument("--cases", type=int, default=60, help="held-out retrieval cases (the selection seed)")
    p.add_argument("--ppl-windows", type=int, default=6, help="held-out WikiText-2 validation windows")
    p.add_argument("--haystack", choices=("noise", "wikitext-valid"), default="noise",
                   help="held-out needle cases: RULER filler (default) or WikiText validation paragraphs")
    p.add_argument("--wording", choices=("fixed", "varied"), default="fixed", help="needle wording (tasks.WORDINGS)")
    p.add_argument("--smoke", action="store_true", help="tiny random model, tiny sizes")
    args = p.parse_args(argv)
    if args.smoke:
        args.cases, args.ppl_windows = 2, 1
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="kascade-variant-")
    command = " ".join(["python benchmarks/select_variant.py", *(sys.argv[1:] if argv is None else argv)])
    doc = choose_variant(Path(args.out), command, Path(args.selection), smoke=args.smoke,
                         schedule_dir=Path(args.schedule_dir) if args.schedule_dir else None, cases=args.cases,
                         ppl_windows=args.ppl_windows, haystack=args.haystack, wording=args.wording)
    print(json.dumps({"out": args.out, "recommended": doc.get("recommended"), "paired": doc.get("paired")}))


if __name__ == "__main__":
    main()
