"""The Schedule value type: broken files fail with clear messages naming the file and the field."""

from __future__ import annotations

import json

import pytest

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
