"""Every attention method the book measures, by name: one registry that the benchmarks, the CLI and the chapters
build their attention functions from.

A method is built at a `Setting` (its schedule, key budget, floor, query tile, granularity): `attention` gives the
`model.AttentionFn` of a whole forward (perplexity, a prefill), `retrieval` the `tasks.RetrievalMethod` (prefill and
decode attention) of the needle task. Names may carry a schedule and a budget, ``method+schedule@budget`` (e.g.
``kascade_decode+dp_k3@0.3``: decode-only Kascade under the schedule ``dp_k3`` with 30 % of the keys); `build` and
`describe` read that form.

Two rules of the retrieval task are stated once here: a *decode-only* method (Quest's and TidalDecode's setting)
keeps an exact prefill and is sparse in every generated token; and prompts of several thousand tokens run dense
attention through `kernels.flash_attention` and the window at key-tile granularity (`Method.long_prompts`), the
memory-light paths whose speed chapter 08 measures.

TidalDecode's re-selection layer is the one chosen on held-out needle cases (`tidal_reselect`, the file
``tidal_selection.json`` of `selection.choose_tidal_layer`) for the model depth it was chosen at; elsewhere it is its
paper's default, ``num_layers // 2``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .baselines import (QuestAttention, SinkWindowAttention, TidalDecode, TiledSinkWindow, all_heads_pooled,
                        flash_dense_attention, kascade_no_remap, omnikv, oracle_topk)
from .files import SmokeResultsError, results_file
from .kascade import GRANULARITIES, KascadeAttention, tiles_kept
from .model import AttentionFn, dense_attention
from .schedule import Schedule
from .tasks import RetrievalMethod

DEFAULT_BUDGET = 0.1
"""The key budget of a name without ``@budget``."""
TIDAL_SELECTION = "tidal_selection.json"
"""The held-out choice of TidalDecode's re-selection layer (`selection.choose_tidal_layer`)."""


def tidal_choice() -> tuple[int, int] | None:
    """``(num_layers, layer)``: the re-selection layer chosen on held-out cases and the depth of the model it was
    chosen for, from ``tidal_selection.json`` (`files.results_file`: ``$KASCADE_RESULTS_DIR``, else the shipped
    results); None when there is no finished full-size choice (a smoke run is never used)."""
    try:
        path = results_file(TIDAL_SELECTION, allow_smoke=False)
        doc = json.loads(path.read_text())
    except (FileNotFoundError, SmokeResultsError):
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{TIDAL_SELECTION}: cannot read the TidalDecode layer choice ({e})") from e
    try:
        return (int(doc["settings"]["num_layers"]), int(doc["chosen"])) if "chosen" in doc else None
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a TidalDecode layer choice with settings.num_layers and chosen ({e})") from e


def tidal_reselect(num_layers: int) -> int | None:
    """TidalDecode's re-selection layer for a model of ``num_layers`` layers: the held-out choice (`tidal_choice`)
    when it was made at that depth, else None (`baselines.TidalDecode`'s default, ``num_layers // 2``)."""
    choice = tidal_choice()
    return choice[1] if choice is not None and choice[0] == num_layers else None


def _tidal_description() -> str:
    choice = tidal_choice()
    layer = ("num_layers // 2" if choice is None else
             f"layer {choice[1]} of {choice[0]}, chosen on held-out needle cases ({TIDAL_SELECTION}; "
             f"num_layers // 2 at other depths)")
    return (f"decode-time token-selection layers (layer 2 and re-selection {layer}) with full attention pick Top-k "
            f"positions per query head that all other layers reuse, layers 0-1 dense (TidalDecode, Yang et al. "
            f"2024, arXiv 2410.05076)")


@dataclass(frozen=True)
class Setting:
    """What a method is built at: ``schedule`` (Kascade's anchors and head maps; the oracle and TidalDecode take its
    layer and KV-head counts), ``budget`` (share or count of keys per query), ``min_keys`` (the floor), ``tile``
    (query tile, and key tile with ``granularity="tile"``) and ``length`` (prompt tokens: the tiled window's size).
    ``None`` for budget, floor or tile means the schedule's. ``reselect``: TidalDecode's re-selection layer (None:
    `tidal_reselect`)."""

    schedule: Schedule
    budget: float | int | None = None
    min_keys: int | None = None
    tile: int | None = None
    granularity: str = "position"
    length: int | None = None
    reselect: int | None = None

    def kascade_options(self) -> dict[str, Any]:
        """`kascade.KascadeAttention`'s options at this setting (None: the schedule's)."""
        return dict(tile_size=self.tile, budget=self.budget, min_keys=self.min_keys, granularity=self.granularity)


