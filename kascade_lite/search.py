"""Anchor search: which layers become anchors, chosen from a calibration (`calibrate.Calibration`), written as a
`schedule.Schedule` (with the calibration's head maps). Two ways:

* `dp_schedule` — Kascade's dynamic programme. With ``W[a, b] = sim(a, b) * importance[b]`` (head-remapped layer
  similarity times layer importance) and anchors ``0 = s_1 < ... < s_K``, it maximises
  ``sum_k sum_{b = s_k}^{s_{k+1} - 1} W[s_k, b]``: every layer scores its similarity with the latest anchor at or
  before it (an anchor scores its own importance). ``K`` **counts layer 0**, as in the reference implementation
  (its schedules are named e.g. ``layers_0_2_8_13_14``: five anchors, layer 0 included).
* `greedy_schedule` — a simple distance-and-threshold rule: walk the layers, reuse the latest anchor while it is at
  most ``max_reuse_dist`` layers back and its similarity is at least ``threshold``, otherwise start a new anchor.

* `even_schedule` — the control: anchors evenly spaced (`schedule.evenly_spaced`), with the calibration's head maps,
  so that against the DP at the same ``K`` only the placement of the anchors differs.

Without a calibration, `schedule.default_schedule` spaces the anchors evenly with the identity head map.
`write_schedules` writes every schedule the book compares (`kascade-lite schedule`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .calibrate import Calibration
from .files import is_smoke, provenance
from .schedule import SMOKE_MIN_KEYS, Schedule, evenly_spaced

MAX_REUSE_DIST = 4
CALIB_THRESHOLD = 0.1
DP_ANCHOR_COUNTS = tuple(range(2, 9))


def segment_scores(weights: np.ndarray) -> np.ndarray:
    """``seg[a, i] = sum_{b=a}^{i-1} weights[a, b]`` for ``0 <= a < i <= L``: the score of anchor ``a`` serving
    layers ``a .. i-1``. weights: ``[L, L]`` (``[anchor, layer]``). Returns ``[L, L + 1]`` (``-inf`` where i <= a)."""
    L = weights.shape[0]
    upper = np.triu(np.asarray(weights, np.float64))
    seg = np.full((L, L + 1), -np.inf)
    cums = np.cumsum(upper, axis=1)                                   # cums[a, b] = sum_{j<=b} upper[a, j]
    for a in range(L):
        seg[a, a + 1:] = cums[a, a:]
    return seg


def anchors_score(weights: np.ndarray, anchors: tuple[int, ...] | list[int]) -> float:
    """Objective of a set of anchors (must start with layer 0): each layer scores ``weights[latest anchor, layer]``."""
    L, anchors = weights.shape[0], sorted(anchors)
    if not anchors or anchors[0] != 0:
        raise ValueError(f"anchors {anchors} must include layer 0")
    bounds = anchors + [L]
    return float(sum(weights[a, b] for a, end in zip(bounds[:-1], bounds[1:]) for b in range(a, end)))


def dp_anchors(weights: np.ndarray, num_anchors: int) -> tuple[tuple[int, ...], float]:
    """Exactly ``num_anchors`` anchors (layer 0 included) maximising `anchors_score`, in ``O(K L^2)``.

    ``best[k, i]``: best score of layers ``0 .. i-1`` covered by ``k`` segments; the last segment starts at an
    anchor ``a < i``: ``best[k, i] = max_a best[k-1, a] + seg[a, i]``, with ``best[0, 0] = 0`` so that the first
    anchor is layer 0. Ties go to the earliest anchor."""
    weights = np.asarray(weights, np.float64)
    if weights.ndim != 2 or weights.shape[0] != weights.shape[1]:
        raise ValueError(f"weights must be a square [layers, layers] matrix, got shape {weights.shape}")
    L = weights.shape[0]
    if not 1 <= num_anchors <= L:
        raise ValueError(f"num_anchors={num_anchors} must be in [1, {L}] (layer 0 counts as an anchor)")
    seg = segment_scores(weights)
    best = np.full((num_anchors + 1, L + 1), -np.inf)
    back = np.zeros((num_anchors + 1, L + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for k in range(1, num_anchors + 1):
        for i in range(1, L + 1):
            cand = best[k - 1, :i] + seg[:i, i]
            back[k, i] = int(np.argmax(cand))
            best[k, i] = cand[back[k, i]]
    anchors, i = [], L
    for k in range(num_anchors, 0, -1):
        i = int(back[k, i])
        anchors.append(i)
    return tuple(sorted(anchors)), float(best[num_anchors, L])


REFRESH_THRESHOLDS = (0.9,)
"""Coverage-triggered refresh: thresholds of the greedy rule at which it fires on SmolLM2's calibration (a reuse
layer whose head-remapped similarity to its anchor falls below the threshold becomes an anchor). The shipped
`CALIB_THRESHOLD` never fires there (the anchors are then evenly spaced by ``max_reuse_dist``)."""


def greedy_anchors(similarity: np.ndarray, max_reuse_dist: int = MAX_REUSE_DIST,
                   threshold: float = CALIB_THRESHOLD) -> tuple[int, ...]:
    """Walk the layers: layer ``b`` reuses the latest anchor ``a`` if ``b - a <= max_reuse_dist`` and
    ``similarity[a, b] >= threshold``, otherwise ``b`` becomes an anchor. similarity: ``[L, L]``."""
    if max_reuse_dist < 1:
        raise ValueError(f"max_reuse_dist={max_reuse_dist} must be >= 1")
    anchors = [0]
    for b in range(1, similarity.shape[0]):
        a = anchors[-1]
        if b - a > max_reuse_dist or similarity[a, b] < threshold:
            anchors.append(b)
    return tuple(anchors)


def _schedule_from_calibration(calib: Calibration, anchors: tuple[int, ...], method: str, model: str | None,
                               tile_size: int | None, budget: float | None, min_keys: int,
                               meta: dict[str, Any]) -> Schedule:
    """Anchors + head maps from the calibration argmax (identity rows for anchors and layer 0)."""
    L, H, settings = calib.num_layers, calib.num_kv_heads, calib.settings
    plan = Schedule.from_anchors(model or settings.get("model", "model"), L, H, anchors)
    head_map = [calib.head_map(a, b) if t == "reuse" else list(range(H))
                for b, (t, a) in enumerate(zip(plan.layer_types, plan.anchor_of))]
    meta = dict(meta, calibration={k: settings[k] for k in sorted(settings)})
    return Schedule.from_anchors(plan.model, L, H, anchors, head_map=head_map, method=method,
                                 tile_size=int(tile_size or settings.get("tile_size", 32)),
                                 budget=float(budget or settings.get("budget", 0.1)), min_keys=min_keys, meta=meta)


OBJECTIVES = ("similarity", "importance")
"""DP objectives: ``"similarity"`` sums the head-remapped similarity of every layer to its anchor; ``"importance"``
weights each layer's term by its importance (the paper's form). Which one a model should use is an experiment."""


def dp_schedule(calib: Calibration, num_anchors: int, *, objective: str = "similarity", model: str | None = None,
                tile_size: int | None = None, budget: float | None = None, min_keys: int = 128) -> Schedule:
    """Kascade's DP schedule with ``num_anchors`` anchors (layer 0 included) from a calibration.

    ``objective`` is one of `OBJECTIVES`. ``tile_size`` and ``budget`` default to the calibration's; ``min_keys`` is
    the inference-time floor."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    weights = calib.layer_similarity()
    if objective == "importance":
        weights = weights * calib.importance[None, :]
    anchors, score = dp_anchors(weights, num_anchors)
    term = "importance[b] * " if objective == "importance" else ""
    meta = dict(num_anchors=num_anchors, objective=objective, score=round(score, 6),
                max_score=round(float(np.diag(weights).sum()), 6),
                objective_formula=f"sum over layers b of {term}head-remapped similarity(anchor(b), b)")
    return _schedule_from_calibration(calib, anchors, "dp", model, tile_size, budget, min_keys, meta)


