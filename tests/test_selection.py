"""The held-out choices at smoke size: the schedule choice (calibration, every candidate schedule, the two stages,
the choice), the variant choice (the paper's Kascade against kascade_sw) and TidalDecode's re-selection layer, and
their rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kascade_lite import selection as S
from kascade_lite.schedule import Schedule, default_schedule
from kascade_lite.tasks import mcnemar_p, paired_outcomes


@pytest.mark.slow
def test_choose_schedule_smoke(tmp_path: Path) -> None:
    doc = S.choose_schedule(tmp_path, "test", smoke=True, seq_len=256, cal_wiki=2, cal_prompts=2, cases=2,
                            ppl_windows=1, finalists=2, quiet=True)
    assert json.loads((tmp_path / "schedule_selection.json").read_text()) == json.loads(json.dumps(doc))
    assert doc["provenance"]["smoke"] is True
    rows = doc["candidates"]
    assert {"dp_k2", "dpimp_k2", "greedy"} <= set(rows)
    assert all("decode_only_correct" in r and r["ppl"] > 0 for r in rows.values())
    finalists = [n for n, r in rows.items() if "retrieval_correct" in r]
    assert len(finalists) == 2 and doc["chosen"] in finalists
    assert doc["chosen"] == S.choose({n: rows[n] for n in finalists})
    for name in rows:
        sched = Schedule.load(tmp_path / "schedules" / f"smollm2-135m_{name}.json")
        assert list(sched.anchors) == rows[name]["anchors"]
    assert (tmp_path / "schedules" / "smollm2-135m_even_k2.json").is_file()       # written, but not a candidate
    assert not any(n.startswith(("even", "greedy_t")) for n in rows)
    cal = json.loads((tmp_path / "calibration" / "smollm2-135m-2k.json").read_text())
    assert cal["provenance"]["smoke"] is True and cal["settings"]["k_prev"] > 0


def test_schedule_choice_rule() -> None:
    rows = {"a": dict(retrieval_correct=3, ppl=10.0, num_anchors=5), "b": dict(retrieval_correct=3, ppl=9.0,
            num_anchors=8), "c": dict(retrieval_correct=2, ppl=1.0, num_anchors=2)}
    assert S.choose(rows) == "b"
    rows["b"]["ppl"] = 10.0
    assert S.choose(rows) == "a"  # fewer anchors break the tie


def _selection(folder: Path, num_layers: int = 4) -> Path:
    """A schedule_selection.json as `choose_schedule` writes it, choosing an evenly spaced schedule."""
    sched = default_schedule("smollm2-135m", num_layers, 3, 2, 32, 0.1)
    (folder / "schedules").mkdir(parents=True)
    sched.save(folder / "schedules" / "smollm2-135m_evenly.json")
    settings = dict(tile_size=32, budget=0.1, min_keys=128, granularity="position", seq_len=256,
                    calibration=dict(wikitext_windows=2), held_out=dict(seed=2))
    path = folder / "schedule_selection.json"
    path.write_text(json.dumps(dict(settings=settings, chosen="evenly")))
    return path


def test_choose_variant_smoke(tmp_path: Path) -> None:
    S.choose_variant(tmp_path, "test", _selection(tmp_path / "sel"), smoke=True, cases=2, ppl_windows=1)
    doc = json.loads((tmp_path / "variant_selection.json").read_text())
    assert doc["provenance"]["smoke"] is True and doc["settings"]["schedule"] == "evenly"
    rows = doc["variants"]
    assert set(rows) == {"kascade", "kascade_sw"}
    for row in rows.values():
        assert row["ppl"] > 0 and row["n_cases"] == 2 == len(row["cases"])
        assert row["n_correct"] == sum(c["correct"] for c in row["cases"])
    split = paired_outcomes(rows["kascade_sw"]["cases"], rows["kascade"]["cases"])
    assert tuple(doc["paired"][k] for k in ("both", "only_kascade_sw", "only_kascade", "neither")) == split
    assert doc["paired"]["p"] == mcnemar_p(split[1], split[2])
    assert doc["recommended"] == S.recommend(rows, split[1], split[2], doc["paired"]["p"])
    # the same choice on natural-text held-out cases goes to a file of its own
    S.choose_variant(tmp_path, "test", tmp_path / "sel" / "schedule_selection.json", smoke=True, cases=1,
                     ppl_windows=1, haystack="wikitext-valid", wording="varied")
    natural = json.loads((tmp_path / "variant_selection_wikitext-valid.json").read_text())
    assert natural["settings"]["held_out"]["haystack"] == "wikitext-valid"
    assert "haystack" not in doc["settings"]["held_out"]


def test_recommend_rule() -> None:
    rows = {"kascade": dict(ppl=10.0), "kascade_sw": dict(ppl=9.9)}
    assert S.recommend(rows, 8, 0, mcnemar_p(8, 0)) == "kascade_sw"
    assert S.recommend(rows, 5, 0, mcnemar_p(5, 0)) == "kascade"      # p = 0.0625: not significant
    rows["kascade_sw"]["ppl"] = 10.1
    assert S.recommend(rows, 8, 0, mcnemar_p(8, 0)) == "kascade"      # more needles, but worse perplexity


def test_missing_or_unfinished_selection_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="select_schedule.py"):
        S.load_selection(tmp_path / "schedule_selection.json", None)
    path = tmp_path / "schedule_selection.json"
    path.write_text(json.dumps({"settings": {}}))
    with pytest.raises(ValueError, match="no 'chosen' schedule"):
        S.load_selection(path, None)


def test_choose_adaptive_smoke(tmp_path: Path) -> None:
    """Two candidates at smoke size: both haystacks' needle files, the held-out perplexities and the choice, every
    candidate row paired with dense on its own cases; an adaptive candidate's read is the measured one."""
    names = ("kascade_decode@0.3", "kascade_mass90_decode@0.5")
    doc = S.choose_adaptive(tmp_path, "test", smoke=True, candidates=names, cases={})
    assert json.loads((tmp_path / "variant_selection_adaptive.json").read_text()) == json.loads(json.dumps(doc))
    assert doc["provenance"]["smoke"] is True and set(doc["candidates"]) == set(names)
    measured = []
    for hay in S.HAYSTACKS_HELD_OUT:
        runs = json.loads((tmp_path / f"adaptive_heldout_{hay}.json").read_text())
        assert runs["settings"]["seed"] == S.SELECTION_SEED
        measured.append(next(r for r in runs["results"] if r["method"] == names[1])["kv_read_share"])
    assert doc["candidates"][names[1]]["kv_read_share"]["256"] == pytest.approx(sum(measured) / len(measured))
    ppl = json.loads((tmp_path / "adaptive_heldout_ppl.json").read_text())
    assert [r["tile_size"] for r in ppl["results"]] == [32, 1, 1]          # decode-only candidates as decode steps
    assert all(r["ppl_delta_pct"] is not None for r in doc["candidates"].values())
    assert (doc["chosen"] is None) != (doc["closest"] is None)