def _kascade(s: Setting) -> KascadeAttention:
    return KascadeAttention(s.schedule, **s.kascade_options())


def _in_force(s: Setting) -> tuple[float | int, int, int]:
    """``(budget, floor, tile)`` in force at ``s``: its own, else its schedule's, as Kascade resolves them."""
    k = _kascade(s)
    return k.budget_value, k.min_keys_value, k.q_tile


def _kascade_tiles(s: Setting) -> KascadeAttention:
    return _kascade(dataclasses.replace(s, granularity="tile"))


def _kascade_sw(s: Setting) -> KascadeAttention:
    return KascadeAttention.kascade_sw(s.schedule, **s.kascade_options())


def _kascade_mass(mass: float) -> Callable[[Setting], KascadeAttention]:
    """Our adaptive variant at pooled-attention share ``mass``: the setting's budget is each row's maximum."""
    return lambda s: KascadeAttention(s.schedule, mass=mass, **s.kascade_options())


def _oracle(s: Setting) -> KascadeAttention:
    budget, floor, _ = _in_force(s)
    return oracle_topk(s.schedule.num_layers, s.schedule.num_kv_heads, budget=budget, min_keys=floor)


def _sink_window(s: Setting) -> SinkWindowAttention:
    budget, floor, _ = _in_force(s)
    return SinkWindowAttention(budget=budget, min_keys=floor)


def _quest(s: Setting) -> QuestAttention:
    budget, floor, _ = _in_force(s)
    return QuestAttention(budget=budget, min_keys=floor)


def _tidal(s: Setting) -> TidalDecode:
    budget, floor, _ = _in_force(s)
    layers = s.schedule.num_layers
    reselect = s.reselect if s.reselect is not None else tidal_reselect(layers)
    return TidalDecode(layers, s.schedule.num_kv_heads, budget=budget, min_keys=floor, reselect=reselect)


def _tiled_window(s: Setting) -> TiledSinkWindow:
    if s.length is None:
        raise ValueError("sink_window on long prompts keeps as many key tiles as Kascade: give Setting.length")
    budget, floor, tile = _in_force(s)
    return TiledSinkWindow(keep=tiles_kept(s.length, tile, budget, floor), tile=tile)


def _every_layer_pooled(granularity: str) -> Callable[[Setting], KascadeAttention]:
    """Every layer after 0 its own anchor, Top-k pooled over the GQA group: oracle + pooling, no reuse."""
    def build(s: Setting) -> KascadeAttention:
        budget, floor, tile = _in_force(s)
        sched = s.schedule
        every = Schedule.from_anchors(sched.model, sched.num_layers, sched.num_kv_heads,
                                      list(range(1, sched.num_layers)), tile_size=tile, budget=budget,
                                      min_keys=floor, method="every layer an anchor")
        return KascadeAttention(every, granularity=granularity)
    return build


@dataclass(frozen=True)
class Method:
    """One named method: ``description`` (what it does, whose it is), ``attention`` (its attention function at a
    `Setting`), ``decode_only`` (in the retrieval task: an exact prefill, then ``attention`` in every decode step),
    ``long_prompts`` (what the retrieval task runs instead of ``attention``, where that differs) and ``adaptive``
    (how many keys it reads depends on the attention, so its K/V read is measured,
    `tradeoff.selection_read_share`, not computed from the budget)."""

    description: str
    attention: Callable[[Setting], AttentionFn]
    decode_only: bool = False
    long_prompts: Callable[[Setting], AttentionFn] | None = None
    adaptive: bool = False


