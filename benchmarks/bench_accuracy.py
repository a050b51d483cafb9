"""Accuracy of Kascade and the baselines on SmolLM2-135M, in one harness.

* ``ppl``: WikiText-2 (raw, test) perplexity at 512 tokens (query/key tiles of 16; 10 % of 512 is below the
  128-key floor, so both "10 % with the floor" — 8 of 32 tiles — and "10 % without it" are measured) and at 2048
  tokens (tiles of 32), budgets 10/20/30/50 %.
* ``retrieval``: the synthetic needle-in-a-haystack task of `kascade_lite.tasks` at 2k/4k/8k tokens.

Every configuration is written to the JSON as soon as it finishes (atomically, with provenance), so a run stopped by
``--time-budget`` keeps what it measured and lists what it skipped. Full size (hours on a 2-core CPU)::

    python benchmarks/bench_accuracy.py ppl --windows-512 24 --windows-2048 6 --time-budget 0
    python benchmarks/bench_accuracy.py ppl --resume ...   # continue a run that its time budget cut
    python benchmarks/bench_accuracy.py retrieval --cases 2048:100,4096:100,8192:100 --time-budget 0 \
        --methods dense,kascade,kascade_decode,kascade_sw,tidal,oracle_decode,quest --every kascade_sw:2
        # many hours on 2 CPU cores, most of it in the 8k prefills; every case's seconds are in the JSON
    python benchmarks/bench_accuracy.py retrieval --resume ...   # same settings; more cases, fewer methods allowed

``--smoke`` runs a tiny random model with the SmolLM2 tokenizer (seconds; for tests and CI).
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

from kascade_lite.baselines import (BASELINES, QuestAttention, SinkWindowAttention, TidalDecode, TiledSinkWindow,
                                    all_heads_pooled, flash_dense_attention, kascade_no_remap, omnikv, oracle_topk)
from kascade_lite.data import load_tokenizer, token_windows, wikitext_windows
from kascade_lite.eval import nll_per_window
from kascade_lite.files import provenance, shipped_dir, write_json_atomic
from kascade_lite.kascade import KascadeAttention, tiles_kept
from kascade_lite.model import Llama, dense_attention
from kascade_lite.models import smollm2_or_tiny
from kascade_lite.schedule import Schedule, default_schedule
from kascade_lite.tasks import RetrievalMethod, answer_case, make_cases

MODEL = "smollm2-135m"
PPL_FRONTIER = (0.2, 0.3, 0.5)  # Kascade budgets beyond 10 %: the perplexity frontier

Config = dict[str, Any]


# ------------------------------------------------------------------------------------------------ model + schedules
def kascade_schedules(model: Llama, schedule_dir: Path | None = None) -> dict[str, Schedule]:
    """Calibrated schedules from ``schedule_dir`` (default: the shipped ones; DP for each K, greedy) when present;
    otherwise (or for a model they do not fit) an evenly spaced 5-anchor schedule with the identity head map."""
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
    ``chosen``, benchmarks/select_schedule.py) when it is among ``schedules``; else DP with 5 anchors, else the
    first."""
    chosen = None
    if (path := shipped_dir() / "schedule_selection.json").is_file():
        chosen = json.loads(path.read_text()).get("chosen")
    for name in (chosen, "dp_k5", "dp_k4", "dp_k6"):
        if name in schedules:
            return name
    return next(iter(schedules))


def policy(method: str, sched: Schedule, *, num_layers: int, kv_heads: int, budget: float, min_keys: int,
           tile: int, granularity: str = "position") -> Any:
    """The attention function of ``method`` (a `baselines.BASELINES` name) at one budget setting."""
    opts = dict(tile_size=tile, budget=budget, min_keys=min_keys, granularity=granularity)
    return {
        "dense": lambda: dense_attention,
        "kascade": lambda: KascadeAttention(sched, **opts),
        "kascade_sw": lambda: KascadeAttention.kascade_sw(sched, **opts),
        "kascade_no_remap": lambda: kascade_no_remap(sched, **opts),
        "all_heads_pooled": lambda: all_heads_pooled(sched, **opts),
        "omnikv": lambda: omnikv(sched, **opts),
        "oracle": lambda: oracle_topk(num_layers, kv_heads, budget=budget, min_keys=min_keys),
        "sink_window": lambda: SinkWindowAttention(budget=budget, min_keys=min_keys),
        "quest": lambda: QuestAttention(budget=budget, min_keys=min_keys),
        "tidal": lambda: TidalDecode(num_layers, kv_heads, budget=budget, min_keys=min_keys),  # dense in prefill
    }[method]()


