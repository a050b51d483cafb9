"""Benchmark harness: timing bookkeeping, results files, the timed policies in the compiled model."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kascade_lite import bench as B
from kascade_lite.baselines import flash_dense_attention
from kascade_lite.config import LlamaConfig
from kascade_lite.kascade import KascadeAttention
from kascade_lite.model import KVCache, Llama, forward, make_forward
from kascade_lite.schedule import default_schedule

CFG = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                  head_dim=8, rope_theta=10_000.0)


def test_compare_runs_every_candidate_warmup_plus_reps_times():
    calls = {"a": 0, "b": 0}

    def make(name):
        def fn():
            calls[name] += 1
            return jnp.ones(3)
        return fn

    out = B.compare({"a": make("a"), "b": make("b")}, reps=3, warmup=2)
    assert calls == {"a": 5, "b": 5}
    for row in out.values():
        assert len(row["times_s"]) == 3 and row["min_s"] <= row["median_s"] and row["compile_s"] > 0
    assert B.speedup({"median_s": 2.0}, {"median_s": 0.5}) == 4.0
    with pytest.raises(ValueError):
        B.compare({"a": make("a")}, reps=0)


def test_results_round_trip_with_provenance(tmp_path):
    path = tmp_path / "r.json"
    B.write_results(path, "python x.py", {"tile": 32}, [{"context": 1}], smoke=True)
    doc = json.loads(path.read_text())
    assert doc["results"] == [{"context": 1}] and doc["provenance"]["command"] == "python x.py"
    assert "machine" in doc["provenance"] and "jax" in doc["provenance"]["versions"]
    assert doc["provenance"]["smoke"] is True and len(doc["provenance"]["load_average"]) == 3


def test_default_schedule():
    sched = default_schedule("llama-3.1-8b", 32, 8, 5, 32, 0.1)
    assert sched.layer_types.count("anchor") == 4 and sched.layer_types[0] == "dense"


def _model_and_tokens():
    model = Llama(CFG, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (1, 40)), jnp.int32)
    return model, tokens


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["flash", "kascade"])
def test_policies_match_dense_when_everything_is_kept(policy):
    """With a full budget, Kascade (key tiles, the gather path) is exact: same logits as dense, prefill and decode,
    through `model.forward` and `model.make_forward` alike."""
    model, tokens = _model_and_tokens()
    sched = default_schedule("tiny", CFG.num_layers, CFG.num_kv_heads, 2, 8, 1.0)
    pol = flash_dense_attention if policy == "flash" else KascadeAttention(sched, granularity="tile")
    empty = KVCache.empty(CFG, 1, 48)  # 6 tiles of 8
    ref_logits, ref_cache, _ = forward(model, tokens, empty)
    logits, cache, _ = forward(model, tokens, empty, pol)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4)
    step = tokens[:, -1:]
    np.testing.assert_allclose(forward(model, step, cache, pol)[0], forward(model, step, ref_cache)[0], atol=1e-4)
    np.testing.assert_allclose(make_forward(model, pol)(tokens, empty)[0], logits, atol=1e-5)


@pytest.mark.slow
def test_kascade_policy_is_sparse_and_carries_selections():
    model, tokens = _model_and_tokens()
    sched = default_schedule("tiny", CFG.num_layers, CFG.num_kv_heads, 2, 8, 0.25)
    pol = KascadeAttention(sched, granularity="tile")
    assert hash(pol) == hash(KascadeAttention(sched, granularity="tile"))
    logits, cache, carry = forward(model, tokens, KVCache.empty(CFG, 1, 48), pol)
    assert set(carry) == set(sched.anchors) and carry[0].idx.shape == (1, CFG.num_kv_heads, 1, 5, 1)
    dense_logits = forward(model, tokens, KVCache.empty(CFG, 1, 48))[0]
    assert np.isfinite(np.asarray(logits)).all() and not np.allclose(logits, dense_logits, atol=1e-4)
    _, _, carry = forward(model, tokens[:, -1:], cache, pol)
    assert carry[0].idx.shape == (1, CFG.num_kv_heads, 1, 1, 2)  # decode: ceil((ceil(0.25 * 48) - 1) / 8) tiles


def test_whole_model_ratio() -> None:
    assert B.whole_model_ratio(1.0, 1.0, 1.0) == 1.0
    assert B.whole_model_ratio(2.0, 2.0, 1.0, num_layers=4, num_anchors=1) == 8.0 / 6.0
    with pytest.raises(ValueError):
        B.whole_model_ratio(1.0, 1.0, 1.0, num_layers=4, num_anchors=4)


def test_cost_rows_and_roofline() -> None:
    from kascade_lite.cost import cost_rows, roofline_time

    rows = cost_rows("decode", 1024, 128, q_heads=32, kv_heads=8, head_dim=128)
    assert [r["layer"] for r in rows] == ["dense", "anchor", "reuse"]
    assert abs(rows[0]["FLOPs/byte"] - 2.0) < 1e-12  # 2g/b = 2 * 4 / 4 for float32
    assert roofline_time({"flops": 10.0, "bytes": 4.0}, peak_flops=5.0, bandwidth=1.0) == 4.0
    machine = B.measure_machine(8, 64, reps=1)
    assert machine["copy_gb_per_s"] > 0 and machine["read_gb_per_s"] > 0 and machine["matmul_gflop_per_s"] > 0
    times = {"a": {"median_s": 2.0}, "b": {"median_s": 0.5}}
    assert B.rates(times, {"a": 4e9, "b": 1e9}, "gb") == {"a": 2.0, "b": 2.0}


def test_model_step_cost_counts_weights_once_and_the_kv_each_layer_reads() -> None:
    from kascade_lite.config import SMOLLM2_135M as cfg
    from kascade_lite.cost import attention_cost, decode_ceiling, model_step_cost
    from kascade_lite.model import expected_shapes

    weights = sum(np.prod(s) for n, s in expected_shapes(cfg).items()) * 4
    dense = model_step_cost(cfg, 4096, phase="decode")
    kv = 2 * cfg.num_kv_heads * cfg.head_dim * 4096 * 4 * cfg.num_layers
    assert abs(dense["bytes"] - (weights + kv)) / dense["bytes"] < 1e-3    # norms aside, every weight once
    types = ["dense"] + ["anchor"] * 5 + ["reuse"] * 24
    sparse = model_step_cost(cfg, 4096, phase="decode", layer_types=types, keep_keys=410)
    per = {k: attention_cost("decode", k, 4096, 410, q_heads=9, kv_heads=3, head_dim=64)["bytes"]
           for k in ("dense", "anchor", "reuse")}
    assert sparse["bytes"] - (dense["bytes"] - kv) == per["dense"] + 5 * per["anchor"] + 24 * per["reuse"]
    assert decode_ceiling(cfg, 4096, num_anchor_layers=6, keep_keys=410) == dense["bytes"] / sparse["bytes"]
