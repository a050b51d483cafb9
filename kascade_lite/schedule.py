"""Kascade schedules: which layers are anchors, which reuse whose Top-k, and through which head map.

A schedule is one validated JSON file::

    {"version": 1, "model": "smollm2-135m", "num_layers": 30, "num_kv_heads": 3,
     "layer_types": ["dense", "reuse", "anchor", ...],      # layer 0 is always "dense" (it also emits Top-k)
     "anchor_of": [0, 0, 2, ...],                           # the layer whose Top-k each layer uses (itself if not reuse)
     "head_map": [[0, 1, 2], [2, 0, 1], ...],               # [layers][kv_heads] -> KV head of anchor_of[layer]
     "tile_size": 32, "budget": 0.1, "min_keys": 128, "method": "dp", "meta": {...}}

Two ways to choose the anchors from a calibration (`calibrate.Calibration`):

* `dp_schedule` — Kascade's dynamic programme. With ``W[a, b] = sim(a, b) * importance[b]`` (head-remapped layer
  similarity times layer importance) and anchors ``0 = s_1 < ... < s_K``, it maximises
  ``sum_k sum_{b = s_k}^{s_{k+1} - 1} W[s_k, b]``: every layer scores its similarity with the latest anchor at or
  before it (an anchor scores its own importance). ``K`` **counts layer 0**, as in the reference implementation
  (its schedules are named e.g. ``layers_0_2_8_13_14``: five anchors, layer 0 included).
* `greedy_schedule` — the simple rule of the original guide: walk the layers, reuse the latest anchor while it is at
  most ``max_reuse_dist`` layers back and its similarity is at least ``threshold``, otherwise start a new anchor.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .files import provenance, write_json_atomic

if TYPE_CHECKING:
    from .calibrate import Calibration

SCHEDULE_VERSION = 1
LAYER_TYPES = ("dense", "anchor", "reuse")


@dataclass(frozen=True)
class Schedule:
    """Per-layer plan for Kascade attention (hashable, so it can be a static argument of a jitted forward)."""

    model: str
    num_layers: int
    num_kv_heads: int
    layer_types: tuple[str, ...]
    anchor_of: tuple[int, ...]
    head_map: tuple[tuple[int, ...], ...]
    tile_size: int = 32
    budget: float = 0.1
    min_keys: int = 128
    method: str = "manual"
    meta: tuple[tuple[str, Any], ...] = field(default=(), compare=False)
    version: int = SCHEDULE_VERSION

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------------------------------- construction
    @classmethod
    def from_anchors(cls, model: str, num_layers: int, num_kv_heads: int, anchors: list[int] | tuple[int, ...],
                     head_map: list[list[int]] | None = None, **kw: Any) -> "Schedule":
        """Layer 0 dense, the given anchor layers, every other layer reusing the nearest anchor before it.
        Without ``head_map`` every KV head maps to the same-numbered anchor head (no remapping)."""
        anchors = sorted(set(int(a) for a in anchors) - {0})
        types, anchor_of, last = [], [], 0
        for layer in range(num_layers):
            if layer == 0:
                types.append("dense")
            elif layer in anchors:
                types.append("anchor")
                last = layer
            else:
                types.append("reuse")
            anchor_of.append(layer if types[-1] != "reuse" else last)
        hm = head_map if head_map is not None else [list(range(num_kv_heads))] * num_layers
        meta = kw.pop("meta", {})
        return cls(model=model, num_layers=num_layers, num_kv_heads=num_kv_heads, layer_types=tuple(types),
                   anchor_of=tuple(anchor_of), head_map=tuple(tuple(int(h) for h in row) for row in hm),
                   meta=tuple(sorted(dict(meta).items())), **kw)

    @property
    def anchors(self) -> tuple[int, ...]:
        """Layers that compute full scores (layer 0 included)."""
        return tuple(i for i, t in enumerate(self.layer_types) if t != "reuse")

    # ----------------------------------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise ``ValueError`` naming the field for any inconsistency."""
        def bad(msg: str) -> ValueError:
            return ValueError(f"invalid schedule for {self.model!r}: {msg}")

        if self.version != SCHEDULE_VERSION:
            raise bad(f"version {self.version} is not supported (expected {SCHEDULE_VERSION})")
        n = self.num_layers
        if n <= 0 or self.num_kv_heads <= 0:
            raise bad(f"num_layers={n} and num_kv_heads={self.num_kv_heads} must be positive")
        for name in ("layer_types", "anchor_of", "head_map"):
            if len(getattr(self, name)) != n:
                raise bad(f"{name} has {len(getattr(self, name))} entries, expected num_layers={n}")
        unknown = [t for t in self.layer_types if t not in LAYER_TYPES]
        if unknown:
            raise bad(f"unknown layer types {sorted(set(unknown))} (allowed: {LAYER_TYPES})")
        if self.layer_types[0] != "dense":
            raise bad(f"layer 0 must be 'dense', got {self.layer_types[0]!r}")
        for layer, (t, a) in enumerate(zip(self.layer_types, self.anchor_of)):
            if t != "reuse" and a != layer:
                raise bad(f"layer {layer} is {t!r} but anchor_of[{layer}]={a} (must be itself)")
            if t == "reuse" and not (0 <= a < layer and self.layer_types[a] != "reuse"):
                raise bad(f"reuse layer {layer} points at anchor_of={a}, which is not an earlier anchor/dense layer")
        for layer, row in enumerate(self.head_map):
            if len(row) != self.num_kv_heads or any(not 0 <= h < self.num_kv_heads for h in row):
                raise bad(f"head_map[{layer}]={list(row)} must hold {self.num_kv_heads} heads in "
                          f"[0, {self.num_kv_heads})")
        if self.tile_size <= 0:
            raise bad(f"tile_size={self.tile_size} must be positive")
        if not 0 < self.budget <= 1:
            raise bad(f"budget={self.budget} must be a fraction in (0, 1]")
        if self.min_keys < 0:
            raise bad(f"min_keys={self.min_keys} must be >= 0")

    # ----------------------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layer_types"], d["anchor_of"] = list(self.layer_types), list(self.anchor_of)
        d["head_map"] = [list(r) for r in self.head_map]
        d["meta"] = dict(self.meta)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> "Schedule":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = sorted(set(d) - fields), sorted({"model", "num_layers", "num_kv_heads", "layer_types",
                                                            "anchor_of", "head_map"} - set(d))
        if unknown or missing:
            raise ValueError(f"{source}: schedule has unknown keys {unknown} / missing keys {missing}")
        d = dict(d)
        d["layer_types"] = tuple(d["layer_types"])
        d["anchor_of"] = tuple(int(a) for a in d["anchor_of"])
        d["head_map"] = tuple(tuple(int(h) for h in row) for row in d["head_map"])
        d["meta"] = tuple(sorted(dict(d.get("meta") or {}).items()))
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from e

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temp file in the same folder, then rename)."""
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Schedule":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read schedule JSON ({e})") from e
        if not isinstance(d, dict):
            raise ValueError(f"{path}: schedule JSON must be an object")
        return cls.from_dict(d, source=str(path))



# ------------------------------------------------------------------------------------------------ anchor selection
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


def default_schedule(model: str, num_layers: int, kv_heads: int, num_anchors: int, tile: int,
                     budget: float) -> "Schedule":
    """Layer 0 dense plus ``num_anchors - 1`` evenly spread anchors (when no calibrated schedule is given)."""
    step = num_layers / num_anchors
    anchors = [round(i * step) for i in range(1, num_anchors)]
    return Schedule.from_anchors(model, num_layers, kv_heads, anchors, tile_size=tile, budget=budget, min_keys=0,
                                 method="evenly-spaced")


def _schedule_from_calibration(calib: "Calibration", anchors: tuple[int, ...], method: str, model: str | None,
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


def dp_schedule(calib: "Calibration", num_anchors: int, *, objective: str = "similarity", model: str | None = None,
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


def greedy_schedule(calib: "Calibration", *, max_reuse_dist: int = MAX_REUSE_DIST,
                    threshold: float = CALIB_THRESHOLD, model: str | None = None, tile_size: int | None = None,
                    budget: float | None = None, min_keys: int = 128) -> Schedule:
    """The original guide's greedy schedule on the head-remapped layer similarity (importance is not used)."""
    anchors = greedy_anchors(calib.layer_similarity(), max_reuse_dist, threshold)
    meta = dict(num_anchors=len(anchors), max_reuse_dist=max_reuse_dist, threshold=threshold)
    return _schedule_from_calibration(calib, anchors, "greedy", model, tile_size, budget, min_keys, meta)


