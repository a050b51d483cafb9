"""Property tests (Hypothesis) not covered elsewhere, and determinism.

Already covered: Kascade's fast path = its oracles and a full budget = dense (``test_kascade.py``), RoPE norms and
relative positions (``test_rope.py``), head maps in range and DP optimality (``test_search.py``). Here: any
valid schedule round-trips through JSON; our safetensors writer and reader agree on any shape/dtype and row slice;
randomly damaged safetensors and GGUF headers give a `ValueError` (or load), never another exception; the same seed gives the same calibration,
schedule and figure data.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_checkpoints import TINY, write_gguf

from kascade_lite.calibrate import calibrate, write_coverage_json
from kascade_lite.checkpoints import SafetensorsFile, open_checkpoint
from kascade_lite.convert import write_safetensors
from kascade_lite.model import Llama
from kascade_lite.schedule import Schedule
from kascade_lite.search import dp_schedule, greedy_schedule

TMP = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def schedules(draw) -> Schedule:
    layers, heads = draw(st.integers(1, 12)), draw(st.integers(1, 4))
    anchors = draw(st.sets(st.integers(1, max(layers - 1, 1)), max_size=layers))
    head_map = draw(st.lists(st.lists(st.integers(0, heads - 1), min_size=heads, max_size=heads),
                             min_size=layers, max_size=layers))
    return Schedule.from_anchors(draw(st.text(min_size=1, max_size=8)), layers, heads, sorted(anchors),
                                 head_map=head_map, tile_size=draw(st.sampled_from([1, 16, 32, 64])),
                                 budget=draw(st.floats(1e-4, 1.0)), min_keys=draw(st.integers(0, 512)),
                                 method=draw(st.sampled_from(["dp", "greedy", "manual"])),
                                 meta={"note": draw(st.text(max_size=10))})


@given(schedules())
def test_schedule_json_round_trip(sched: Schedule) -> None:
    again = Schedule.from_dict(json.loads(json.dumps(sched.to_dict())))
    assert again == sched and again.meta == sched.meta
    assert all(0 <= a <= layer for layer, a in enumerate(again.anchor_of))


@TMP
@given(shape=st.lists(st.integers(1, 6), min_size=0, max_size=3), dtype=st.sampled_from(
    [np.float32, np.float16, ml_dtypes.bfloat16, np.float64]), seed=st.integers(0, 1000), data=st.data())
def test_safetensors_write_read_round_trip(tmp_path: Path, shape, dtype, seed, data) -> None:
    from safetensors.numpy import load_file

    arr = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    other = np.arange(3, dtype=dtype)
    path = tmp_path / "x.safetensors"
    write_safetensors(path, ["a", "b"], {"a": arr.shape, "b": other.shape}, dtype, {"a": arr, "b": other}.get)
    f = SafetensorsFile(path)
    np.testing.assert_array_equal(f.read("a"), arr)
    np.testing.assert_array_equal(load_file(str(path))["a"], arr)  # the reference reader agrees
    if shape:
        r0 = data.draw(st.integers(0, shape[0]))
        r1 = data.draw(st.integers(r0, shape[0]))
        np.testing.assert_array_equal(f.read("a", slice(r0, r1)), arr[r0:r1])


@pytest.fixture(scope="module")
def good_safetensors(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("st") / "ok.safetensors"
    arrays = {"w": np.ones((4, 3), np.float32), "b": np.zeros(5, np.float32)}
    write_safetensors(path, ["w", "b"], {k: v.shape for k, v in arrays.items()}, np.float32, arrays.get)
    return path.read_bytes()


@TMP
@given(edits=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=4),
       cut=st.one_of(st.none(), st.integers(0, 150)))
def test_damaged_safetensors_is_a_value_error(tmp_path: Path, good_safetensors: bytes, edits, cut) -> None:
    data = bytearray(good_safetensors)
    for at, byte in edits:
        data[at % len(data)] = byte
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(bytes(data if cut is None else data[:cut]))
    try:
        f = SafetensorsFile(path)
    except ValueError as e:
        assert str(path) in str(e)
        return
    for key in f.keys():  # a header that passed validation reads without surprises
        assert f.read(key).size == int(np.prod(f.shape(key)))


@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory) -> bytes:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "ok.gguf", replace(TINY, num_layers=1)).read_bytes()


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), min_size=1, max_size=4))
def test_damaged_gguf_header_is_a_value_error(tmp_path: Path, good_gguf: bytes, edits) -> None:
    data = bytearray(good_gguf)
    for at, byte in edits:  # the metadata and tensor infos live in the first ~2 kB
        data[at] = byte
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(bytes(data))
    try:
        open_checkpoint(path).close()
    except ValueError as e:
        assert str(path) in str(e)


# ------------------------------------------------------------------------------------------------ determinism
def calibrate_seeded(seed: int):
    from flax import nnx

    cfg = replace(TINY, num_layers=3)
    model = Llama(cfg, rngs=nnx.Rngs(seed))
    seqs = np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, 32))
    return calibrate(model, seqs, tile_size=8, budget=0.25, model_name="tiny", progress=False)


def test_same_seed_same_calibration_schedule_and_figure_data(tmp_path: Path) -> None:
    a, b = calibrate_seeded(7), calibrate_seeded(7)
    for name in ("similarity", "importance", "coverage", "tile_coverage"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    for make in (lambda c: dp_schedule(c, 2), greedy_schedule):
        assert json.dumps(make(a).to_dict()) == json.dumps(make(b).to_dict())
    write_coverage_json(a, tmp_path / "a.json", "pytest", smoke=True)
    write_coverage_json(b, tmp_path / "b.json", "pytest", smoke=True)
    strip = lambda p: {k: v for k, v in json.loads(p.read_text()).items() if k != "provenance"}  # noqa: E731
    assert strip(tmp_path / "a.json") == strip(tmp_path / "b.json")
    assert not np.array_equal(calibrate_seeded(8).importance, a.importance)  # the seed matters
