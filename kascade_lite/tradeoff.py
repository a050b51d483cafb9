r"""The trade-off table ``data/tradeoff.json``: what each measured setting reads per decode step and what it costs.

One row per **method × budget × schedule × granularity**, built from the shipped results only (a pure function of
the other files in ``data/``, so it can be rebuilt and compared):

* ``kv_read_share``: K/V read in one decode step over dense's, by `decode_reads` (the rule below) for SmolLM2-135M
  at `REFERENCE_CONTEXT` tokens, with the method's own schedule; ``kv_read_share_by_context`` at `CONTEXTS`. An
  adaptive method (`methods.Method.adaptive`, our mass-targeted variant) keeps a different number of keys per head
  and step: its share is the one measured in its needle runs (`selection_read_share`, averaged over the decode steps
  and the haystacks) at each length it ran, ``kv_read_measured`` True; without needle runs it has no row
  (``unmeasured``);
* ``retrieval[haystack][length]``: the needle task **paired with dense on the same cases** (`paired_recall`):
  recall of the needles dense found, its Wilson 95 % interval, the exact McNemar p against dense, and the plain
  accuracy. Every ``accuracy_retrieval*.json`` is read; a file's ``settings.haystack`` names its haystack (files
  without one used the repeated filler, ``"noise"``);
* ``ppl_delta_pct["512" | "2048"]``: perplexity change against dense (``accuracy_ppl*.json``; one teacher-forced
  pass, so every position attends sparsely, as in a decode step of the method: a per-query rule such as Quest's
  shares its row with its decode-only needle runs);
* ``decode_speedup[context]``: the measured end-to-end decode speed-up where ``bench_e2e_cpu.json`` timed that
  granularity and budget with that schedule (Kascade's decode step: rows ``kascade`` and ``kascade_decode``).

**The K/V read rule** (`decode_reads`; a decode step at context :math:`T`, the new key included; per KV head, in
key vectors: reading one key is 1, its value another 1; dense reads :math:`2T` per layer). ``k`` is
`kascade.keys_read` (own key plus the Top-k, in whole key tiles with ``granularity="tile"``); ``s`` the key sets per
KV head: 1 when a selection is pooled over the GQA group (or all heads), ``G`` (query heads per KV head) when every
query head keeps its own, counted as gathered (``s (k - 1) + 1`` keys: the sets' Top-k plus the own key once).
Under a schedule with head budgets (`schedule.Schedule.head_budgets`) KV head ``h`` of layer ``l`` has its own ``k``
(at the budget :math:`\min(1, \beta m_{l,h})`) and a layer reads the mean over its KV heads:

=================  ===========================================  =====================================================
layer              reads                                         who
=================  ===========================================  =====================================================
dense              :math:`2T`                                    layer 0; TidalDecode's layers 0-1 and selection
                                                                 layers; Quest's layers 0-1; OmniKV's filter layers
anchor             :math:`T + 2(s(k-1)+1)`: all keys to score,   Kascade anchors (``s = 1``, `cost.attention_cost`);
                   then the selected keys and values             the oracle's layers (``s = G``), pooled's and
                                                                 pooled_decode's (``s = 1``)
reuse              :math:`2(s(k-1)+1)`                           Kascade reuse layers (``s = 1``); TidalDecode's other
                                                                 layers (``s = G``); sink_window (its window)
quest              :math:`2c + 2(G(16\min(P-1, c) + r) + 1)`     Quest's other layers: the min and max of the
                                                                 :math:`c = \lfloor (T-1)/16 \rfloor` pages before the
                                                                 query's, then per query head the Top
                                                                 :math:`P - 1` of them (``baselines.quest_pages``)
                                                                 and the :math:`r = (T-1) \bmod 16` keys of its own page
=================  ===========================================  =====================================================

**Stale results.** `STALE` lists methods whose implementation changed after results were measured: a result file
started before that date (its ``provenance.date``; a resumed run keeps the rows it found) is flagged ``stale`` with
the reason, a fresher file is preferred, and stale rows are left out of `recommend`. A resumed run that measured the
method again (``--redo`` naming it in its ``resumed_by`` command) dates that method's rows. When the reruns land,
the flag goes away by itself.
"""

