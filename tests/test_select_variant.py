"""benchmarks/select_variant.py: the held-out choice between the paper's Kascade and kascade_sw (smoke size)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

from kascade_lite.schedule import default_schedule
from kascade_lite.tasks import mcnemar_p, paired_outcomes

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "select_variant.py"


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("select_variant", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _selection(folder: Path, num_layers: int = 4) -> Path:
    """A schedule_selection.json as select_schedule.py writes it, choosing an evenly spaced schedule."""
    sched = default_schedule("smollm2-135m", num_layers, 3, 2, 32, 0.1)
    (folder / "schedules").mkdir(parents=True)
    sched.save(folder / "schedules" / "smollm2-135m_evenly.json")
    settings = dict(tile_size=32, budget=0.1, min_keys=128, granularity="position", seq_len=256,
                    calibration=dict(wikitext_windows=2), held_out=dict(seed=2))
    path = folder / "schedule_selection.json"
    path.write_text(json.dumps(dict(settings=settings, chosen="evenly")))
    return path


def test_select_variant_smoke(tmp_path: Path) -> None:
    module = _module()
    module.main(["--smoke", "--selection", str(_selection(tmp_path / "sel")), "--out", str(tmp_path)])
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
    assert doc["recommended"] == module.recommend(rows, split[1], split[2], doc["paired"]["p"])


def test_recommend_rule() -> None:
    module = _module()
    rows = {"kascade": dict(ppl=10.0), "kascade_sw": dict(ppl=9.9)}
    assert module.recommend(rows, 8, 0, mcnemar_p(8, 0)) == "kascade_sw"
    assert module.recommend(rows, 5, 0, mcnemar_p(5, 0)) == "kascade"      # p = 0.0625: not significant
    rows["kascade_sw"]["ppl"] = 10.1
    assert module.recommend(rows, 8, 0, mcnemar_p(8, 0)) == "kascade"      # more needles, but worse perplexity


def test_missing_or_unfinished_selection_is_one_clear_error(tmp_path: Path) -> None:
    module = _module()
    with pytest.raises(FileNotFoundError, match="select_schedule.py"):
        module.load_selection(tmp_path / "schedule_selection.json", None)
    path = tmp_path / "schedule_selection.json"
    path.write_text(json.dumps({"settings": {}}))
    with pytest.raises(ValueError, match="no 'chosen' schedule"):
        module.load_selection(path, None)
