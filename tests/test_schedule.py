"""The Schedule value type: broken files fail with clear messages naming the file and the field."""

from __future__ import annotations

import json

import pytest

from kascade_lite.files import shipped_dir
from kascade_lite.schedule import Schedule


def valid_dict() -> dict:
    return Schedule.from_anchors("m", 4, 2, [2], head_map=[[0, 1], [1, 0], [0, 1], [1, 1]]).to_dict()


@pytest.mark.parametrize("change, message", [
    (dict(version=2), "version 2 is not supported"),
    (dict(anchor_of=[0, 2, 2, 2]), "reuse layer 1 points at anchor_of=2"),
    (dict(layer_types=["dense", "reuse", "reuse", "reuse"], anchor_of=[0, 0, 1, 0]),
     "reuse layer 2 points at anchor_of=1"),
    (dict(head_map=[[0, 1], [1, 2], [0, 1], [1, 1]]), r"head_map\[1\]=\[1, 2\] must hold 2 heads in \[0, 2\)"),
    (dict(num_layers=5), "layer_types has 4 entries, expected num_layers=5"),
    (dict(layer_types=["anchor", "reuse", "anchor", "reuse"]), "layer 0 must be 'dense'"),
])
def test_validation_errors_are_clear(tmp_path, change: dict, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(valid_dict() | change))
    with pytest.raises(ValueError, match=message) as err:
        Schedule.load(path)
    assert str(path) in str(err.value)


def test_unreadable_schedule(tmp_path) -> None:
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read schedule JSON"):
        Schedule.load(path)


def with_budgets(rows: list) -> dict:
    return valid_dict() | dict(head_budgets=rows)


GOOD_BUDGETS = [[0.5, 2.0], [2.0, 0.5], [1.5, 0.25], [0.25, 0.25]]  # reuse rows 1 and 3 inherit through head_map


@pytest.mark.parametrize("rows, message", [
    ([[1.0, 1.0]] * 3, r"head_budgets must be \[num_layers=4\]\[num_kv_heads=2\]"),
    ([[1.0, 1.0, 1.0]] * 4, r"head_budgets must be \[num_layers=4\]\[num_kv_heads=2\]"),
    ([[0.5, 0.0], [0.0, 0.5], [1.0, 1.0], [1.0, 1.0]], r"head_budgets\[0\]=\[0.5, 0.0\] must be finite positive"),
    ([[0.5, float("inf")], [2.0, 0.5], [1.0, 1.0], [1.0, 1.0]], r"head_budgets\[0\].* must be finite positive"),
    ([[0.5, 2.0], [0.5, 2.0], [1.5, 0.25], [0.25, 0.25]],
     r"head_budgets\[1\]=\[0.5, 2.0\] of a reuse layer must repeat what it inherits through head_map\[1\]=\[1, 0\]"),
    ([["a", 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]], "head_budgets must be"),
])
def test_head_budget_errors_are_clear(tmp_path, rows: list, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(with_budgets(rows)))
    with pytest.raises(ValueError, match=message) as err:
        Schedule.load(path)
    assert str(path) in str(err.value)


def test_head_budgets_round_trip_and_old_files_stay_byte_identical(tmp_path) -> None:
    """Head budgets survive to_dict / JSON / load; a schedule without them has no such key, and every shipped schedule
    file is written back byte for byte."""
    sched = Schedule.from_dict(with_budgets(GOOD_BUDGETS))
    path = tmp_path / "hb.json"
    sched.save(path)
    again = Schedule.load(path)
    assert again == sched and again.head_budgets == tuple(tuple(r) for r in GOOD_BUDGETS)
    assert json.loads(path.read_text())["head_budgets"] == GOOD_BUDGETS
    plain = Schedule.from_dict(valid_dict())
    assert plain.head_budgets is None and "head_budgets" not in plain.to_dict() and plain != sched
    for shipped in sorted((shipped_dir() / "schedules").glob("*.json")):
        copy = tmp_path / shipped.name
        Schedule.load(shipped).save(copy)
        assert copy.read_bytes() == shipped.read_bytes(), shipped.name
