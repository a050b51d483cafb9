"""The accuracy harness at smoke size: the retrieval and perplexity files are complete, resumable, refuse unknown
methods before writing anything, and methods that share a prefill answer as they do alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kascade_lite import accuracy as A
from kascade_lite.data import load_tokenizer
from kascade_lite.methods import METHODS, build
from kascade_lite.model import dense_attention
from kascade_lite.models import smollm2_or_tiny
from kascade_lite.tasks import RetrievalMethod, answer_case, make_cases


def test_retrieval_smoke_run_is_complete_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "ret.json"
    # one of each kind: dense, both granularities, prefill and decode, the window on long prompts, a decode-only
    # baseline and a budget (quest and oracle_decode run below; tests/test_methods.py builds every method)
    names = ["dense", "kascade", "kascade_decode", "kascade_tiles", "sink_window", "tidal", "kascade_decode@0.3"]
    A.run_retrieval(out, "python benchmarks/bench_accuracy.py retrieval --smoke", names, smoke=True)
    doc = json.loads(out.read_text())
    assert doc["provenance"]["smoke"] is True
    assert [r["method"] for r in doc["results"]] == names
    assert all(r["n_cases"] == 2 and 0 <= r["accuracy"] <= 1 for r in doc["results"])
    assert all([c["index"] for c in r["cases"]] == [0, 1] for r in doc["results"]) and doc["skipped"] == []
    assert list(doc["settings"]["methods"]) == names and "30 %" in doc["settings"]["methods"]["kascade_decode@0.3"]
    with pytest.raises(ValueError, match="unknown method 'bogus'"):
        A.run_retrieval(tmp_path / "x.json", "test", ["dense", "bogus"], smoke=True)
    assert not (tmp_path / "x.json").exists()
    # resuming a finished run answers nothing again
    A.run_retrieval(out, "test --resume", names, smoke=True, resume=True)
    again = json.loads(out.read_text())
    assert again["results"] == doc["results"] and again["resumed_by"][0]["command"] == "test --resume"
    # redo drops one method's rows, measures them again on the same cases and says why; the others stay as they were
    A.run_retrieval(out, "test --redo", ["tidal"], smoke=True, resume=True, redo=("tidal",), note="rule fixed")
    redone = json.loads(out.read_text())
    assert [r["method"] for r in redone["results"]] == [m for m in names if m != "tidal"] + ["tidal"]
    assert [c["index"] for c in redone["results"][-1]["cases"]] == [0, 1]
    others = lambda d: [r for r in d["results"] if r["method"] != "tidal"]  # noqa: E731
    assert others(redone) == others(doc)
    assert any(n.startswith("tidal: earlier rows dropped") and "rule fixed" in n for n in redone["notes"])
    with pytest.raises(ValueError, match="none to resume"):
        A.run_retrieval(tmp_path / "new.json", "test", ["tidal"], smoke=True, resume=True, redo=("tidal",))
    # another haystack is a setting of its own file; the default task's settings are as they always were
    nat = A.run_retrieval(tmp_path / "natural.json", "test", ["dense", "kascade"], smoke=True,
                          haystack="wikitext-test", wording="varied")
    assert (nat["settings"]["haystack"], nat["settings"]["wording"]) == ("wikitext-test", "varied")
    assert "haystack" not in doc["settings"] and doc["settings"]["task"].startswith("single needle, RULER noise")
    # an adaptive method's K/V read is measured per case; a fixed one's is the rule's and not recorded
    ada = A.run_retrieval(tmp_path / "adaptive.json", "test", ["kascade_decode", "kascade_mass90_decode@0.5"],
                          smoke=True)
    fixed, mass = ada["results"]
    assert "kv_read_share" not in fixed and all(c["kv_read_share"] > 0 for c in mass["cases"])
    assert mass["kv_read_share"] == pytest.approx(np.mean([c["kv_read_share"] for c in mass["cases"]]), abs=1e-5)


def test_perplexity_smoke_run_and_resume(tmp_path: Path) -> None:
    out = tmp_path / "ppl.json"
    doc = A.run_perplexity(out, "test", smoke=True, time_budget=0)
    rows = doc["results"]
    assert [r["method"] for r in rows][:1] == ["dense"] and len(rows) == 4 and not doc["skipped"]
    assert all(r["ppl"] > 0 for r in rows) and rows[0]["delta_vs_dense_pct"] == 0
    assert set(doc["settings"]["methods"]) <= set(METHODS) and {"kascade", "quest"} <= set(doc["settings"]["methods"])
    again = A.run_perplexity(out, "test", smoke=True, resume=True)
    assert again["results"] == rows
    with pytest.raises(ValueError, match="same settings"):
        A.run_perplexity(out, "test", smoke=True, resume=True, batch_size=1)
    stored = json.loads(out.read_text())
    (name, sched), = stored["settings"]["schedules"].items()
    out.write_text(json.dumps({**stored, "settings": {**stored["settings"], "schedules": {}}}))
    assert A.run_perplexity(out, "test", smoke=True, resume=True)["results"] == rows     # a schedule written since
    changed = {name: {**sched, "budget": sched["budget"] / 2}}
    out.write_text(json.dumps({**stored, "settings": {**stored["settings"], "schedules": changed}}))
    with pytest.raises(ValueError, match=rf"--resume found the schedules \['{name}'\] changed"):
        A.run_perplexity(out, "test", smoke=True, resume=True)


def test_parse_options() -> None:
    assert A.parse_cases("2048:8,4096:4") == {2048: 8, 4096: 4}
    with pytest.raises(ValueError, match="--cases"):
        A.parse_cases("2048")
    assert A.parse_every("quest:2", ["dense", "quest"]) == {"quest": 2}
    with pytest.raises(ValueError, match="--every"):
        A.parse_every("tidal:2", ["dense", "quest"])


def test_methods_sharing_a_prefill_match_their_own_runs() -> None:
    """answer_case shares one prefill between methods with the same prefill attention: each method's output is
    what it gives when run alone, and the dense reference attention gives the flash kernel's answer."""
    tok = load_tokenizer()
    model = smollm2_or_tiny(smoke=True)
    case = make_cases(256, 1, seed=2, tokenizer=tok)[0]
    schedules = A.kascade_schedules(model)
    main = next(iter(schedules))
    methods = {m: build(m, schedules, main, length=256, **A.RETRIEVAL_SETTING)
               for m in ["dense", "kascade_decode", "quest", "kascade", "oracle_decode@0.5"]}
    together = answer_case(model, case, methods, tokenizer=tok)
    for name, method in methods.items():
        assert answer_case(model, case, {name: method}, tokenizer=tok)[name]["output"] == together[name]["output"]
    reference = answer_case(model, case, {"ref": RetrievalMethod(dense_attention, dense_attention)}, tokenizer=tok)
    assert reference["ref"]["output"] == together["dense"]["output"]

