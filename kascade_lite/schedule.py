"""Kascade schedules: which layers are anchors, which reuse whose Top-k, and through which head map.

A schedule is one validated JSON file::

    {"version": 1, "model": "smollm2-135m", "num_layers": 30, "num_kv_heads": 3,
     "layer_types": ["dense", "reuse", "anchor", ...],      # layer 0 is always "dense" (it also emits Top-k)
     "anchor_of": [0, 0, 2, ...],                           # the layer whose Top-k each layer uses (itself if not reuse)
     "head_map": [[0, 1, 2], [2, 0, 1], ...],               # [layers][kv_heads] -> KV head of anchor_of[layer]
     "tile_size": 32, "budget": 0.1, "min_keys": 128, "method": "dp", "meta": {...}}

An optional ``"head_budgets"`` (``[layers][kv_heads]`` positive multipliers of the budget, our variant) gives the
key set KV head ``h`` of anchor or dense layer ``l`` selects the budget ``budget * head_budgets[l][h]``; a reuse
layer's row repeats what it inherits (``head_budgets[anchor_of[l]][head_map[l][h]]``), so row ``l`` is what layer
``l`` reads. Files without it load as before (``None``) and are written back unchanged.

This module holds the value type only (`Schedule`: construction, validation, JSON) and `default_schedule`, the
evenly spaced plan used when no calibration is at hand; it sits below `kascade` (which runs a schedule). Choosing the
anchors from a calibration (Kascade's DP, the greedy rule) is `kascade_lite.search`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .files import write_json_atomic

SCHEDULE_VERSION = 1
LAYER_TYPES = ("dense", "anchor", "reuse")
SMOKE_MIN_KEYS = 32
"""Inference-time key floor of schedules made from a smoke calibration: below the 256-token smoke windows, so that
Kascade really drops keys at smoke size (the full-size floor, 128, would keep half of them)."""


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
    head_budgets: tuple[tuple[float, ...], ...] | None = None

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
        if self.head_budgets is not None:
            self.validate_head_budgets(bad)

    def validate_head_budgets(self, bad: Any) -> None:
        """``head_budgets``: ``[num_layers][num_kv_heads]`` finite positive multipliers, each reuse row the one it
        inherits through the head map. ``bad`` makes the error."""
        hb = self.head_budgets
        if len(hb) != self.num_layers or any(len(row) != self.num_kv_heads for row in hb):
            raise bad(f"head_budgets must be [num_layers={self.num_layers}][num_kv_heads={self.num_kv_heads}], got "
                      f"{len(hb)} rows of lengths {sorted({len(row) for row in hb})}")
        for layer, row in enumerate(hb):
            if any(isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m) or m <= 0
                   for m in row):
                raise bad(f"head_budgets[{layer}]={list(row)} must be finite positive multipliers")
            if self.layer_types[layer] == "reuse":
                inherited = [hb[self.anchor_of[layer]][h] for h in self.head_map[layer]]
                if list(row) != inherited:
                    raise bad(f"head_budgets[{layer}]={list(row)} of a reuse layer must repeat what it inherits "
                              f"through head_map[{layer}]={list(self.head_map[layer])} from layer "
                              f"{self.anchor_of[layer]}: {inherited}")

    # ----------------------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layer_types"], d["anchor_of"] = list(self.layer_types), list(self.anchor_of)
        d["head_map"] = [list(r) for r in self.head_map]
        d["meta"] = dict(self.meta)
        if self.head_budgets is None:
            del d["head_budgets"]                       # files without head budgets stay as they were
        else:
            d["head_budgets"] = [list(r) for r in self.head_budgets]
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
        if d.get("head_budgets") is not None:
            try:
                d["head_budgets"] = tuple(tuple(float(m) for m in row) for row in d["head_budgets"])
            except (TypeError, ValueError) as e:
                raise ValueError(f"{source}: head_budgets must be [layers][kv_heads] numbers ({e})") from e
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


def evenly_spaced(num_layers: int, num_anchors: int) -> tuple[int, ...]:
    """Layer 0 and ``num_anchors - 1`` more anchors at ``round(i * num_layers / num_anchors)``: ``num_anchors`` in
    all, counting layer 0 (30 layers, 6 anchors: 0, 5, 10, 15, 20, 25)."""
    if not 1 <= num_anchors <= num_layers:
        raise ValueError(f"num_anchors must be in 1..{num_layers} (layer 0 counted), got {num_anchors}")
    return tuple(round(i * num_layers / num_anchors) for i in range(num_anchors))


def default_schedule(model: str, num_layers: int, kv_heads: int, num_anchors: int, tile: int,
                     budget: float) -> Schedule:
    """Layer 0 dense plus ``num_anchors - 1`` evenly spread anchors (`evenly_spaced`; when no calibrated schedule
    is given), the identity head map."""
    anchors = evenly_spaced(num_layers, num_anchors)
    return Schedule.from_anchors(model, num_layers, kv_heads, anchors, tile_size=tile, budget=budget, min_keys=0,
                                 method="evenly-spaced")