def test_adaptive_rule() -> None:
    def row(meets: bool, share: float, worst: float, ppl: float) -> dict:
        return dict(meets=meets, kv_read_share={"2048": share}, min_recall=worst, ppl_delta_pct=ppl)

    rows = {"a": row(True, 0.4, 1.0, 1.0), "b": row(True, 0.3, 0.96, 1.9), "c": row(False, 0.1, 0.5, 9.0)}
    assert S.adaptive_verdict(rows) == dict(chosen="b", closest=None)       # the cheapest that qualifies
    rows = {"a": row(False, 0.4, 0.9, 3.0), "b": row(False, 0.3, 0.9, 2.5), "c": row(False, 0.1, 0.5, 1.0)}
    assert S.adaptive_verdict(rows) == dict(chosen=None, closest="b")       # best worst-case recall, then ppl


def test_tidal_layer_rule() -> None:
    """Most needles over both haystacks; a tie goes to the default if it is among the best, else the earliest."""
    assert S.tidal_candidates(30) == [3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29]
    assert S.tidal_candidates(8) == [3, 4, 5, 7] and S.tidal_candidates(30, step=1) == list(range(3, 30))
    assert S.choose_layer({3: 10, 9: 30, 15: 29}, default=15) == 9
    assert S.choose_layer({3: 10, 9: 30, 15: 30}, default=15) == 15
    assert S.choose_layer({3: 10, 11: 30, 9: 30, 15: 2}, default=15) == 9


def test_tidal_choice_on_a_synthetic_document() -> None:
    """The rule applied to the per-haystack counts of a tidal_selection.json: needles are summed over haystacks."""
    hay = {"noise": {"dense": dict(n_correct=9), "3": dict(n_correct=5), "9": dict(n_correct=2),
                     "15": dict(n_correct=1)},
           "wikitext-valid": {"dense": dict(n_correct=9), "3": dict(n_correct=0), "9": dict(n_correct=4),
                              "15": dict(n_correct=6)}}
    assert S.needles_found(hay, [3, 9, 15]) == {3: 5, 9: 6, 15: 7}
    assert S.choose_layer(S.needles_found(hay, [3, 9, 15]), default=15) == 15
    hay["noise"]["9"]["n_correct"] = 3
    assert S.choose_layer(S.needles_found(hay, [3, 9, 15]), default=15) == 15  # tied with the default
    hay["noise"]["15"]["n_correct"] = 0
    assert S.choose_layer(S.needles_found(hay, [3, 9, 15]), default=15) == 9