METHODS: dict[str, Method] = {
    "dense": Method("exact causal attention in every layer (Vaswani et al. 2017); on the retrieval prompts through "
                    "kernels.flash_attention", lambda s: dense_attention,
                    long_prompts=lambda s: flash_dense_attention),
    "kascade": Method("anchor layers pick Top-k key positions pooled over the GQA group and the query tile; reuse "
                      "layers attend to them through a head map; decode Top-k per token; the query's own tile "
                      "included (Deshmukh et al. 2025, arXiv 2512.16391)", _kascade),
    "kascade_decode": Method("dense prefill, Kascade (key positions) in every decode step (Deshmukh et al. 2025)",
                             _kascade, decode_only=True),
    "kascade_tiles": Method("as kascade with whole key tiles of the query tile's size (the block-sparse speed "
                            "variant; Deshmukh et al. 2025)", _kascade_tiles),
    "kascade_tiles_decode": Method("dense prefill, Kascade with key tiles in every decode step (Deshmukh et al. "
                                   "2025)", _kascade_tiles, decode_only=True),
    "kascade_sw": Method("our variant: kascade with the first 4 and the 32 latest positions always in the "
                         "anchors' Top-k, inside the same budget", _kascade_sw),
    "kascade_sw_decode": Method("dense prefill, kascade_sw in every decode step (ours)", _kascade_sw,
                                decode_only=True),
    "kascade_no_remap": Method("Kascade with the identity head map: KV head h reuses anchor head h (ablation, "
                               "Deshmukh et al. 2025)", lambda s: kascade_no_remap(s.schedule, **s.kascade_options())),
    "all_heads_pooled": Method("Kascade with one key set pooled over all query heads, shared by every KV head "
                               "(ablation, Deshmukh et al. 2025)",
                               lambda s: all_heads_pooled(s.schedule, **s.kascade_options())),
    "omnikv": Method("the schedule's anchors are dense filter layers choosing tokens, pooled over all heads, that "
                     "the following layers reuse without head awareness (OmniKV, Hao et al. 2025, ICLR)",
                     lambda s: omnikv(s.schedule, **s.kascade_options())),
    "oracle": Method("every layer after 0 an anchor with its own exact Top-k per query head and per query, no "
                     "pooling (the Top-k ceiling; Deshmukh et al. 2025)", _oracle),
    "oracle_decode": Method("dense prefill; in every decode step each query head of every layer but 0 keeps its own "
                            "exact Top-k key positions (the Top-k ceiling; Deshmukh et al. 2025)", _oracle,
                            decode_only=True),
    "pooled_decode": Method("dense prefill; in decode every layer but 0 keeps its own Top-k key positions, pooled "
                            "over the GQA group (oracle + group pooling, no reuse; ablation of Deshmukh et al. 2025)",
                            _every_layer_pooled("position"), decode_only=True),
    "pooled": Method("every layer but 0 its own anchor, Top-k key positions pooled over the GQA group and the query "
                     "tile (oracle + group and tile pooling, no reuse; ablation of Deshmukh et al. 2025)",
                     _every_layer_pooled("position")),
    "pooled_tiles_decode": Method("as pooled_decode with key tiles: oracle + pooling + tiles, no reuse (ablation of "
                                  "Deshmukh et al. 2025)", _every_layer_pooled("tile"), decode_only=True),
    "sink_window": Method("4 sink tokens + a sliding window of recent keys, layer 0 dense (StreamingLLM, Xiao et al. "
                          "2023, arXiv 2309.17453); on the retrieval prompts at tile granularity, the first tile plus "
                          "the most recent tiles, as many tiles as Kascade keeps",
                          _sink_window, long_prompts=_tiled_window),
    "quest": Method("pages of 16 keys ranked by a min/max upper bound on q·k, per query head the query's page plus "
                    "the Top pages, ceil(keys kept / 16) pages in all, layers 0-1 dense (Quest, Tang et al. 2024, "
                    "arXiv 2406.10774); on the retrieval prompts in decode only, as in its paper", _quest,
                    decode_only=True),
    "tidal": Method(_tidal_description(), _tidal, decode_only=True),
}
"""Every method by name, in the order the book's tables list them."""

