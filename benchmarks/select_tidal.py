"""Choose TidalDecode's re-selection layer on held-out needle cases, as its paper does, not on the published cases.

TidalDecode (Yang et al. 2024, arXiv 2410.05076) re-selects its tokens with full attention at one middle layer; its
paper picks that layer on held-out data (the reference code uses layer 13 of 32-layer Llama-3-8B). Here each
candidate layer runs TidalDecode in decode after one dense prefill that all candidates share (10 % of the keys, the
128-key floor), on 2k needle cases of the selection seed in both haystacks: the repeated filler and WikiText-2
*validation* paragraphs with varied wording (the published tables use seed 0 and the test paragraphs).

**Rule:** most needles summed over both haystacks; a tie goes to the paper's default ``num_layers // 2`` if it is
among the best, else to the earliest layer. The chapters' ``tidal`` (`kascade_lite.methods.tidal_reselect`) runs
the chosen layer once ``tidal_selection.json`` is in the results. The JSON is rewritten after every case
(atomically, with provenance). Full size on a 2-core CPU (every second layer, 20 cases per haystack: about 20
minutes)::

    python benchmarks/select_tidal.py --out /tmp/tidal   # then copy into data/ when satisfied
    python benchmarks/select_tidal.py --out data         # writes data/tidal_selection.json
    python benchmarks/select_tidal.py --resume --cases 16 --out /tmp/tidal   # keep what a cut run answered

``--smoke`` runs a tiny random model of 8 layers at 256 tokens (seconds; for the tests) and records
``"smoke": true``; smoke and full runs alike need ``--out`` or write a new temporary folder. The experiment is
`kascade_lite.selection.choose_tidal_layer`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from kascade_lite.selection import choose_tidal_layer


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="output folder (default: a new temporary folder)")
    p.add_argument("--cases", type=int, default=20, help="held-out needle cases per haystack (the selection seed)")
    p.add_argument("--seq-len", type=int, default=2048, help="prompt length in tokens")
    p.add_argument("--layers", default=None,
                   help="comma-separated candidate layers (default: every second layer from 3, plus num_layers // 2)")
    p.add_argument("--resume", action="store_true",
                   help="keep the cases a run with the same settings answered in --out (the case count may change)")
    p.add_argument("--smoke", action="store_true", help="tiny random model, tiny sizes")
    args = p.parse_args(argv)
    if args.smoke:
        args.cases = 1
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="kascade-tidal-")
    layers = [int(n) for n in args.layers.split(",")] if args.layers else None
    command = " ".join(["python benchmarks/select_tidal.py", *(sys.argv[1:] if argv is None else argv)])
    doc = choose_tidal_layer(Path(args.out), command, smoke=args.smoke, seq_len=args.seq_len, cases=args.cases,
                             layers=layers, resume=args.resume)
    print(json.dumps({"out": args.out, "chosen": doc.get("chosen"), "found": doc.get("found")}))


if __name__ == "__main__":
    main()