from __future__ import annotations

import datetime
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .baselines import QuestAttention, TidalDecode, quest_pages
from .config import SMOLLM2_135M, LlamaConfig
from .cost import scaled_anchors, step_weight_bytes
from .files import is_smoke, provenance, record_provenance, write_json_atomic
from .kascade import head_budget_values, keys_read
from .methods import METHODS, tidal_reselect
from .schedule import Schedule
from .tasks import mcnemar_p, paired_outcomes, wilson_interval

MODEL = "smollm2-135m"
REFERENCE_CONTEXT = 2048
"""The context of each row's ``kv_read_share``: where both the perplexity target and the shortest needle task are."""
CONTEXTS = (2048, 4096, 8192)
"""Contexts of ``kv_read_share_by_context``: the needle task's lengths."""
DEFAULT_HAYSTACK = "noise"
"""Haystack of a retrieval file without ``settings.haystack``: the repeated filler sentences."""
MIN_KEYS = 128
"""Key floor of the K/V read shares (the retrieval and 2048-token runs' floor; it binds below 1280 keys at 10 %)."""
PPL_LENGTHS = {512: 0, 2048: 128}
"""Perplexity window lengths and the key floor preferred at each: at 512 tokens the rows without the floor (every
method has one; with it 10 % means 25 %), at 2048 with it (it does not bind there). Another floor is used when a
method has no row with the preferred one, and recorded in ``ppl_min_keys``."""
SPEED_METHODS = ("kascade", "kascade_decode")
"""Rows whose decode step is the one bench_e2e times (Kascade's, with the timed schedule, granularity and budget)."""


@dataclass(frozen=True)
class StaleResults:
    """Results of ``method`` from a file started before ``before`` (ISO 8601, UTC) predate a fix: ``reason``."""

    method: str
    before: str
    reason: str


STALE: tuple[StaleResults, ...] = (
    StaleResults("quest", "2026-12-06T02:57:12+00:00",
                 "measured before Quest always kept the page holding the query (ceil(keys kept / 16) pages in all); "
                 "rerun pending"),
)


@dataclass(frozen=True)
class Target:
    """The accuracy target: ``recall`` of dense-found needles at every length in ``lengths`` (on every haystack
    measured) and perplexity within ``ppl_within_pct`` % of dense at ``ppl_length`` tokens."""

    recall: float = 0.95
    lengths: tuple[int, ...] = (2048, 4096, 8192)
    ppl_length: int = 2048
    ppl_within_pct: float = 2.0


TARGET = Target()


# ------------------------------------------------------------------------------------------------ K/V read rule
def uses_schedule(method: str) -> bool:
    """Whether ``method`` runs a Kascade schedule (anchors and reuse layers)."""
    return method.startswith("kascade") or method in ("all_heads_pooled", "omnikv")


def decode_layer_plan(method: str, num_layers: int, schedule: Schedule | None = None, *, group: int
                      ) -> list[tuple[str, int]]:
    """Per layer, ``(kind, sets)`` of one decode step of ``method``: kind "dense", "anchor", "reuse" or "quest"
    (see the module docstring), ``sets`` the key sets per KV head (1 pooled, ``group`` per query head)."""
    if method == "dense":
        return [("dense", 1)] * num_layers
    if uses_schedule(method):
        if schedule is None:
            raise ValueError(f"method {method!r} runs a schedule; none given")
        if schedule.num_layers != num_layers:
            raise ValueError(f"schedule of {schedule.num_layers} layers for a {num_layers}-layer model")
        dense_anchor = method == "omnikv"  # OmniKV's filter layers attend densely
        return [("dense" if t == "dense" or (t == "anchor" and dense_anchor) else t, 1) for t in schedule.layer_types]
    if method in ("oracle", "oracle_decode", "pooled", "pooled_decode"):
        sets = 1 if method.startswith("pooled") else group
        return [("dense", 1)] + [("anchor", sets)] * (num_layers - 1)
    if method == "tidal":
        full = {0, 1, 2, TidalDecode(num_layers, 1, reselect=tidal_reselect(num_layers)).reselect_layer}
        return [("dense", 1) if i in full else ("reuse", group) for i in range(num_layers)]
    if method == "quest":
        dense = set(QuestAttention().dense_layers)
        return [("dense", 1) if i in dense else ("quest", group) for i in range(num_layers)]
    if method == "sink_window":
        return [("dense", 1)] + [("reuse", 1)] * (num_layers - 1)
    raise ValueError(f"no K/V read rule for method {method!r}")