# ------------------------------------------------------------------------------------------------ runner
class Recorder:
    """Collects result rows and rewrites the JSON after each one; stops starting new work after ``time_budget``."""

    def __init__(self, out: Path, command: str, settings: dict[str, Any], time_budget: float, resume: bool = False,
                 free: tuple[str, ...] = (), *, smoke: bool):
        self.out, self.start, self.time_budget = out, time.monotonic(), time_budget
        self.doc: dict[str, Any] = {"provenance": provenance(command, smoke=smoke), "settings": settings, "results": [],
                                    "skipped": []}
        if resume and out.is_file():  # keep what an earlier run measured; record this run as a continuation
            old = json.loads(out.read_text())
            new = json.loads(json.dumps(settings))
            fixed = lambda d: {k: v for k, v in d.items() if k not in free}  # noqa: E731
            if fixed(old.get("settings", {})) != fixed(new):
                raise ValueError(f"{out}: --resume needs the same settings as the run that wrote it")
            for key in free:  # e.g. more cases or methods: merge the mappings
                old["settings"][key] = {**old["settings"][key], **new[key]}
            old["resumed_by"] = old.get("resumed_by", []) + [self.doc["provenance"]]
            old["skipped"] = []
            self.doc = old

    def done(self, cfg: dict[str, Any]) -> dict[str, Any] | None:
        """The earlier result row of exactly this configuration, if any."""
        return next((r for r in self.doc["results"] if all(r.get(k) == v for k, v in cfg.items())), None)

    def note(self, text: str | None) -> None:
        """Record a remark about the run (e.g. a configuration the machine could not hold in memory)."""
        if text:
            self.doc.setdefault("notes", []).append(text)
            write_json_atomic(self.out, self.doc)

    def out_of_time(self) -> bool:
        return self.time_budget > 0 and time.monotonic() - self.start > self.time_budget

    def add(self, row: dict[str, Any], key: str = "results") -> None:
        self.doc[key].append(row)
        self.save()
        print({k: v for k, v in row.items() if k != "cases"}, flush=True)

    def save(self) -> None:
        """Rewrite the JSON (atomically) with the elapsed time of this run."""
        self.doc["elapsed_s"] = round(time.monotonic() - self.start, 1)
        write_json_atomic(self.out, self.doc)


def ppl_configs(schedules: dict[str, Schedule], main: str, lengths: list[int]) -> list[Config]:
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


