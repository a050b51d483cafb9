"""Per-(layer, KV head) budgets from calibration: write ``<model>_<schedule>_hb.json``, a shipped schedule plus head
budgets (diffuse heads more keys, peaked heads fewer, at the fixed budget's K/V read per decode step at 2048).

A dense forward over the schedule choice's calibration set (the first ``--wiki`` WikiText-2 validation windows of
2048 tokens and ``--prompts`` retrieval prompts of the calibration seed; 16 and 16 by default) measures, at every
64th query from position 512, how many keys each layer's KV head needs, in its source set's order, to hold 90 % of
its group-pooled attention; the multipliers follow that need (`kascade_lite.head_budgets`). About 30 s per sequence
on a 2-core CPU::

    python benchmarks/head_budgets.py --out data/schedules     # writes smollm2-135m_greedy_hb.json
    python benchmarks/head_budgets.py --wiki 4 --prompts 4 --out data/schedules   # the shipped file's subset

The registry then reads it as ``kascade_decode+greedy_hb@0.1``. ``--smoke``: a tiny random model, two 256-token
sequences (seconds, for the tests), recorded as smoke.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from kascade_lite.head_budgets import MASS, run_head_budgets


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="output folder of the schedule (default: a new temporary folder)")
    p.add_argument("--schedules", default="greedy", help="comma-separated schedule names to add head budgets to")
    p.add_argument("--schedule-dir", default=None, help="folder of <model>_*.json schedules (default: shipped)")
    p.add_argument("--mass", type=float, default=MASS, help="share of pooled attention a head's keys must hold")
    p.add_argument("--wiki", type=int, default=16, help="WikiText-2 validation windows of the calibration set")
    p.add_argument("--prompts", type=int, default=16, help="retrieval prompts (calibration seed) of the set")
    p.add_argument("--smoke", action="store_true", help="tiny random model, tiny sizes")
    args = p.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="kascade-head-budgets-"))
    command = " ".join(["python benchmarks/head_budgets.py", *(sys.argv[1:] if argv is None else argv)])
    paths = run_head_budgets(out, command, smoke=args.smoke, schedules=tuple(args.schedules.split(",")),
                             schedule_dir=Path(args.schedule_dir) if args.schedule_dir else None, mass=args.mass,
                             num_wiki=args.wiki, num_prompts=args.prompts)
    print(json.dumps({"written": [str(p) for p in paths]}))


if __name__ == "__main__":
    main()
