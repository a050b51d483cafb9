"""Where should the anchors go? Evenly spaced anchors against Kascade's DP (both objectives) at each anchor count.

On held-out data only (the selection seed's needle cases, the last WikiText-2 validation windows): perplexity with
Kascade in the whole forward at K = 2..8 anchors (layer 0 counted) for the evenly spaced control and the DP with the
similarity and the importance-weighted objectives, and needles found with Kascade in prefill and decode at K = 4, 6,
8 on the RULER filler and on WikiText-2 validation paragraphs (varied wording), beside the shipped schedule with key
tiles (the granularity choice on both haystacks). Every run is paired with dense on the same cases. Full size on a
2-core CPU: about an hour::

    python benchmarks/bench_spacing.py --out data    # schedule_spacing.json + spacing_heldout_*.json

It needs the ``<model>_even_k<K>.json`` schedules beside the DP ones (`kascade-lite schedule` writes them). Each run
is resumable (rerun the same command to continue). ``--smoke``: a tiny random model calibrated on two random
sequences (seconds, for the tests), recorded as smoke. The experiment is `kascade_lite.selection.compare_spacing`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from kascade_lite.selection import compare_spacing


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="output folder (default: a new temporary folder)")
    p.add_argument("--cases", type=int, default=16, help="held-out 2k needle cases per haystack")
    p.add_argument("--ppl-windows", type=int, default=4, help="held-out WikiText-2 validation windows of 2048")
    p.add_argument("--schedule-dir", default=None, help="folder of <model>_*.json schedules (default: shipped)")
    p.add_argument("--smoke", action="store_true", help="tiny random model, tiny sizes")
    args = p.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="kascade-spacing-"))
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python benchmarks/bench_spacing.py", *(sys.argv[1:] if argv is None else argv)])
    doc = compare_spacing(out, command, smoke=args.smoke, cases=args.cases, ppl_windows=args.ppl_windows,
                          schedule_dir=Path(args.schedule_dir) if args.schedule_dir else None)
    print(json.dumps({"out": str(out), "rows": len(doc["rows"])}))


if __name__ == "__main__":
    main()