def greedy_schedule(calib: Calibration, *, max_reuse_dist: int = MAX_REUSE_DIST,
                    threshold: float = CALIB_THRESHOLD, model: str | None = None, tile_size: int | None = None,
                    budget: float | None = None, min_keys: int = 128) -> Schedule:
    """The greedy schedule (`greedy_anchors`) on the head-remapped layer similarity (importance is not used)."""
    anchors = greedy_anchors(calib.layer_similarity(), max_reuse_dist, threshold)
    meta = dict(num_anchors=len(anchors), max_reuse_dist=max_reuse_dist, threshold=threshold)
    return _schedule_from_calibration(calib, anchors, "greedy", model, tile_size, budget, min_keys, meta)


def even_schedule(calib: Calibration, num_anchors: int, *, model: str | None = None, tile_size: int | None = None,
                  budget: float | None = None, min_keys: int = 128) -> Schedule:
    """``num_anchors`` evenly spaced anchors (layer 0 counted, `schedule.evenly_spaced`) with the calibration's
    head maps: the DP's control at the same ``K``."""
    anchors = evenly_spaced(calib.num_layers, num_anchors)
    return _schedule_from_calibration(calib, anchors, "even", model, tile_size, budget, min_keys,
                                      dict(num_anchors=num_anchors))


