"""Anchor search: the DP is optimal (against brute force), the greedy rule does what it says, schedules built from a
calibration are valid (head maps in range) and round-trip through JSON, and `kascade-lite schedule` writes them."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kascade_lite.calibrate import COVERAGE_FRACTIONS, Calibration
from kascade_lite.schedule import Schedule
from kascade_lite.search import (anchors_score, dp_anchors, dp_schedule, even_schedule, greedy_anchors,
                                 greedy_schedule, write_schedules)


def fake_calibration(seed: int, layers: int = 6, heads: int = 3) -> Calibration:
    """Random but well-formed statistics: similarity in [0, 1] for a <= b with self-similarity 1."""
    rng = np.random.default_rng(seed)
    sim = rng.random((layers, layers, heads, heads)).astype(np.float32)
    for a in range(layers):
        sim[a, a][np.diag_indices(heads)] = 1.0
    sim[np.tril_indices(layers, k=-1)] = 0.0
    F = len(COVERAGE_FRACTIONS)
    return Calibration(similarity=sim, importance=rng.random(layers).astype(np.float32),
                       coverage=np.sort(rng.random((layers, heads, F)), axis=-1).astype(np.float32),
                       coverage_fractions=np.asarray(COVERAGE_FRACTIONS, np.float32),
                       tile_coverage=rng.random((layers, heads)).astype(np.float32),
                       settings=dict(model="fake", tile_size=16, budget=0.2, num_sequences=1))


def brute_force(weights: np.ndarray, k: int) -> float:
    L = weights.shape[0]
    return max(anchors_score(weights, (0, *rest)) for rest in itertools.combinations(range(1, L), k - 1))


@pytest.mark.parametrize("layers", [1, 2, 5, 8])
def test_dp_is_optimal_against_brute_force(layers: int, rng: np.random.Generator) -> None:
    for _ in range(5):
        weights = rng.random((layers, layers))
        for k in range(1, layers + 1):
            anchors, score = dp_anchors(weights, k)
            assert len(anchors) == k and anchors[0] == 0 and list(anchors) == sorted(set(anchors))
            assert score == pytest.approx(anchors_score(weights, anchors))
            assert score == pytest.approx(brute_force(weights, k))


@given(st.integers(2, 7), st.integers(0, 10_000))
def test_dp_optimal_property(layers: int, seed: int) -> None:
    weights = np.random.default_rng(seed).normal(size=(layers, layers))  # negative weights too
    k = 1 + seed % layers
    assert dp_anchors(weights, k)[1] == pytest.approx(brute_force(weights, k))


def test_dp_prefers_the_obvious_boundary() -> None:
    """Two blocks of mutually similar layers: the second anchor goes where the second block starts."""
    sim = np.full((6, 6), 0.1)
    sim[:3, :3] = sim[3:, 3:] = 1.0
    assert dp_anchors(sim, 2)[0] == (0, 3)


def test_dp_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="num_anchors=0"):
        dp_anchors(np.ones((4, 4)), 0)
    with pytest.raises(ValueError, match="square"):
        dp_anchors(np.ones((4, 3)), 2)
    with pytest.raises(ValueError, match="include layer 0"):
        anchors_score(np.ones((4, 4)), (1, 2))


def test_greedy_rules() -> None:
    ones = np.ones((12, 12))
    assert greedy_anchors(ones, max_reuse_dist=4, threshold=0.1) == (0, 5, 10)   # distance limit
    assert greedy_anchors(ones, max_reuse_dist=20, threshold=0.1) == (0,)
    low = ones.copy()
    low[0, 2] = 0.05                                                            # below threshold: new anchor
    assert greedy_anchors(low, max_reuse_dist=4, threshold=0.1) == (0, 2, 7)
    with pytest.raises(ValueError, match="max_reuse_dist"):
        greedy_anchors(ones, max_reuse_dist=0)


def test_dp_objectives_differ_only_by_the_importance_weights() -> None:
    calib = fake_calibration(1, layers=12)
    sim = calib.layer_similarity()
    for k in (2, 4):
        plain, weighted = dp_schedule(calib, k), dp_schedule(calib, k, objective="importance")
        assert plain.anchors == dp_anchors(sim, k)[0]
        assert weighted.anchors == dp_anchors(sim * calib.importance[None, :], k)[0]
        assert dict(plain.meta)["objective"] == "similarity" and dict(weighted.meta)["objective"] == "importance"
    with pytest.raises(ValueError, match="objective"):
        dp_schedule(calib, 2, objective="bogus")


def test_schedules_from_calibration_use_argmax_head_maps() -> None:
    calib = fake_calibration(0)
    sched = dp_schedule(calib, 3)
    assert sched.method == "dp" and len(sched.anchors) == 3 and sched.layer_types[0] == "dense"
    hash(sched)  # a static argument of the jitted forward: meta (dicts) must not enter the hash
    assert (sched.tile_size, sched.budget, sched.min_keys, sched.model) == (16, 0.2, 128, "fake")
    for b, (t, a) in enumerate(zip(sched.layer_types, sched.anchor_of)):
        want = calib.similarity[a, b].argmax(axis=-1).tolist() if t == "reuse" else [0, 1, 2]
        assert list(sched.head_map[b]) == want
    greedy = greedy_schedule(calib, max_reuse_dist=2)
    assert greedy.method == "greedy" and all(b - a <= 2 for b, a in enumerate(greedy.anchor_of))


@given(st.integers(0, 10_000), st.integers(1, 4), st.integers(1, 8))
def test_head_maps_always_in_range(seed: int, heads: int, k: int) -> None:
    calib = fake_calibration(seed, layers=8, heads=heads)
    for sched in (dp_schedule(calib, k), greedy_schedule(calib, threshold=0.5)):
        assert all(0 <= h < heads for row in sched.head_map for h in row)
        assert Schedule.from_dict(sched.to_dict()) == sched


def test_write_schedules_round_trip(tmp_path) -> None:
    calib = fake_calibration(3, layers=10)
    paths = write_schedules(calib, tmp_path, anchor_counts=(2, 3), command="pytest", smoke=True)
    assert [p.name for p in paths] == ["fake_dp_k2.json", "fake_dp_k3.json", "fake_dpimp_k2.json",
                                       "fake_dpimp_k3.json", "fake_greedy.json", "fake_greedy_t90.json",
                                       "fake_even_k2.json", "fake_even_k3.json"]
    for path in paths:
        loaded = Schedule.load(path)
        objective = "importance" if "dpimp" in path.stem else "similarity"
        want = (dp_schedule(calib, int(path.stem[-1]), objective=objective) if "dp" in path.stem
                else even_schedule(calib, int(path.stem[-1])) if "even" in path.stem
                else greedy_schedule(calib, threshold=0.9) if path.stem.endswith("_t90") else greedy_schedule(calib))
        assert loaded == want
        prov = json.loads(path.read_text())["meta"]["provenance"]
        assert prov["command"] == "pytest" and prov["smoke"] is True


def test_schedule_command_line(tmp_path, capsys) -> None:
    """`kascade-lite schedule` (the one entry point; the module has no main): a smoke calibration makes smoke
    schedules with the smoke key floor."""
    from kascade_lite.cli import main
    from kascade_lite.schedule import SMOKE_MIN_KEYS

    fake_calibration(5, layers=9).save(tmp_path / "fake", command="pytest", smoke=True)
    assert main(["schedule", "--calibration", str(tmp_path / "fake.safetensors"), "--out", str(tmp_path)]) == 0
    written = sorted((tmp_path / "data" / "schedules").iterdir())
    assert [p.name for p in written] == ([f"fake_dp_k{k}.json" for k in range(2, 9)]
                                         + [f"fake_dpimp_k{k}.json" for k in range(2, 9)]
                                         + [f"fake_even_k{k}.json" for k in range(2, 9)]
                                         + ["fake_greedy.json", "fake_greedy_t90.json"])
    assert "anchors [0" in capsys.readouterr().out
    doc = json.loads(written[0].read_text())
    assert doc["meta"]["provenance"]["smoke"] is True and doc["min_keys"] == SMOKE_MIN_KEYS


def test_even_schedule_is_the_dp_control() -> None:
    """Evenly spaced anchors (layer 0 counted) with the calibration's head maps: only the placement differs from
    the DP's schedule at the same K."""
    from kascade_lite.schedule import evenly_spaced

    assert evenly_spaced(30, 6) == (0, 5, 10, 15, 20, 25) and evenly_spaced(30, 1) == (0,)
    with pytest.raises(ValueError, match="num_anchors"):
        evenly_spaced(6, 7)
    calib = fake_calibration(4, layers=12)
    even, dp = even_schedule(calib, 4), dp_schedule(calib, 4)
    assert even.anchors == (0, 3, 6, 9) and even.method == "even" and len(dp.anchors) == 4
    for layer, (kind, anchor) in enumerate(zip(even.layer_types, even.anchor_of)):
        want = calib.head_map(anchor, layer) if kind == "reuse" else list(range(calib.num_kv_heads))
        assert list(even.head_map[layer]) == want


def test_shipped_greedy_schedule_is_evenly_spaced() -> None:
    """On SmolLM2's calibration the greedy rule's threshold never fires: its schedule is the evenly spaced one
    with six anchors (the finding chapter 06 states)."""
    from kascade_lite.files import shipped_dir

    path = shipped_dir() / "calibration" / "smollm2-135m-2k.safetensors"
    if not path.is_file():
        pytest.skip("no shipped calibration")
    calib = Calibration.load(path)
    greedy = Schedule.load(shipped_dir() / "schedules" / "smollm2-135m_greedy.json")
    even = even_schedule(calib, 6)
    assert (even.layer_types, even.anchor_of, even.head_map) == (greedy.layer_types, greedy.anchor_of,
                                                                 greedy.head_map)