def run_ppl(args: argparse.Namespace, command: str) -> None:
    model = smollm2_or_tiny(args.smoke)
    schedules = kascade_schedules(model, args.schedule_dir)
    main = main_schedule(schedules)
    lengths = {128: args.windows_512} if args.smoke else {512: args.windows_512, 2048: args.windows_2048}
    windows = {}
    for seq_len, n in lengths.items():
        windows[seq_len] = (token_windows(np.random.default_rng(0).integers(0, model.cfg.vocab_size, seq_len * n),
                                          seq_len, n) if args.smoke else wikitext_windows("test", seq_len, n))
    settings = dict(model=MODEL if not args.smoke else "tiny-random (smoke)", dataset="wikitext-2-raw-v1 test",
                    windows={str(k): int(v) for k, v in lengths.items()}, batch_size=args.batch_size,
                    main_schedule=main, schedules={k: v.to_dict() for k, v in schedules.items()},
                    methods=BASELINES)
    rec = Recorder(Path(args.out), command, settings, args.time_budget, resume=args.resume, smoke=args.smoke)
    rec.note(args.note)
    configs = ppl_configs(schedules, main, list(lengths))
    if args.smoke:
        configs = [c for c in configs if c["method"] in ("dense", "kascade", "quest")][:4]
    dense_ppl: dict[int, float] = {}
    for cfg in configs:
        if (earlier := rec.done(cfg)) is not None:
            if cfg["method"] == "dense":
                dense_ppl[cfg["seq_len"]] = earlier["ppl"]
            continue
        if rec.out_of_time():
            rec.add(cfg, "skipped")
            continue
        attn = policy(cfg["method"], schedules[cfg["schedule"] or main], num_layers=model.cfg.num_layers,
                      kv_heads=model.cfg.num_kv_heads, budget=cfg["budget"], min_keys=cfg["min_keys"],
                      tile=cfg["tile_size"], granularity=cfg["granularity"])
        t0 = time.monotonic()
        nll = nll_per_window(model, windows[cfg["seq_len"]], attention=attn, batch_size=args.batch_size,
                             progress=False)
        ppl = float(np.exp(nll.mean()))
        if cfg["method"] == "dense":
            dense_ppl[cfg["seq_len"]] = ppl
        ref = dense_ppl.get(cfg["seq_len"])
        rec.add(dict(cfg, ppl=ppl, nll_per_window=[round(float(x), 5) for x in nll],
                     delta_vs_dense_pct=None if ref is None else round(100 * (ppl / ref - 1), 3),
                     seconds=round(time.monotonic() - t0, 1)))


RETRIEVAL_METHODS: dict[str, str] = {
    "dense": "exact attention in prefill and decode (kernels.flash_attention)",
    "kascade": "Kascade in prefill and decode (kascade.KascadeAttention, the paper's setting): Top-k key positions "
               "pooled over the GQA group and query tiles of 32, decode Top-k per token, 10 % of the keys with the "
               "128-key floor, the query's own tile included",
    "kascade_decode": "dense prefill, Kascade (key positions) in every decode step",
    "kascade_tiles": "as kascade with whole key tiles of 32 (the block-sparse speed variant)",
    "kascade_tiles_decode": "dense prefill, Kascade with key tiles of 32 in every decode step",
    "kascade_sw": "our variant: kascade with the first 4 and the 32 latest positions always in the Top-k (same budget)",
    "kascade_sw_decode": "dense prefill, kascade_sw in every decode step",
    "oracle_decode": "dense prefill; in every decode step each query head of every layer but 0 keeps its own exact "
                     "Top-k key positions (the Top-k ceiling at this budget)",
    "quest": "dense prefill, Quest in every decode step (the setting of Quest's paper; pages of 16, layers 0-1 "
             "dense, per query head the page holding the query plus the Top pages by the min/max bound, "
             "ceil(keys kept / 16) pages in all at 10 % of the keys with the 128-key floor)",
    "sink_window": "StreamingLLM at tile granularity (baselines.TiledSinkWindow): the first tile (sinks) plus the "
                   "most recent tiles, as many tiles as Kascade keeps; layer 0 dense",
    "tidal": "dense prefill; TidalDecode in decode: layers 0-1 dense, token-selection layers 2 and num_layers // 2 "
             "pick Top-k positions per query head that all other layers reuse",
    "kascade_no_remap": "kascade with the identity head map",
    # decode-only ablations: which part of Kascade loses the needle?
    "pooled_decode": "dense prefill; in decode every layer but 0 keeps its own Top-k key positions, pooled over the "
                     "GQA group (oracle + group pooling, no reuse)",
    "pooled_tiles_decode": "as pooled_decode with key tiles of 32: oracle + pooling + tiles, no reuse",
}
"""Retrieval methods; ``name@B`` (e.g. ``kascade_decode@0.3``) runs ``name`` at the key budget ``B`` instead of
10 %."""