def test_choose_tidal_layer_smoke(tmp_path: Path) -> None:
    doc = S.choose_tidal_layer(tmp_path, "test", smoke=True, cases=1, layers=[5, 3])
    assert json.loads((tmp_path / "tidal_selection.json").read_text()) == json.loads(json.dumps(doc))
    settings = doc["settings"]
    assert doc["provenance"]["smoke"] is True and settings["num_layers"] == 8 and settings["candidates"] == [3, 5]
    assert settings["held_out"]["haystacks"] == {"noise": "fixed", "wikitext-valid": "varied"}
    assert set(doc["haystacks"]) == {"noise", "wikitext-valid"}
    for rows in doc["haystacks"].values():
        assert set(rows) == {"dense", "3", "5"}
        assert all(r["n_cases"] == 1 == len(r["cases"]) and r["n_correct"] == sum(c["correct"] for c in r["cases"])
                   for r in rows.values())
        assert len({c["answer"] for r in rows.values() for c in r["cases"]}) == 1  # one case, answered by all
    assert doc["found"] == {n: sum(h[n]["n_correct"] for h in doc["haystacks"].values()) for n in ("3", "5")}
    assert doc["chosen"] == S.choose_layer(S.needles_found(doc["haystacks"], [3, 5]), settings["default"])
    again = S.choose_tidal_layer(tmp_path, "test --resume", smoke=True, cases=1, layers=[5, 3], resume=True)
    assert again["haystacks"] == doc["haystacks"] and again["chosen"] == doc["chosen"]  # nothing left to answer
    assert again["resumed_by"][0]["command"] == "test --resume"
    with pytest.raises(ValueError, match="more than 0"):
        S.choose_tidal_layer(tmp_path, "test", smoke=True, cases=0, layers=[5, 3], resume=True)
    with pytest.raises(ValueError, match="not in"):
        S.choose_tidal_layer(tmp_path, "test", smoke=True, cases=1, layers=[2])


def test_distinct_runs_each_schedule_once() -> None:
    same = Schedule.from_anchors("test", 6, 3, [3], tile_size=32)
    schedules = {"main": same, "dp_k2": same, "even_k2": Schedule.from_anchors("test", 6, 3, [2], tile_size=32)}
    names = ["kascade", "kascade_tiles", "kascade+even_k2", "kascade+dp_k2", "kascade_tiles+dp_k2"]
    assert S.distinct(names, schedules, "main") == {
        "kascade": "kascade", "kascade_tiles": "kascade_tiles", "kascade+even_k2": "kascade+even_k2",
        "kascade+dp_k2": "kascade", "kascade_tiles+dp_k2": "kascade_tiles"}


def test_compare_spacing_smoke(tmp_path: Path) -> None:
    """Evenly spaced anchors beside both DP objectives at smoke size: every row paired with dense on both
    held-out haystacks, perplexity at every K, a repeated schedule run once and pointed to."""
    doc = S.compare_spacing(tmp_path, "test", smoke=True)
    assert json.loads((tmp_path / "schedule_spacing.json").read_text()) == json.loads(json.dumps(doc))
    assert doc["provenance"]["smoke"] is True
    rows = doc["rows"]
    assert set(S.spacing_names(tuple(doc["settings"]["ppl_counts"]))) <= set(rows)
    for name in S.spacing_names(tuple(doc["settings"]["ppl_counts"])):
        row = rows[name]
        assert row["ppl_delta_pct"] is not None and row["anchors"][0] == 0
        assert len(row["anchors"]) == int(name[-1])
        if row["same_as"] is not None:
            assert rows[row["same_as"]]["anchors"] == row["anchors"]
    for name in ["kascade_tiles", *S.spacing_names(tuple(doc["settings"]["needle_counts"]))]:
        assert set(rows[name]["needles"]) == set(S.HAYSTACKS_HELD_OUT)
        assert all(cell["n_cases"] == 2 for cell in rows[name]["needles"].values())
    runs = json.loads((tmp_path / "spacing_heldout_noise.json").read_text())
    assert runs["settings"]["seed"] == S.SELECTION_SEED