def layer_reads(kind: str, sets: int, context: int, keys: int, *, group: int, page: int = 16,
                budget: float = 0.1, min_keys: int = MIN_KEYS) -> int:
    """Key vectors (K and V counted apart) one layer of kind ``kind`` reads per KV head in a decode step at
    ``context`` keys with ``keys`` = `kascade.keys_read` per set (module docstring)."""
    gathered = sets * (keys - 1) + 1
    if kind == "dense":
        return 2 * context
    if kind == "anchor":
        return context + 2 * gathered
    if kind == "reuse":
        return 2 * gathered
    if kind == "quest":
        before = (context - 1) // page                                   # pages before the query's page
        top = min(quest_pages(context, page, budget, min_keys) - 1, before)
        return 2 * before + 2 * (group * (page * top + (context - 1) % page) + 1)
    raise ValueError(f"unknown layer kind {kind!r}")


def decode_reads(method: str, context: int, *, budget: float, granularity: str = "position",
                 schedule: Schedule | None = None, cfg: LlamaConfig = SMOLLM2_135M, tile: int = 32,
                 min_keys: int = MIN_KEYS) -> list[int] | list[float]:
    """Key vectors each layer of ``method`` reads per KV head in one decode step at ``context`` keys (the rule of
    the module docstring): ``[num_layers]`` ints. A schedule with head budgets (`schedule.Schedule.head_budgets`)
    gives each KV head of a Kascade layer its own ``k``: the layer's reads are then the mean over its KV heads
    (floats)."""
    group = cfg.num_heads // cfg.num_kv_heads
    page = QuestAttention().page_size
    plan = decode_layer_plan(method, cfg.num_layers, schedule, group=group)

    def reads(kind: str, sets: int, b: float) -> int:
        keys = keys_read(context, phase="decode", granularity=granularity, tile=tile, budget=b, min_keys=min_keys)
        return layer_reads(kind, sets, context, keys, group=group, page=page, budget=b, min_keys=min_keys)

    if not (uses_schedule(method) and schedule.head_budgets is not None):
        return [reads(kind, sets, budget) for kind, sets in plan]
    rows = [schedule.head_budgets[schedule.anchor_of[layer]] if method == "kascade_no_remap" else row
            for layer, row in enumerate(schedule.head_budgets)]         # without the head map, head h reads h
    return [float(np.mean([reads(kind, sets, b) for b in head_budget_values(budget, tuple(row))]))
            for (kind, sets), row in zip(plan, rows)]


def kv_read_share(method: str, context: int, *, budget: float, granularity: str = "position",
                  schedule: Schedule | None = None, cfg: LlamaConfig = SMOLLM2_135M, tile: int = 32,
                  min_keys: int = MIN_KEYS) -> float:
    """K/V read of one decode step of ``method`` over dense's (`decode_reads` summed, over ``2 * context`` per
    layer)."""
    reads = decode_reads(method, context, budget=budget, granularity=granularity, schedule=schedule, cfg=cfg,
                         tile=tile, min_keys=min_keys)
    return sum(reads) / (2 * context * cfg.num_layers)