def write_schedules(calib: "Calibration", out_dir: str | os.PathLike, *, command: str, smoke: bool,
                    anchor_counts: tuple[int, ...] = DP_ANCHOR_COUNTS, **kw: Any) -> list[Path]:
    """Write ``<model>_dp_k{K}.json`` (similarity objective) and ``<model>_dpimp_k{K}.json`` (importance-weighted)
    for each K, and ``<model>_greedy.json`` into ``out_dir``; returns the paths. ``smoke`` (recorded in each file's
    provenance): made from a smoke-size calibration."""
    schedules = [dp_schedule(calib, k, objective=o, **kw) for o in OBJECTIVES for k in anchor_counts
                 if k <= calib.num_layers]
    schedules.append(greedy_schedule(calib, **kw))
    paths = []
    for sched in schedules:
        meta = dict(sched.meta)
        prefix = "dp" if meta.get("objective") == "similarity" else "dpimp"
        suffix = f"{prefix}_k{meta['num_anchors']}" if sched.method == "dp" else sched.method
        path = Path(out_dir) / f"{sched.model}_{suffix}.json"
        meta = dict(sched.meta, provenance=provenance(command, smoke=smoke))
        dataclasses.replace(sched, meta=tuple(sorted(meta.items()))).save(path)
        paths.append(path)
    return paths
