"""`kascade_lite.llama8b` at smoke size: synthetic checkpoint written, loaded in bf16, prefill and decode of dense and
Kascade, the JSON complete, and the temporary checkpoint gone; its command line refuses what it cannot run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

from kascade_lite import llama8b

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_llama8b.py"


def test_smoke_run_writes_a_complete_json(tmp_path: Path) -> None:
    (tmp_path / "tmp").mkdir()
    llama8b.run_llama8b(tmp_path / "out", "test command", smoke=True, tmp=tmp_path / "tmp")
    doc = json.loads((tmp_path / "out" / "bench_llama8b_cpu.json").read_text())
    assert doc["provenance"]["smoke"] is True and doc["config"]["smoke"] is True
    assert doc["provenance"]["command"] == "test command"
    (row,) = doc["results"]
    assert row["context"] == 256 and row["decode_steps"] == 4 and row["checkpoint_bytes"] > 0
    assert row["write_s"] > 0 and row["load_s"] > 0
    for name in ("dense", "kascade"):
        pre, dec = row["prefill"][name], row["decode"][name]
        assert pre["finite"] and dec["finite"], name
        assert pre["seconds"] > 0 and len(dec["times_s"]) == 4 and dec["tokens_per_s"] == 1 / dec["median_s"]
    assert set(row["kascade_vs_dense"]) == {"prefill_speedup", "decode_speedup"}
    assert row["schedule"]["layer_types"] == ["dense", "reuse"]
    mem = row["memory"]
    assert set(mem["rss_gb"]) == {"before_load", "after_load", "after_prefill", "after_decode"}
    assert 0 < mem["rss_gb"]["after_load"] <= mem["peak_rss_gb"] and mem["within_target"]
    assert not list((tmp_path / "tmp").iterdir())  # the synthetic checkpoint is deleted


def test_synthetic_values_and_refusals(tmp_path: Path) -> None:
    bench = llama8b
    base = np.arange(10, dtype=np.float32).astype(ml_dtypes.bfloat16)
    w = bench.synthetic_tensor("layers.0.wq", (3, 4), base)
    assert w.dtype == ml_dtypes.bfloat16 and w.shape == (3, 4)
    np.testing.assert_array_equal(w, bench.synthetic_tensor("layers.0.wq", (3, 4), base))  # deterministic
    assert not np.array_equal(w, bench.synthetic_tensor("layers.1.wq", (3, 4), base))  # another offset
    assert (bench.synthetic_tensor("layers.0.attn_norm", (5,), base) == 1).all()
    for argv, message in ((["--layers", "2"], "--out is required"),  # a full-size run needs --out
                          (["--checkpoint", str(tmp_path), "--layers", "2", "--out", str(tmp_path)], "do not apply")):
        res = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=300)
        assert res.returncode == 2 and message in res.stderr, res.stderr