def selection_read_share(carry: Mapping[int, Any], schedule: Schedule, context: int, *, remap: bool = True) -> float:
    """The K/V read share of one measured decode step of Kascade (the module's rule with the keys each selection
    really kept): ``carry`` is the step's ``{anchor layer: kascade.Selection}`` (one query tile of one token),
    ``context`` the keys in the cache with the new one. An adaptive selection (``mass``) keeps a different number
    of keys per head and step; a fixed budget gives `kv_read_share`'s value."""
    kept = {layer: np.asarray(sel.keep).reshape(*sel.keep.shape[:2], -1).sum(axis=-1) * sel.unit
            for layer, sel in carry.items()}              # [batch, kv_heads]: keys before the query, over its sets
    reads = []
    for layer, kind in enumerate(schedule.layer_types):
        if kind == "dense":
            reads.append(2.0 * context)
            continue
        own = kept[schedule.anchor_of[layer]]
        if kind == "reuse" and remap:
            own = own[:, list(schedule.head_map[layer])]
        reads.append((context if kind == "anchor" else 0) + 2.0 * (float(own.mean()) + 1))
    return sum(reads) / (2 * context * schedule.num_layers)


def step_bytes(cfg: LlamaConfig, context: int, *, batch: int, schedule: Schedule, budget: float,
               bytes_per_value: float = 2, min_keys: int = MIN_KEYS) -> dict[str, float]:
    """Bytes one decode step of ``batch`` sequences at ``context`` tokens reads: ``weights`` (once for the batch,
    `cost.step_weight_bytes`), ``kv_dense`` (every key and value of every sequence) and ``kv_kascade`` (Kascade at
    ``budget`` with ``schedule``'s anchors carried over to ``cfg``'s depth, `cost.scaled_anchors`), and ``saved``:
    the share of the dense step's bytes Kascade does not read."""
    anchors = scaled_anchors(schedule, cfg.num_layers)
    sched = Schedule.from_anchors(schedule.model, cfg.num_layers, cfg.num_kv_heads, anchors,
                                  tile_size=schedule.tile_size, budget=budget, min_keys=min_keys)
    weights = step_weight_bytes(cfg, bytes_per_value)
    kv = float(batch * cfg.num_layers * 2 * context * cfg.num_kv_heads * cfg.head_dim * bytes_per_value)
    share = kv_read_share("kascade", context, budget=budget, schedule=sched, cfg=cfg, tile=schedule.tile_size,
                          min_keys=min_keys)
    return dict(weights=weights, kv_dense=kv, kv_kascade=kv * share, saved=kv * (1 - share) / (weights + kv))