def retrieval_method(name: str, sched: Schedule, length: int, tile: int = 32, min_keys: int = 128
                     ) -> RetrievalMethod:
    """The `tasks.RetrievalMethod` called ``name`` (``base`` or ``base@budget``) for prompts of ``length`` tokens."""
    base, _, budget_text = name.partition("@")
    try:
        budget = float(budget_text) if budget_text else 0.1
    except ValueError as e:
        raise ValueError(f"retrieval method {name!r}: the budget after '@' must be a fraction like 0.3") from e
    if base not in RETRIEVAL_METHODS or not 0 < budget <= 1:
        raise ValueError(f"unknown retrieval method {name!r}; choose from {sorted(RETRIEVAL_METHODS)}, optionally "
                         f"with @budget in (0, 1]")
    flash = flash_dense_attention
    opts = dict(tile_size=tile, budget=budget, min_keys=min_keys)
    if base == "dense":
        return RetrievalMethod(flash, flash)
    if base.startswith("kascade"):
        variant = base.removesuffix("_decode")
        make = KascadeAttention.kascade_sw if variant == "kascade_sw" else KascadeAttention
        policy = make(sched, granularity="tile" if variant == "kascade_tiles" else "position",
                      remap=variant != "kascade_no_remap", **opts)
        return RetrievalMethod(flash if base.endswith("_decode") else policy, policy)
    if base in ("pooled_decode", "pooled_tiles_decode"):
        every_layer = Schedule.from_anchors(sched.model, sched.num_layers, sched.num_kv_heads,
                                            list(range(1, sched.num_layers)), tile_size=tile, budget=budget,
                                            min_keys=min_keys, method="every layer an anchor")
        granularity = "tile" if base == "pooled_tiles_decode" else "position"
        return RetrievalMethod(flash, KascadeAttention(every_layer, granularity=granularity))
    if base == "oracle_decode":
        return RetrievalMethod(flash, oracle_topk(sched.num_layers, sched.num_kv_heads, budget=budget,
                                                  min_keys=min_keys))
    if base == "quest":
        return RetrievalMethod(flash, QuestAttention(budget=budget, min_keys=min_keys))
    if base == "tidal":
        return RetrievalMethod(flash, TidalDecode(sched.num_layers, sched.num_kv_heads, budget=budget,
                                                  min_keys=min_keys))
    sink = TiledSinkWindow(keep=tiles_kept(length, tile, budget, min_keys), tile=tile)
    return RetrievalMethod(sink, sink)


def method_schedule(name: str, schedules: dict[str, Schedule], main: str) -> tuple[str, Schedule]:
    """``method+schedule@budget`` (e.g. ``kascade_decode+dp_k8@0.3``) -> (``method@budget``, that schedule); without
    ``+schedule`` the main schedule. For the anchors x budget frontier."""
    head, at, budget = name.partition("@")
    method, _, sched = head.partition("+")
    if sched and sched not in schedules:
        raise ValueError(f"retrieval method {name!r}: no schedule {sched!r}; have {sorted(schedules)}")
    return method + at + budget, schedules[sched or main]


def describe_method(name: str) -> str:
    head, _, budget = name.partition("@")
    base, _, sched = head.partition("+")
    return (RETRIEVAL_METHODS[base] + (f"; schedule {sched} instead of the main one" if sched else "")
            + (f"; key budget {100 * float(budget):g} % instead of 10 %" if budget else ""))


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


