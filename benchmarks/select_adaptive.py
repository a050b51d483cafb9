"""Choose a key-budget rule for Kascade on held-out data: fixed budgets against our mass-targeted variant.

Candidates (``kascade_lite.pipeline.ADAPTIVE`` or ``--candidates``, names in the registry's
``method+schedule@budget`` form; for ``kascade_mass<p>`` the budget is each row's maximum) answer held-out needle
cases of the selection seed on the RULER filler and on WikiText-2 validation paragraphs (varied wording) at 2k, 4k
and 8k tokens, and their perplexity is measured on the last WikiText-2 validation windows (decode-only methods as
decode steps: query tiles of one token). **Rule** (fixed before measuring): recall of dense's needles >= 95 % at
every haystack and length and perplexity within 2 % of dense at 2048; among those, the smallest K/V read per decode
step (measured from the keys the selections kept for adaptive methods). If none qualifies, none is chosen and the
closest is named. Full size on a 2-core CPU: about an hour::

    python benchmarks/select_adaptive.py --out /tmp/adaptive   # then copy variant_selection_adaptive.json to data/

Each of its runs is resumable (rerun the same command to continue). ``--smoke``: a tiny random model at 256 tokens
(seconds, for the tests), recorded as smoke. The experiment is `kascade_lite.selection.choose_adaptive`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from kascade_lite.accuracy import parse_cases
from kascade_lite.pipeline import ADAPTIVE, ADAPTIVE_CASES
from kascade_lite.selection import choose_adaptive


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="output folder (default: a new temporary folder)")
    p.add_argument("--candidates", default=ADAPTIVE, help="comma-separated method names")
    p.add_argument("--cases", default=ADAPTIVE_CASES,
                   help="held-out cases per length and haystack, length:count pairs")
    p.add_argument("--ppl-windows", type=int, default=2, help="held-out WikiText-2 validation windows of 2048")
    p.add_argument("--schedule-dir", default=None, help="folder of <model>_*.json schedules (default: shipped)")
    p.add_argument("--smoke", action="store_true", help="tiny random model, tiny sizes")
    args = p.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="kascade-adaptive-"))
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python benchmarks/select_adaptive.py", *(sys.argv[1:] if argv is None else argv)])
    doc = choose_adaptive(out, command, smoke=args.smoke, candidates=tuple(args.candidates.split(",")),
                          cases=parse_cases(args.cases), ppl_windows=args.ppl_windows,
                          schedule_dir=Path(args.schedule_dir) if args.schedule_dir else None)
    print(json.dumps({"out": str(out), "chosen": doc["chosen"], "closest": doc["closest"]}))


if __name__ == "__main__":
    main()
