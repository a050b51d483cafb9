"""The method registry: every name parses, builds and is described; the ``method+schedule@budget`` form; the
retrieval rules (decode-only methods after a flash prefill, memory-light dense and window); and every harness (the
accuracy tables, the held-out variant choice, the speed benchmarks, a plain `model.forward`) runs one and the same
Kascade."""

from __future__ import annotations

import dataclasses

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from kascade_lite import methods as M
from kascade_lite import tradeoff as T
from kascade_lite.baselines import (QuestAttention, SinkWindowAttention, TidalDecode, TiledSinkWindow,
                                    flash_dense_attention)
from kascade_lite.data import load_tokenizer
from kascade_lite.files import RESULTS_ENV
from kascade_lite.kascade import SW_RECENT, SW_SINKS, KascadeAttention, tiles_kept
from kascade_lite.model import KVCache, dense_attention, forward, make_forward
from kascade_lite.models import smollm2_or_tiny
from kascade_lite.schedule import Schedule
from kascade_lite.selection import variants
from kascade_lite.tasks import RetrievalMethod, answer_case, make_cases

TABLES = dict(budget=0.1, min_keys=128, tile=32)


def sched(num_layers: int = 4, kv_heads: int = 3) -> Schedule:
    return Schedule.from_anchors("test", num_layers, kv_heads, [2], tile_size=32, budget=0.1, min_keys=128)


def test_every_method_builds_and_cites_its_source() -> None:
    s = M.Setting(sched(), length=256, **TABLES)
    for name, method in M.METHODS.items():
        assert method.description and (name.startswith("kascade_sw") or "20" in method.description), name
        fn = M.attention(name, s)
        pair = M.retrieval(name, s)
        assert hash(fn) is not None and pair.decode == (method.long_prompts or method.attention)(s)
        assert pair.prefill == (flash_dense_attention if method.decode_only else pair.decode), name


def test_retrieval_rules() -> None:
    s = M.Setting(sched(), length=2048, **TABLES)
    assert M.attention("dense", s) is dense_attention
    assert M.retrieval("dense", s) == RetrievalMethod(flash_dense_attention, flash_dense_attention)
    assert M.attention("sink_window", s) == SinkWindowAttention(budget=0.1, min_keys=128)
    window = TiledSinkWindow(keep=tiles_kept(2048, 32, 0.1, 128), tile=32)
    assert M.retrieval("sink_window", s) == RetrievalMethod(window, window)
    assert M.retrieval("quest", s) == RetrievalMethod(flash_dense_attention, QuestAttention(budget=0.1, min_keys=128))
    assert M.retrieval("tidal", s).decode == TidalDecode(4, 3, budget=0.1, min_keys=128)
    kascade = KascadeAttention(s.schedule, tile_size=32, budget=0.1, min_keys=128)
    assert M.retrieval("kascade", s) == RetrievalMethod(kascade, kascade)
    assert M.retrieval("kascade_decode", s) == RetrievalMethod(flash_dense_attention, kascade)
    assert M.attention("kascade_tiles", s).granularity == "tile"
    pooled = M.attention("pooled_tiles_decode", s)
    assert pooled.granularity == "tile" and pooled.schedule.anchors == (0, 1, 2, 3)
    assert M.attention("pooled", s) == dataclasses.replace(pooled, granularity="position")   # per query tile
    with pytest.raises(ValueError, match="Setting.length"):
        M.retrieval("sink_window", M.Setting(sched()))


def test_names_with_schedule_and_budget() -> None:
    schedules = {"main": sched(), "other": Schedule.from_anchors("test", 4, 3, [1, 3], tile_size=32)}
    assert M.parse("kascade_decode+other@0.3") == ("kascade_decode", "other", 0.3)
    assert M.parse("dense") == ("dense", None, None)
    base, s = M.setting("kascade_decode+other@0.3", schedules, "main", **TABLES)
    assert base == "kascade_decode" and s.schedule is schedules["other"] and s.budget == 0.3 and s.min_keys == 128
    assert M.setting("kascade", schedules, "main", min_keys=0)[1] == M.Setting(schedules["main"], budget=0.1,
                                                                                min_keys=0)
    assert "30 %" in M.describe("kascade_decode@0.3") and "schedule other" in M.describe("kascade+other")
    assert M.descriptions(["dense"]) == {"dense": M.METHODS["dense"].description}
    for bad, message in (("bogus", "unknown method 'bogus'"), ("kascade@x", "fraction"),
                         ("kascade@1.5", "unknown method"), ("kascade+nope", "no schedule 'nope'")):
        with pytest.raises(ValueError, match=message):
            M.build(bad, schedules, "main", **TABLES)


def test_every_harness_builds_the_same_kascade_sw() -> None:
    """The perplexity table, the retrieval table and the held-out variant choice all build our variant through
    `KascadeAttention.kascade_sw`: the same sinks and window over the paper's Kascade at equal settings."""
    s = sched()
    opts = dict(tile_size=32, budget=0.1, min_keys=128, granularity="position")
    want = KascadeAttention.kascade_sw(s, **opts)
    assert (want.sinks, want.recent) == (SW_SINKS, SW_RECENT) and want != KascadeAttention(s, **opts)
    ppl = M.attention("kascade_sw", M.Setting(s, **TABLES))
    retrieval = M.build("kascade_sw", {"main": s}, "main", length=256, **TABLES)
    chosen = variants(s, dict(granularity="position", tile_size=32, budget=0.1, min_keys=128))["kascade_sw"]
    assert ppl == retrieval.prefill == retrieval.decode == chosen == want