def run_retrieval_bench(args: argparse.Namespace, command: str) -> None:
    """Case by case, round-robin over the lengths (a time budget leaves every length with about as many cases);
    every method answers the same cases; the JSON is rewritten after each case."""
    model = smollm2_or_tiny(args.smoke)
    schedules = kascade_schedules(model, args.schedule_dir)
    main = main_schedule(schedules)
    cases = {256: 2} if args.smoke else parse_cases(args.cases)
    names = args.methods.split(",")
    for name in names:  # fail before loading anything
        retrieval_method(*method_schedule(name, schedules, main), min(cases))
    every = parse_every(args.every, names)
    tok = load_tokenizer()
    settings = dict(model=MODEL if not args.smoke else "tiny-random (smoke)", task="single needle, RULER noise "
                    "haystack, 7-digit value, exact match of the greedy continuation", cases=cases,
                    budget=0.1, min_keys=128, tile_size=32, main_schedule=main, schedule=schedules[main].to_dict(),
                    methods={m: describe_method(m) for m in names}, every=every,
                    seed=args.seed)
    rec = Recorder(Path(args.out), command, settings, args.time_budget, resume=args.resume,
                   free=("cases", "methods", "every"), smoke=args.smoke)
    rec.note(args.note)
    methods = {n: {m: retrieval_method(*method_schedule(m, schedules, main), n) for m in names} for n in cases}
    rows = {(r["length"], r["method"]): r for r in rec.doc["results"]}
    for length in cases:
        for name in names:
            if (length, name) not in rows:
                rows[length, name] = dict(length=length, method=name, n_cases=0, n_correct=0, accuracy=None,
                                          seconds=0.0, cases=[])
                rec.doc["results"].append(rows[length, name])
    generated = {n: make_cases(n, count, seed=args.seed, tokenizer=tok) for n, count in cases.items()}
    for i in range(max(cases.values())):
        for length, batch in generated.items():
            todo = {n: m for n, m in methods[length].items()
                    if i % every.get(n, 1) == 0 and all(c["index"] != i for c in rows[length, n]["cases"])}
            if i >= len(batch) or not todo:
                continue
            if rec.out_of_time():
                break
            case = batch[i]
            for name, res in answer_case(model, case, todo, tokenizer=tok).items():
                row = rows[length, name]
                row["cases"].append(dict(index=i, depth=round(case.depth, 4), answer=case.answer, **res))
                row["n_cases"] = len(row["cases"])
                row["n_correct"] = sum(c["correct"] for c in row["cases"])
                row["accuracy"] = row["n_correct"] / row["n_cases"]
                row["seconds"] = round(row["seconds"] + res["seconds"], 1)
            rec.save()
            print(f"case {i} at {length}: " + ", ".join(f"{n} {rows[length, n]['n_correct']}/"
                                                        f"{rows[length, n]['n_cases']}" for n in names), flush=True)
    wanted = {(n, m): len(range(0, count, every.get(m, 1))) for n, count in cases.items() for m in names}
    rec.doc["skipped"] = [dict(length=n, method=m, n_cases=want - len(rows[n, m]["cases"]))
                          for (n, m), want in wanted.items() if len(rows[n, m]["cases"]) < want]
    rec.save()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("task", choices=["ppl", "retrieval"])
    p.add_argument("--smoke", action="store_true", help="tiny random model, tiny sizes (seconds)")
    p.add_argument("--out", help="JSON path (required at full size, e.g. data/accuracy_<task>.json; with --smoke "
                                 "default: in a new temporary folder)")
    p.add_argument("--schedule-dir", type=Path, help="folder of <model>_*.json schedules (default: the shipped ones)")
    p.add_argument("--windows-512", type=int, default=8)
    p.add_argument("--windows-2048", type=int, default=2)
    p.add_argument("--cases", default="2048:100,4096:100,8192:100", help="length:count pairs")
    p.add_argument("--methods", default="dense,kascade,kascade_decode,quest,sink_window",
                   help="retrieval methods, from: " + ", ".join(RETRIEVAL_METHODS))
    p.add_argument("--every", default="", help="retrieval: method:k pairs, run that method on every k-th case only")
    p.add_argument("--batch-size", type=int, default=2, help="ppl: windows per forward pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=float, default=1200, help="seconds; 0 = no limit")
    p.add_argument("--resume", action="store_true", help="keep the results already in --out, run the rest")
    p.add_argument("--note", help="a remark to store in the JSON's notes")
    args = p.parse_args(argv)
    if args.out is None and not args.smoke:
        p.error(f"--out is required at full size (e.g. --out data/accuracy_{args.task}.json)")
    if args.out is None:
        args.out = str(Path(tempfile.mkdtemp(prefix="kascade-lite-smoke-")) / f"accuracy_{args.task}.json")
        print(f"smoke run: writing {args.out}")
    if args.smoke:
        args.windows_512 = min(args.windows_512, 2)
    command = "python benchmarks/bench_accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (run_ppl if args.task == "ppl" else run_retrieval_bench)(args, command)


if __name__ == "__main__":
    main()