# ------------------------------------------------------------------------------------------------ paired statistics
def paired_recall(cases: Sequence[Mapping[str, Any]], dense: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A method's needle cases against dense's on the same cases (matched by ``index``, same ``answer``): plain
    accuracy; ``recall`` = needles both found / needles dense found, its Wilson 95 % interval ``recall_ci95``;
    ``only_method`` / ``only_dense`` the discordant cases and ``mcnemar_p`` their exact McNemar test."""
    by_index = {c["index"]: c for c in dense}
    missing = sorted(c["index"] for c in cases if c["index"] not in by_index)
    if missing:
        raise ValueError(f"cases {missing[:5]} have no dense result to pair with")
    differ = sorted(c["index"] for c in cases if c["answer"] != by_index[c["index"]]["answer"])
    if differ:
        raise ValueError(f"cases {differ[:5]} are not dense's cases (different answers under the same index)")
    both, only_m, only_d, _ = paired_outcomes(cases, dense)
    n, found = len(cases), both + only_d
    correct = sum(bool(c["correct"]) for c in cases)
    return dict(n_cases=n, n_correct=correct, accuracy=correct / n if n else None, n_dense_correct=found,
                n_both=both, only_method=only_m, only_dense=only_d,
                recall=both / found if found else None,
                recall_ci95=list(wilson_interval(both, found)) if found else None,
                mcnemar_p=mcnemar_p(only_m, only_d))


def same_cases(doc: Mapping[str, Any], length: int, methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """`paired_recall` of each of ``methods`` (result names of one retrieval results document) against dense at
    ``length``, restricted to the cases dense and every one of them answered, so that the methods compare with each
    other as well as with dense."""
    results = {r["method"]: r for r in doc["results"] if r["length"] == length}
    missing = [m for m in ("dense", *methods) if m not in results]
    if missing:
        raise ValueError(f"no results for {missing} at {length} tokens")
    common = set.intersection(*({c["index"] for c in results[m]["cases"]} for m in ("dense", *methods)))
    pick = lambda m: [c for c in results[m]["cases"] if c["index"] in common]  # noqa: E731
    return {m: paired_recall(pick(m), pick("dense")) for m in methods}


# ------------------------------------------------------------------------------------------------ reading the files
@dataclass
class Source:
    """One results file: its name, date (first run), whether it is a smoke run, and its document."""

    name: str
    date: str
    smoke: bool
    doc: dict[str, Any]

    def measured_at(self, method: str) -> str:
        """When the file's results of ``method`` were measured: its first run, or the latest resumed run that
        measured that method again (``--redo`` naming it, which drops the earlier rows)."""
        redone = [run["date"] for run in self.doc.get("resumed_by", [])
                  if method in _redo_methods(run.get("command", ""))]
        return max([self.date, *redone], key=_parse_date)


def _redo_methods(command: str) -> set[str]:
    """The methods a bench_accuracy command line measures again (``--redo a,b``)."""
    return {m for found in re.findall(r"--redo[ =](\S+)", command) for m in found.split(",")}


def _parse_date(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text)


def stale_reason(method: str, date: str) -> str | None:
    """Why results of ``method`` from a file started at ``date`` are stale (`STALE`), or None."""
    for s in STALE:
        if s.method == method and _parse_date(date) < _parse_date(s.before):
            return s.reason
    return None


def _load(path: Path) -> Source:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read results JSON ({e})") from e
    prov = record_provenance(doc)
    if prov is None or "date" not in prov:
        raise ValueError(f"{path}: no provenance date")
    return Source(path.name, prov["date"], is_smoke(doc), doc)


def parse_retrieval_name(name: str, default_budget: float) -> tuple[str, float, str | None, str]:
    """``method[+schedule][@budget]`` of bench_accuracy's needle task -> ``(method, budget, schedule or None,
    granularity)``; ``*_tiles*`` names are the method at key-tile granularity."""
    head, _, budget = name.partition("@")
    base, _, schedule = head.partition("+")
    granularity = "tile" if "_tiles" in base else "position"
    return base.replace("_tiles", ""), float(budget) if budget else default_budget, schedule or None, granularity


RowKey = tuple[str, float, str | None, str]


def row_key(method: str, budget: float, schedule: str | None, granularity: str) -> RowKey:
    """The row a result belongs to; dense is one row (all keys) whatever budget its run recorded."""
    if method == "dense":
        return ("dense", 1.0, None, "position")
    return (method, float(budget), schedule, granularity)


def _schedule_dicts(sources: Sequence[Source]) -> dict[str, dict[str, Any]]:
    """Schedules embedded in the results files, by name (what those runs used)."""
    found: dict[str, dict[str, Any]] = {}
    for src in sources:
        settings = src.doc.get("settings", {})
        found.update(settings.get("schedules") or {})
        if settings.get("schedule") and settings.get("main_schedule"):
            found.setdefault(settings["main_schedule"], settings["schedule"])
    return found


def _resolve_schedule(name: str | None, embedded: Mapping[str, dict[str, Any]], data_dir: Path) -> Schedule | None:
    if name is None:
        return None
    if name in embedded:
        return Schedule.from_dict(embedded[name], source=f"the schedule {name!r} embedded in the results")
    path = data_dir / "schedules" / f"{MODEL}_{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"schedule {name!r}: not embedded in the results and {path} does not exist")
    return Schedule.load(path)


def _retrieval(sources: Sequence[Source]) -> dict[RowKey, dict[str, dict[int, dict[str, Any]]]]:
    """Per row key, haystack and length, the paired statistics of the best source (fresh before stale, then more
    cases, then the later file)."""
    dense_ref: dict[tuple[str, int], dict[str, Any]] = {}  # (haystack, length) -> the largest dense row
    candidates: dict[tuple[RowKey, str, int], list[tuple[Source, dict[str, Any], dict[str, Any] | None]]] = {}
    for src in sources:
        settings = src.doc.get("settings", {})
        haystack = settings.get("haystack", DEFAULT_HAYSTACK)
        main = settings.get("main_schedule")
        dense_here = {r["length"]: r for r in src.doc.get("results", []) if r["method"] == "dense" and r["cases"]}
        for length, r in dense_here.items():
            best = dense_ref.get((haystack, length))
            if best is None or len(r["cases"]) > len(best["cases"]):
                dense_ref[haystack, length] = r
        for r in src.doc.get("results", []):
            if not r.get("cases"):
                continue
            method, budget, schedule, granularity = parse_retrieval_name(r["method"], settings.get("budget", 0.1))
            if schedule is None and uses_schedule(method):
                schedule = main
            key = row_key(method, budget, schedule, granularity)
            candidates.setdefault((key, haystack, r["length"]), []).append((src, r, dense_here.get(r["length"])))
    out: dict[RowKey, dict[str, dict[int, dict[str, Any]]]] = {}
    for (key, haystack, length), options in candidates.items():
        src, row, dense = max(options, key=lambda o: (stale_reason(key[0], o[0].measured_at(key[0])) is None,
                                                      len(o[1]["cases"]), _parse_date(o[0].measured_at(key[0]))))
        dense_cases = dense["cases"] if dense is not None else []
        if not {c["index"] for c in row["cases"]} <= {c["index"] for c in dense_cases}:
            if (haystack, length) not in dense_ref:
                raise ValueError(f"{src.name}: no dense result at {length} tokens on the {haystack} haystack to "
                                 f"pair {row['method']} with")
            dense_cases = dense_ref[haystack, length]["cases"]
        stats = paired_recall(row["cases"], dense_cases)
        stats.update(source=src.name, stale=stale_reason(key[0], src.measured_at(key[0])))
        if "kv_read_share" in row:                                        # an adaptive method's measured read
            stats["kv_read_share"] = row["kv_read_share"]
        out.setdefault(key, {}).setdefault(haystack, {})[length] = stats
    return out


def _ppl(sources: Sequence[Source]) -> dict[RowKey, dict[int, dict[str, Any]]]:
    """Per row key and window length, the perplexity change of the preferred row (`PPL_LENGTHS`' floor, fresh
    before stale, then the later file)."""
    options: dict[tuple[RowKey, int], list[tuple[Source, dict[str, Any]]]] = {}
    for src in sources:
        for r in src.doc.get("results", []):
            if r["seq_len"] in PPL_LENGTHS and r.get("delta_vs_dense_pct") is not None:
                key = row_key(r["method"], r["budget"], r["schedule"], r["granularity"])
                options.setdefault((key, r["seq_len"]), []).append((src, r))
    out: dict[RowKey, dict[int, dict[str, Any]]] = {}
    for (key, n), opts in options.items():
        src, r = max(opts, key=lambda o: (stale_reason(key[0], o[0].measured_at(key[0])) is None,
                                          o[1]["min_keys"] == PPL_LENGTHS[n], _parse_date(o[0].measured_at(key[0]))))
        out.setdefault(key, {})[n] = dict(delta_pct=r["delta_vs_dense_pct"], min_keys=r["min_keys"],
                                          source=src.name, stale=stale_reason(key[0], src.measured_at(key[0])))
    return out


def _speedups(e2e: Source | None, schedules: Mapping[str | None, Schedule | None]
              ) -> dict[RowKey, dict[str, float]]:
    """Measured decode speed-ups of bench_e2e by row key (`SPEED_METHODS` with the timed schedule)."""
    if e2e is None:
        return {}
    timed = tuple(e2e.doc["config"]["schedule"]["layer_types"])
    names = [n for n, s in schedules.items() if s is not None and s.layer_types == timed]
    out: dict[RowKey, dict[str, float]] = {}
    for r in e2e.doc["results"]:
        if r["phase"] != "decode":
            continue
        for label, s in r.get("settings", {}).items():
            if label not in r.get("speedup", {}):
                continue
            for method in SPEED_METHODS:
                for name in names:
                    key = (method, float(s["budget"]), name, s["granularity"])
                    out.setdefault(key, {})[str(r["context"])] = r["speedup"][label]
    return out


# ------------------------------------------------------------------------------------------------ the verdict
def target_check(row: Mapping[str, Any], target: Target = TARGET, haystacks: Sequence[str] | None = None
                 ) -> dict[str, Any]:
    """Whether ``row`` meets ``target``: ``recall[haystack][length]`` and ``ppl`` are True / False / None (not
    measured), ``meets`` is False if any is False, None if any is unmeasured, else True. ``haystacks``: those to
    check (default: the row's)."""
    recall = {}
    for hay in haystacks if haystacks is not None else sorted(row["retrieval"]):
        cells = row["retrieval"].get(hay, {})
        recall[hay] = {str(n): (None if cells.get(str(n), {}).get("recall") is None
                                else cells[str(n)]["recall"] >= target.recall) for n in target.lengths}
    delta = row["ppl_delta_pct"].get(str(target.ppl_length))
    ppl = None if delta is None else abs(delta) <= target.ppl_within_pct
    checks = [ppl, *(v for cells in recall.values() for v in cells.values())] if recall else [ppl, None]
    meets = False if False in checks else None if None in checks else True
    return dict(recall=recall, ppl=ppl, meets=meets)


def recommend(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The row that meets the target at the smallest ``kv_read_share`` among fresh sparse rows, or None."""
    ok = [r for r in rows if r["target"]["meets"] and not r["stale"] and r["method"] != "dense"]
    if not ok:
        return None
    best = min(ok, key=lambda r: r["kv_read_share"])
    return {k: best[k] for k in ("method", "budget", "schedule", "granularity", "kv_read_share")}


# ------------------------------------------------------------------------------------------------ the table
def build_tradeoff(data_dir: str | os.PathLike, *, command: str) -> dict[str, Any]:
    """The trade-off document from the results in ``data_dir`` (``accuracy_retrieval*.json``,
    ``accuracy_ppl*.json``, ``bench_e2e_cpu.json``, ``schedules/``): rows sorted by method, granularity, schedule,
    budget; ``recommended`` (`recommend`); provenance smoke if any input is."""
    data_dir = Path(data_dir)
    retrieval = [_load(p) for p in sorted(data_dir.glob("accuracy_retrieval*.json"))]
    ppl = [_load(p) for p in sorted(data_dir.glob("accuracy_ppl*.json"))]
    if not retrieval and not ppl:
        raise FileNotFoundError(f"no accuracy_retrieval*.json or accuracy_ppl*.json in {data_dir}")
    e2e = _load(data_dir / "bench_e2e_cpu.json") if (data_dir / "bench_e2e_cpu.json").is_file() else None
    sources = [*retrieval, *ppl, *([e2e] if e2e else [])]
    ret, deltas = _retrieval(retrieval), _ppl(ppl)
    embedded = _schedule_dicts([*retrieval, *ppl])
    keys = sorted(set(ret) | set(deltas), key=lambda k: (k[0], k[3], k[2] or "", k[1]))
    schedules = {name: _resolve_schedule(name, embedded, data_dir) for name in {k[2] for k in keys}}
    speed = _speedups(e2e, schedules)
    rows = []
    unmeasured = []
    for key in keys:
        method, budget, schedule, granularity = key
        if METHODS[method].adaptive:                   # measured per decode step, averaged over the haystacks
            by_len: dict[str, list[float]] = {}
            for cells in ret.get(key, {}).values():
                for n, c in cells.items():
                    by_len.setdefault(str(n), []).append(c["kv_read_share"])
            share = {n: float(np.mean(v)) for n, v in sorted(by_len.items(), key=lambda kv: int(kv[0]))}
            if not share:
                unmeasured.append(dict(method=method, budget=budget, schedule=schedule))
                continue
            reference = share.get(str(REFERENCE_CONTEXT), next(iter(share.values())))
        else:
            share = {str(n): kv_read_share(method, n, budget=budget, granularity=granularity,
                                           schedule=schedules[schedule]) for n in CONTEXTS}
            reference = share[str(REFERENCE_CONTEXT)]
        ppl_cells = deltas.get(key, {})
        cells = ([("needle task", c) for hay in ret.get(key, {}).values() for c in hay.values()]
                 + [("perplexity", c) for c in ppl_cells.values()])
        reasons = sorted({f"{part}: {c['stale']}" for part, c in cells if c["stale"]})
        row = dict(method=method, budget=budget, schedule=schedule, granularity=granularity,
                   prefill="dense" if METHODS[method].decode_only else "sparse",
                   kv_read_share=reference, kv_read_share_by_context=share,
                   kv_read_measured=METHODS[method].adaptive,
                   retrieval={hay: {str(n): c for n, c in sorted(by_len.items())}
                              for hay, by_len in sorted(ret.get(key, {}).items())},
                   ppl_delta_pct={str(n): ppl_cells[n]["delta_pct"] if n in ppl_cells else None for n in PPL_LENGTHS},
                   ppl_min_keys={str(n): ppl_cells[n]["min_keys"] for n in sorted(ppl_cells)},
                   ppl_stale={str(n): ppl_cells[n]["stale"] for n in sorted(ppl_cells)},
                   ppl_sources=sorted({c["source"] for c in ppl_cells.values()}),
                   decode_speedup=speed.get(key),
                   stale=bool(reasons), stale_reason="; ".join(reasons) or None)
        rows.append(row)
    haystacks = sorted({h for r in rows for h in r["retrieval"]})
    for row in rows:
        row["target"] = target_check(row, TARGET, haystacks)
    return dict(
        provenance=provenance(command, smoke=any(s.smoke for s in sources)),
        inputs={s.name: s.date for s in sources},
        model=MODEL, reference_context=REFERENCE_CONTEXT, contexts=list(CONTEXTS), min_keys=MIN_KEYS,
        haystacks=haystacks, target=asdict(TARGET), stale=[asdict(s) for s in STALE],
        rows=rows, unmeasured=unmeasured, recommended=recommend(rows))


def write_tradeoff(data_dir: str | os.PathLike, out: str | os.PathLike | None = None, *,
                   command: str) -> dict[str, Any]:
    """`build_tradeoff` from ``data_dir``, written atomically to ``out`` (default ``data_dir/tradeoff.json``)."""
    doc = build_tradeoff(data_dir, command=command)
    write_json_atomic(Path(out) if out is not None else Path(data_dir) / "tradeoff.json", doc)
    return doc


def recommended_plan(selection: Mapping[str, Any] | None, schedule: str, default: float = 0.1
                     ) -> tuple[str, float, str | None]:
    """``(schedule, budget, note)`` for a memory plan: the budget rule chosen on held-out data
    (``variant_selection_adaptive.json``, `selection.choose_adaptive`) when it is Kascade at a fixed budget, ``note``
    None; else ``schedule`` (the chosen one) at ``default`` and why (no held-out choice, a smoke run, none qualified,
    or the choice is not Kascade at a fixed budget: a plan sizes a fixed key count)."""
    if selection is None:
        return schedule, default, "no held-out choice of a budget rule"
    if is_smoke(dict(selection)):
        return schedule, default, "the held-out choice of a budget rule is a smoke run"
    chosen = selection.get("chosen")
    if chosen is None:
        return schedule, default, "no budget rule meets the accuracy target on held-out data"
    method, budget, sched, _ = parse_retrieval_name(chosen, default)
    if method not in ("kascade", "kascade_decode"):
        return schedule, default, f"the held-out choice, {chosen}, is not Kascade at a fixed budget"
    return sched or schedule, budget, None