MASSES = (0.8, 0.9, 0.95, 0.98)
"""Pooled-attention shares of our adaptive variant: ``kascade_mass<percent>`` (sparse prefill and decode) and
``kascade_mass<percent>_decode`` (dense prefill); ``@budget`` is each row's maximum."""
for _mass in MASSES:
    _pct = round(100 * _mass)
    METHODS[f"kascade_mass{_pct}"] = Method(
        f"our adaptive variant: anchors keep the fewest key positions that, with the query tile's own keys, hold "
        f"{_pct} % of the pooled attention, at least the floor and at most the budget; reuse layers inherit those "
        f"sets through the head map (top-p selection as in Twilight, arXiv 2502.02770, 2025)", _kascade_mass(_mass),
        adaptive=True)
    METHODS[f"kascade_mass{_pct}_decode"] = Method(
        f"dense prefill, then kascade_mass{_pct} in every decode step (ours; top-p as in Twilight, 2025)",
        _kascade_mass(_mass),
        decode_only=True, adaptive=True)


def parse(name: str) -> tuple[str, str | None, float | None]:
    """``method+schedule@budget`` -> ``(method, schedule or None, budget or None)``, checked against `METHODS`."""
    head, at, budget_text = name.partition("@")
    base, _, sched = head.partition("+")
    try:
        budget = float(budget_text) if at else None
    except ValueError as e:
        raise ValueError(f"method {name!r}: the budget after '@' must be a fraction like 0.3") from e
    if base not in METHODS or (budget is not None and not 0 < budget <= 1):
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}, optionally with +schedule and "
                         f"@budget in (0, 1]")
    return base, sched or None, budget


def setting(name: str, schedules: Mapping[str, Schedule], main: str, **fields: Any) -> tuple[str, Setting]:
    """``(method, Setting)`` of name ``method+schedule@budget``: the named schedule (else ``main``) and budget (else
    ``fields``' or `DEFAULT_BUDGET`); ``fields`` are the other `Setting` fields."""
    base, sched, budget = parse(name)
    if sched is not None and sched not in schedules:
        raise ValueError(f"method {name!r}: no schedule {sched!r}; have {sorted(schedules)}")
    fields.setdefault("budget", DEFAULT_BUDGET)
    if budget is not None:
        fields["budget"] = budget
    return base, Setting(schedules[sched or main], **fields)


def attention(name: str, s: Setting) -> AttentionFn:
    """The attention function of method ``name`` (a `METHODS` key) for a whole forward at ``s``."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    return METHODS[name].attention(s)


def retrieval(name: str, s: Setting) -> RetrievalMethod:
    """The prefill and decode attention of method ``name`` (a `METHODS` key) on retrieval prompts at ``s``: a
    decode-only method after a dense (flash) prefill, every other method in both."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    method = METHODS[name]
    fn = (method.long_prompts or method.attention)(s)
    return RetrievalMethod(flash_dense_attention if method.decode_only else fn, fn)


def build(name: str, schedules: Mapping[str, Schedule], main: str, **fields: Any) -> RetrievalMethod:
    """`retrieval` of a name in the ``method+schedule@budget`` form (see `setting`)."""
    return retrieval(*setting(name, schedules, main, **fields))


def describe(name: str) -> str:
    """The description of a name in the ``method+schedule@budget`` form: the method's, plus its schedule and budget
    when the name sets them."""
    base, sched, budget = parse(name)
    return (METHODS[base].description + (f"; schedule {sched} instead of the main one" if sched else "")
            + ("" if budget is None else f"; at most {100 * budget:g} % of the keys per row" if METHODS[base].adaptive
               else f"; key budget {100 * budget:g} % instead of {100 * DEFAULT_BUDGET:g} %"))


def descriptions(names: Iterable[str]) -> dict[str, str]:
    """``{name: describe(name)}``: the ``methods`` field of a results file."""
    return {n: describe(n) for n in names}


def speed_grid(schedule: Schedule, budgets: Iterable[float]) -> dict[str, KascadeAttention]:
    """``kascade_<granularity>@<budget>``: Kascade at every granularity and budget (floor and tile: the
    schedule's), the sparse paths the speed benchmarks time."""
    return {f"kascade_{g}@{b:g}": KascadeAttention(schedule, granularity=g, budget=b)
            for b in budgets for g in GRANULARITIES}