def schedule_name(sched: Schedule) -> str:
    """The file suffix of a schedule `write_schedules` makes: ``dp_k{K}`` (similarity objective), ``dpimp_k{K}``
    (importance-weighted), ``even_k{K}``, ``greedy`` or ``greedy_t{100 * threshold}``."""
    meta = dict(sched.meta)
    if sched.method == "dp":
        return f"{'dp' if meta.get('objective') == 'similarity' else 'dpimp'}_k{meta['num_anchors']}"
    if sched.method == "even":
        return f"even_k{meta['num_anchors']}"
    return "greedy" if meta["threshold"] == CALIB_THRESHOLD else f"greedy_t{round(100 * meta['threshold'])}"


def write_schedules(calib: Calibration, out_dir: str | os.PathLike, *, command: str, smoke: bool,
                    anchor_counts: tuple[int, ...] = DP_ANCHOR_COUNTS, **kw: Any) -> list[Path]:
    """Write ``<model>_dp_k{K}.json`` (similarity objective) and ``<model>_dpimp_k{K}.json`` (importance-weighted)
    for each K, ``<model>_greedy.json``, for each of `REFRESH_THRESHOLDS` ``<model>_greedy_t{100 t}.json``, and the
    controls ``<model>_even_k{K}.json`` for each K into ``out_dir``; returns the paths. ``smoke`` (recorded in each
    file's provenance): made from a smoke-size calibration."""
    counts = [k for k in anchor_counts if k <= calib.num_layers]
    schedules = [dp_schedule(calib, k, objective=o, **kw) for o in OBJECTIVES for k in counts]
    schedules.append(greedy_schedule(calib, **kw))
    schedules += [greedy_schedule(calib, threshold=t, **kw) for t in REFRESH_THRESHOLDS]
    schedules += [even_schedule(calib, k, **kw) for k in counts]
    paths = []
    for sched in schedules:
        path = Path(out_dir) / f"{sched.model}_{schedule_name(sched)}.json"
        meta = dict(sched.meta, provenance=provenance(command, smoke=smoke))
        dataclasses.replace(sched, meta=tuple(sorted(meta.items()))).save(path)
        paths.append(path)
    return paths


def calibration_is_smoke(calibration: Path) -> bool:
    """Whether the calibration ``<stem>.json`` beside ``calibration`` records a smoke run."""
    record = calibration.with_suffix(".json")
    return record.is_file() and is_smoke(json.loads(record.read_text()))


def run_schedule(calibration: Path, out_dir: Path, *, smoke: bool, min_keys: int | None = None,
                 command: str = "kascade-lite schedule") -> list[Path]:
    """DP schedules (K = 2..8 anchors) and the greedy one from a calibration file, into ``out_dir``. A smoke
    calibration makes smoke schedules; ``min_keys`` defaults to 128, or `SMOKE_MIN_KEYS` for smoke."""
    if not calibration.with_suffix(".safetensors").is_file():
        raise FileNotFoundError(f"calibration {calibration.with_suffix('.safetensors')} not found: "
                                f"run `kascade-lite calibrate` first")
    smoke = smoke or calibration_is_smoke(calibration)
    floor = min_keys if min_keys is not None else SMOKE_MIN_KEYS if smoke else 128
    return write_schedules(Calibration.load(calibration), out_dir, min_keys=floor, command=command, smoke=smoke)
