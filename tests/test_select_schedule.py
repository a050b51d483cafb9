"""benchmarks/select_schedule.py at smoke size: calibration, every candidate schedule, the two stages, the choice."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from kascade_lite.schedule import Schedule

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "select_schedule.py"


@pytest.mark.slow
def test_select_schedule_smoke(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("select_schedule", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--smoke", "--quiet", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "schedule_selection.json").read_text())
    assert doc["provenance"]["smoke"] is True
    rows = doc["candidates"]
    assert {"dp_k2", "dpimp_k2", "greedy"} <= set(rows)
    assert all("decode_only_correct" in r and r["ppl"] > 0 for r in rows.values())
    finalists = [n for n, r in rows.items() if "retrieval_correct" in r]
    assert len(finalists) == 2 and doc["chosen"] in finalists
    assert doc["chosen"] == module.choose({n: rows[n] for n in finalists})
    for name in rows:
        sched = Schedule.load(tmp_path / "schedules" / f"smollm2-135m_{name}.json")
        assert list(sched.anchors) == rows[name]["anchors"]
    cal = json.loads((tmp_path / "calibration" / "smollm2-135m-2k.json").read_text())
    assert cal["provenance"]["smoke"] is True and cal["settings"]["k_prev"] > 0


def test_choice_rule() -> None:
    spec = importlib.util.spec_from_file_location("select_schedule", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = {"a": dict(retrieval_correct=3, ppl=10.0, num_anchors=5), "b": dict(retrieval_correct=3, ppl=9.0,
            num_anchors=8), "c": dict(retrieval_correct=2, ppl=1.0, num_anchors=2)}
    assert module.choose(rows) == "b"
    rows["b"]["ppl"] = 10.0
    assert module.choose(rows) == "a"  # fewer anchors break the tie