@pytest.mark.slow
def test_model_harness_and_benchmarks_run_the_same_kascade() -> None:
    """The retrieval harness (`methods.build` -> `tasks.answer_case`), the end-to-end benchmark (`methods.speed_grid`
    -> `model.make_forward`) and a plain `model.forward` all run `kascade.KascadeAttention` and agree on every
    layer's selection and on the outputs, in prefill and decode."""
    model = smollm2_or_tiny(smoke=True)
    s = Schedule.from_anchors("smoke", model.cfg.num_layers, model.cfg.num_kv_heads, [2], tile_size=32,
                              budget=0.1, min_keys=128)
    # the timed benchmark runs the block-sparse speed variant (key tiles); the harness names it kascade_tiles
    harness = M.build("kascade_tiles", {"main": s}, "main", length=256, **TABLES)
    timed = M.speed_grid(s, (0.1,))["kascade_tile@0.1"]
    direct = KascadeAttention(s, granularity="tile")
    paper = M.build("kascade", {"main": s}, "main", length=256, **TABLES)  # the tables' kascade: key positions
    assert paper.prefill == paper.decode == KascadeAttention(s, tile_size=32, budget=0.1, min_keys=128)
    assert all(type(p) is KascadeAttention for p in (harness.prefill, harness.decode, timed))
    tok = load_tokenizer()
    case = make_cases(256, 1, seed=5, tokenizer=tok)[0]
    tokens = jnp.asarray(case.ids[None], jnp.int32)
    empty = KVCache.empty(model.cfg, 1, 288)
    runs = [forward(model, tokens, empty, direct), forward(model, tokens, empty, harness.prefill),
            make_forward(model, timed)(tokens, empty)]
    decoders = (direct, harness.decode, timed)
    steps = [forward(model, tokens[:, -1:], cache, pol) for (_, cache, _), pol in zip(runs, decoders)]
    pairs = [(runs[1], runs[0]), (runs[2], runs[0]), (steps[1], steps[0]), (steps[2], steps[0])]
    for (got, _, got_carry), (want, _, want_carry) in pairs:
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
        assert sorted(got_carry) == sorted(want_carry) == [0, 2]
        for layer in got_carry:
            np.testing.assert_array_equal(got_carry[layer].idx, want_carry[layer].idx)
            np.testing.assert_array_equal(got_carry[layer].keep, want_carry[layer].keep)
    answers = answer_case(model, case, {"harness": harness, "direct": RetrievalMethod(direct, direct)}, tokenizer=tok)
    assert answers["harness"]["output"] == answers["direct"]["output"]


def test_published_method_lists_are_registered() -> None:
    """Every method the book's benchmark runs name (`pipeline.BENCHMARKS`' ``--methods``) is in the registry."""
    from kascade_lite.pipeline import BENCHMARKS

    named = [value for bench in BENCHMARKS.values() for args in (bench.args, bench.smoke_args)
             for flag, value in zip(args, args[1:]) if flag == "--methods"]
    assert named
    for name in ",".join(named).split(","):
        M.parse(name)


def _tidal_choice(folder: Path, *, num_layers: int, chosen: int | None, smoke: bool = False) -> None:
    """A tidal_selection.json as `selection.choose_tidal_layer` writes it (``chosen`` None: an unfinished run)."""
    doc = dict(provenance=dict(command="test", smoke=smoke), settings=dict(num_layers=num_layers, default=15),
               **({} if chosen is None else {"chosen": chosen}))
    (folder / M.TIDAL_SELECTION).write_text(json.dumps(doc))


def test_tidal_runs_the_layer_chosen_on_held_out_cases(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry's tidal, and the K/V read rule of the trade-off table, take the re-selection layer of
    tidal_selection.json at the depth it was chosen for; elsewhere, without a finished full-size choice, or with an
    explicit ``Setting.reselect``, TidalDecode's own default or that layer."""
    monkeypatch.setenv(RESULTS_ENV, str(tmp_path))
    deep = M.Setting(sched(30), length=2048, **TABLES)
    tidal = lambda s: M.retrieval("tidal", s).decode.reselect_layer  # noqa: E731
    dense_layers = lambda: [i for i, (kind, _) in enumerate(T.decode_layer_plan("tidal", 30, group=3))  # noqa: E731
                            if kind == "dense"]
    _tidal_choice(tmp_path, num_layers=30, chosen=9)
    assert M.tidal_choice() == (30, 9) and M.tidal_reselect(30) == 9
    assert tidal(deep) == 9 and M.retrieval("tidal", deep).prefill == flash_dense_attention
    assert dense_layers() == [0, 1, 2, 9]
    assert tidal(M.Setting(sched(4), **TABLES)) == 3          # another depth: num_layers // 2 (at least 3)
    assert tidal(M.Setting(sched(30), reselect=21, **TABLES)) == 21
    for smoke, chosen in ((True, 9), (False, None)):        # a smoke run or an unfinished one is never used
        _tidal_choice(tmp_path, num_layers=30, chosen=chosen, smoke=smoke)
        assert M.tidal_choice() is None and tidal(deep) == 15 and dense_layers() == [0, 1, 2, 15]
    (tmp_path / M.TIDAL_SELECTION).write_text("{not json")
    with pytest.raises(ValueError, match="tidal_selection.json"):
        M.tidal_choice()


def test_shipped_tidal_description_names_the_chosen_layer() -> None:
    """The description results files store for tidal names the layer the registry runs for SmolLM2."""
    choice = M.tidal_choice()
    text = M.METHODS["tidal"].description
    if choice is None:
        assert "num_layers // 2" in text
    else:
        assert f"layer {choice[1]} of {choice[0]}, chosen on held-out needle cases" in text
