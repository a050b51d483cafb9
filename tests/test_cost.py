"""cost.py: the attention cost table, whole-model attention time, and memory plans checked by hand arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kascade_lite import cost as C
from kascade_lite.schedule import default_schedule
from kascade_lite.config import LLAMA_3_1_8B, LLAMA_3_1_70B


def test_attention_cost() -> None:
    kw = dict(q_heads=32, kv_heads=8, head_dim=128)
    dense = C.attention_cost("decode", "dense", 32768, 3296, **kw)
    reuse = C.attention_cost("decode", "reuse", 32768, 3296, **kw)
    assert dense["bytes"] == 2 * 8 * 128 * 32768 * 4
    assert reuse["flops"] / dense["flops"] == pytest.approx(3296 / 32768)
    with pytest.raises(ValueError):
        C.attention_cost("decode", "bogus", 1, 1, **kw)


def test_whole_model_time() -> None:
    sched = default_schedule("llama-3.1-8b", 32, 8, 5, 32, 0.1)  # layer 0 dense, 4 anchors, 27 reuse layers
    assert C.whole_model_time(sched, 10.0, 5.0, 1.0) == 10 + 4 * 5 + 27 * 1


def test_memory_plan_matches_hand_arithmetic() -> None:
    # Llama-3.1-8B has 8 030 261 248 parameters, -70B 70 553 706 496 (sums of the published shapes)
    assert C.weight_bytes(LLAMA_3_1_8B, bytes_per_param=1) == 8_030_261_248
    assert C.weight_bytes(LLAMA_3_1_70B, bytes_per_param=1) == 70_553_706_496
    plan = C.memory_plan(LLAMA_3_1_8B, 131_072, num_anchor_layers=4, budget=0.1, min_keys=128)
    per_layer = 2 * 131_072 * 8 * 128 * 2                                     # K and V, bf16
    assert plan["kv_cache"] == 32 * per_layer                                   # 17.2 GB
    keys = int(np.ceil(0.1 * 131_072))
    sparse = 2 * keys * 8 * 128 * 2
    # layer 0 reads everything; 3 more anchors read every key plus their selection; 28 reuse layers the selection
    assert plan["kv_read_kascade"] == per_layer + 3 * (per_layer / 2 + sparse) + 28 * sparse
    split = C.memory_plan(LLAMA_3_1_8B, 131_072, model_size=8, num_anchor_layers=4)
    assert split["kv_cache"] == plan["kv_cache"] / 8
    replicated = 128_256 * 4096 + (2 * 32 + 1) * 4096                            # embed + norms
    assert split["weights"] == (replicated + (8_030_261_248 - replicated) / 8) * 2
    with pytest.raises(ValueError, match="model_size=3"):
        C.memory_plan(LLAMA_3_1_8B, 8192, model_size=3, num_anchor_layers=4)


def test_smallest_model_axis_grows_with_context() -> None:
    h100, v5e = C.ACCELERATORS["H100 80GB"], C.ACCELERATORS["TPU v5e 16GB"]
    assert C.smallest_model_axis(LLAMA_3_1_8B, 8192, h100, num_anchor_layers=4) == 1
    assert C.smallest_model_axis(LLAMA_3_1_8B, 8192, v5e, num_anchor_layers=4) == 2
    assert C.smallest_model_axis(LLAMA_3_1_70B, 131_072, v5e, num_anchor_layers=10) is None


def test_scaled_anchors_keep_relative_depth() -> None:
    sched = default_schedule("smollm2-135m", 30, 3, 6, 32, 0.1)
    assert sched.anchors == (0, 5, 10, 15, 20, 25)
    assert C.scaled_anchors(sched, 30) == [0, 5, 10, 15, 20, 25]
    assert C.scaled_anchors(sched, 32) == [0, 5, 11, 16, 21, 27]
    assert C.scaled_anchors(sched, 80) == [0, 13, 27, 40, 53, 67]


def test_selection_bytes() -> None:
    # decode: one row of Top-k positions per KV head (own key not stored); prefill: one row per query tile of 32
    decode = C.selection_bytes(LLAMA_3_1_8B, 131_072, phase="decode", budget=0.1, min_keys=128)
    assert decode == 8 * (13_108 - 1) * 5
    prefill = C.selection_bytes(LLAMA_3_1_8B, 131_072, phase="prefill", budget=0.1, min_keys=128)
    assert prefill == 8 * (131_072 // 32) * (13_108 - 32) * 5
    tiles = C.selection_bytes(LLAMA_3_1_8B, 131_072, phase="prefill", granularity="tile")
    assert tiles == 8 * 4096 * -(-(13_108 - 32) // 32) * 5
    with pytest.raises(ValueError, match="phase"):
        C.selection_bytes(LLAMA_3_1_8B, 8, phase="bogus")


def test_write_memory_plan(tmp_path: Path) -> None:
    path = tmp_path / "memory_plan.json"
    sched = default_schedule("smollm2-135m", 30, 3, 6, 32, 0.1)
    doc = C.write_memory_plan(path, command="pytest", smoke=False, schedule=sched, schedule_name="evenly",
                              budget=0.3, budget_note="a note")
    assert json.loads(path.read_text()) == json.loads(json.dumps(doc))
    assert doc["provenance"]["command"] == "pytest" and doc["provenance"]["smoke"] is False
    assert doc["assumptions"]["budget"] == 0.3 and doc["assumptions"]["schedule"] == "evenly"
    assert doc["assumptions"]["budget_note"] == "a note"
    assert set(doc["models"]) == {"llama-3.1-8b", "llama-3.1-70b"}
    assert doc["models"]["llama-3.1-70b"]["anchor_layers"] == C.scaled_anchors(sched, 80)
    assert doc["models"]["llama-3.1-8b"]["num_anchor_layers"] == 6
    rows = doc["models"]["llama-3.1-8b"]["rows"]
    assert [r["tokens"] for r in rows] == list(C.DEFAULT_PLAN_TOKENS)
    assert rows[0]["H100 80GB"]["model_axis"] == 1 and rows[0]["TPU v5e 16GB"]["model_axis"] == 2
    assert all(0 < r["kv_read_ratio"] < 1 for r in rows)
