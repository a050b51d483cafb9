"""Accuracy of Kascade and the baselines on SmolLM2-135M, in one harness.

* ``ppl``: WikiText-2 (raw, test) perplexity at 512 tokens (query/key tiles of 16; 10 % of 512 is below the
  128-key floor, so both "10 % with the floor" — 8 of 32 tiles — and "10 % without it" are measured) and at 2048
  tokens (tiles of 32), budgets 10/20/30/50 %.
* ``ppl-methods``: the perplexity of ``--methods`` at 2048 tokens on the first ``--windows-2048`` test windows, each
  as it runs in generation: a decode-only method with query tiles of one token (every position selects as a decode
  step does), the others with their tiles of 32 (`kascade_lite.accuracy.run_method_perplexity`).
* ``retrieval``: the synthetic needle-in-a-haystack task of `kascade_lite.tasks` at 2k/4k/8k tokens.

Every configuration is written to the JSON as soon as it finishes (atomically, with provenance), so a run stopped by
``--time-budget`` keeps what it measured and lists what it skipped. Full size (hours on a 2-core CPU)::

    python benchmarks/bench_accuracy.py ppl --windows-512 24 --windows-2048 6 --time-budget 0
    python benchmarks/bench_accuracy.py ppl --resume ...   # continue a run that its time budget cut
    python benchmarks/bench_accuracy.py retrieval --cases 2048:100,4096:100,8192:100 --time-budget 0 \
        --methods dense,kascade,kascade_decode,kascade_sw,tidal,oracle_decode,quest --every kascade_sw:2
        # many hours on 2 CPU cores, most of it in the 8k prefills; every case's seconds are in the JSON
    python benchmarks/bench_accuracy.py retrieval --resume ...   # same settings; more cases, fewer methods allowed
    python benchmarks/bench_accuracy.py retrieval --resume --redo quest --methods quest --note "why" ...
        # a method fixed since: its rows are dropped and measured again on the same cases
    python benchmarks/bench_accuracy.py retrieval --haystack wikitext-test --wording varied \
        --cases 2048:24,4096:6 --methods dense,kascade,kascade_decode,kascade_sw,oracle_decode,quest,tidal \
        --out data/accuracy_retrieval_natural.json   # natural-text needles
    python benchmarks/bench_accuracy.py ppl-methods --windows-2048 2 --out data/accuracy_ppl_decode.json \
        --methods dense,kascade_decode@0.1,kascade_mass95_decode@0.3   # the decode rule's perplexity

``--smoke`` runs a tiny random model with the SmolLM2 tokenizer (seconds; for tests and CI). The harness is
`kascade_lite.accuracy`; the methods and their names are `kascade_lite.methods`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from kascade_lite.accuracy import parse_cases, parse_every, run_method_perplexity, run_perplexity, run_retrieval
from kascade_lite.methods import METHODS
from kascade_lite.tasks import HAYSTACKS


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("task", choices=["ppl", "ppl-methods", "retrieval"],
                   help="ppl: the perplexity table; ppl-methods: --methods at 2048 tokens on --windows-2048 test "
                        "windows, decode-only methods as decode steps; retrieval: the needle task")
    p.add_argument("--smoke", action="store_true", help="tiny random model, tiny sizes (seconds)")
    p.add_argument("--out", help="JSON path (required at full size, e.g. data/accuracy_<task>.json; with --smoke "
                                 "default: in a new temporary folder)")
    p.add_argument("--schedule-dir", type=Path, help="folder of <model>_*.json schedules (default: the shipped ones)")
    p.add_argument("--windows-512", type=int, default=8)
    p.add_argument("--windows-2048", type=int, default=2)
    p.add_argument("--cases", default="2048:100,4096:100,8192:100", help="length:count pairs")
    p.add_argument("--methods", default="dense,kascade,kascade_decode,quest,sink_window",
                   help="retrieval methods (method[+schedule][@budget]), from: " + ", ".join(METHODS))
    p.add_argument("--every", default="", help="retrieval: method:k pairs, run that method on every k-th case only")
    p.add_argument("--haystack", choices=HAYSTACKS, default="noise", help="retrieval: RULER filler or WikiText "
                   "paragraphs (wikitext-test for published tables, wikitext-valid for held-out choices)")
    p.add_argument("--wording", choices=("fixed", "varied"), default="fixed",
                   help="retrieval: one needle template, or one of tasks.WORDINGS drawn per case")
    p.add_argument("--redo", default="", type=lambda t: tuple(m for m in t.split(",") if m),
                   help="with --resume: methods whose earlier rows are dropped and measured again (say why in --note)")
    p.add_argument("--batch-size", type=int, default=2, help="ppl: windows per forward pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=float, default=1200, help="seconds; 0 = no limit")
    p.add_argument("--resume", action="store_true", help="keep the results already in --out, run the rest")
    p.add_argument("--note", help="a remark to store in the JSON's notes")
    args = p.parse_args(argv)
    if args.redo and not args.resume:
        p.error("--redo needs --resume (it replaces rows of an earlier run)")
    if args.out is None and not args.smoke:
        p.error(f"--out is required at full size (e.g. --out data/accuracy_{args.task}.json)")
    if args.out is None:
        args.out = str(Path(tempfile.mkdtemp(prefix="kascade-lite-smoke-")) / f"accuracy_{args.task}.json")
        print(f"smoke run: writing {args.out}")
    command = "python benchmarks/bench_accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    common = dict(smoke=args.smoke, schedule_dir=args.schedule_dir, time_budget=args.time_budget,
                  resume=args.resume, note=args.note, redo=args.redo)
    if args.task == "ppl":
        run_perplexity(Path(args.out), command, windows_512=args.windows_512, windows_2048=args.windows_2048,
                       batch_size=args.batch_size, **common)
    elif args.task == "ppl-methods":
        run_method_perplexity(Path(args.out), command, args.methods.split(","), smoke=args.smoke, split="test",
                              windows=args.windows_2048, schedule_dir=args.schedule_dir, resume=args.resume)
    else:
        names = args.methods.split(",")
        run_retrieval(Path(args.out), command, names, cases=parse_cases(args.cases),
                      every=parse_every(args.every, names), seed=args.seed, haystack=args.haystack,
                      wording=args.wording, **common)


if __name__ == "__main__":
    main()
