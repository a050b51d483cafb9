"""The speed benchmarks at smoke size: every candidate is timed and recorded (the GPU mode too, where on a CPU the
cuDNN baseline is recorded as skipped with its reason), the JSON is marked smoke, and the end-to-end rows carry the
bytes-moved ceiling. What they measure at full size is published by ``make bench`` / ``benchmarks/gpu.sh``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kascade_lite import speed
from kascade_lite.files import is_smoke


@pytest.mark.slow
def test_attention_benchmark_gpu_mode_on_cpu(tmp_path: Path) -> None:
    speed.run_attention(tmp_path, "test", smoke=True, gpu=True)
    assert not (tmp_path / "bench_attention_cpu.json").exists() and not (tmp_path / "bench_headline_cpu.json").exists()
    doc = json.loads((tmp_path / "bench_attention_gpu.json").read_text())
    assert is_smoke(doc) and doc["config"]["dtype"] == "bfloat16" and len(doc["provenance"]["load_average"]) == 3
    assert doc["config"]["machine"]["copy_gb_per_s"] > 0
    for row in doc["results"]:
        settings = {f"{g}@{b}" for g in ("position", "tile") for b in (0.1, 0.5)}
        want = {f"{kind}_{s}" for kind in ("anchor", "reuse") for s in settings}
        want |= {"dense", "dense_seq", "reuse_masked"} if row["phase"] == "decode" else set()
        assert want <= set(row["times"]), row["times"].keys()
        assert "cudnn" not in row["times"] and row["skipped"]["cudnn"].startswith("skipped: no cuDNN")
        s = row["speedup"]
        assert s["best_dense"] in row["times"] and set(s["vs_best"]) == settings
        assert all(v["reuse"] > 0 for v in s["vs_best"].values())
        rate = s["gb_per_s"] if row["phase"] == "decode" else s["gflop_per_s"]
        assert set(rate) == set(row["times"]) and min(rate.values()) > 0


@pytest.mark.slow
def test_e2e_benchmark_records_rates_ceilings_and_both_granularities(tmp_path: Path) -> None:
    speed.run_e2e(tmp_path, "test", smoke=True)
    doc = json.loads((tmp_path / "bench_e2e_cpu.json").read_text())
    assert is_smoke(doc) and doc["config"]["cache"] == "head-major"
    machine = doc["config"]["machine"]
    assert machine["copy_gb_per_s"] > 0 and machine["read_gb_per_s"] > 0 and machine["matmul_gflop_per_s"] > 0
    assert {(r["phase"], r["context"]) for r in doc["results"]} == {("decode", 256), ("decode", 512), ("prefill", 256)}
    for row in doc["results"]:
        sparse = {n for n in row["times"] if n.startswith("kascade_")}
        assert {row["settings"][n]["granularity"] for n in sparse} == {"position", "tile"}
        assert {row["settings"][n]["budget"] for n in sparse} == {0.1, 0.5}
        rate = row["gb_per_s"] if row["phase"] == "decode" else row["gflop_per_s"]
        assert set(rate) == set(row["times"]) and min(rate.values()) > 0
        if row["phase"] == "decode":
            assert row["ceiling"]["dense"] == 1 and all(row["ceiling"][n] >= 1 for n in sparse)
            assert all(row["of_ceiling"][n] == row["speedup"][n] / row["ceiling"][n] for n in sparse)
