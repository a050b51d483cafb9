"""sharding.py: partition rules, head-map localisation, and the sharded model on a fake 8-device CPU mesh.

The mesh tests need ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before JAX is imported, but other test
files import JAX first in the same pytest process. So `test_sharded_suite_in_subprocess` re-runs this file in a fresh
interpreter with the flag set and ``KASCADE_MESH_TEST=1``; only there do the ``test_mesh_*`` tests run (here they
are skipped, and their results show in that one test).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from kascade_lite import sharding as S
from kascade_lite.config import LLAMA_3_1_8B, SMOLLM2_135M, LlamaConfig, RopeScaling
from kascade_lite.model import Llama, expected_shapes
from kascade_lite.schedule import Schedule
from kascade_lite.kascade import KascadeAttention

IN_MESH = os.environ.get("KASCADE_MESH_TEST") == "1"
mesh_only = pytest.mark.skipif(not IN_MESH, reason="runs in the 8-device subprocess (test_sharded_suite_in_subprocess)")

TINY = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=4, num_heads=16,
                   num_kv_heads=8, head_dim=16, rope_scaling=RopeScaling(), max_position_embeddings=256)
"""Llama-3.1-shaped (8 KV heads, groups of 2, llama3 RoPE scaling), small enough to compile in seconds."""


def tiny_schedule(head_map: list[list[int]] | None = None) -> Schedule:
    return Schedule.from_anchors("tiny", TINY.num_layers, TINY.num_kv_heads, [2], head_map=head_map, tile_size=4,
                                 budget=0.25, min_keys=2)


CROSSING = [list(range(8)), [7, 6, 5, 4, 3, 2, 1, 0], list(range(8)), [1, 0, 3, 2, 5, 4, 7, 6]]
"""Layer 1 reads anchor heads on other devices (for a model axis of 2, 4 or 8); layer 3 stays within pairs."""


def trimmed(spec: P) -> tuple:
    """A spec without trailing ``None`` (JAX drops them on outputs: ``P('data', None, 'model', None)`` prints as
    ``P('data', None, 'model')``)."""
    parts = list(spec)
    while parts and parts[-1] is None:
        parts.pop()
    return tuple(parts)


# ------------------------------------------------------------------------------------------------ rules (no mesh)
def test_param_spec_rules_cover_every_tensor() -> None:
    specs = S.param_specs(LLAMA_3_1_8B)
    assert set(specs) == set(expected_shapes(LLAMA_3_1_8B))
    assert specs["layers.7.wq"] == specs["layers.7.wk"] == specs["layers.7.wv"] == P(None, "model")
    assert specs["layers.7.wo"] == specs["layers.7.w_down"] == P("model", None)
    assert specs["layers.7.w_gate"] == specs["layers.7.w_up"] == specs["lm_head"] == P(None, "model")
    assert specs["embed"] == specs["final_norm"] == specs["layers.0.attn_norm"] == P()
    with pytest.raises(ValueError, match="no sharding rule"):
        S.param_spec("layers.0.bias")


def test_head_map_localisation() -> None:
    sched = tiny_schedule(CROSSING)
    assert [(layer, h) for layer, h, _ in S.cross_device_reads(sched, 4)] == [(1, h) for h in range(8)]
    assert S.cross_device_reads(sched, 1) == []
    local, perms = S.localize_head_map(sched, 4)
    assert set(perms) == {1} and S.cross_device_reads(local, 4) == []
    assert local.head_map[3] == sched.head_map[3]
    # two heads of device 0 reading the same anchor head: three heads would need device 0's two slots
    assert S.local_permutation([0, 0, 1, 2, 3, 4, 5, 6], 8, 4) is None
    assert S.local_permutation([2, 3, 0, 1, 4, 5, 6, 7], 8, 4) == (2, 3, 0, 1, 4, 5, 6, 7)


def test_permuted_heads_leave_outputs_unchanged() -> None:
    """Renumbering a reuse layer's KV heads (with its query heads) plus the localised head map is the same model."""
    prompt = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 12))
    sched = tiny_schedule(CROSSING)
    _, want = S.greedy_logits(Llama(TINY, rngs=nnx.Rngs(0)), prompt, 2, attention=KascadeAttention(sched))
    local, perms = S.localize_head_map(sched, 4)
    model = Llama(TINY, rngs=nnx.Rngs(0))
    for layer, perm in perms.items():
        S.permute_kv_heads(model, layer, perm)
    _, got = S.greedy_logits(model, prompt, 2, attention=KascadeAttention(local))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="not a permutation"):
        S.permute_kv_heads(model, 1, [0, 0, 1, 2, 3, 4, 5, 6])


@pytest.mark.slow
def test_sharded_suite_in_subprocess() -> None:
    if IN_MESH:
        pytest.skip("already inside the mesh subprocess")
    flags = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", "KASCADE_MESH_TEST": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-x", "-k", "test_mesh_",
                             "-p", "no:cacheprovider"], env=env, capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1], timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1], result.stdout[-2000:]


# ------------------------------------------------------------------------------------------------ on the 8-device mesh
@pytest.fixture(scope="module")
def prompt() -> np.ndarray:
    return np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 24))


@pytest.fixture(scope="module")
def dense_reference(prompt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return S.greedy_logits(Llama(TINY, rngs=nnx.Rngs(0)), prompt, 3)


def sharded_tiny(data: int, model: int):
    mesh = S.make_mesh(data, model)
    return mesh, S.shard_model(Llama(TINY, rngs=nnx.Rngs(0)), mesh)


@mesh_only
def test_mesh_has_eight_devices() -> None:
    assert len(jax.devices()) == 8
    mesh = S.make_mesh(2, 3)
    assert dict(mesh.shape) == {"data": 2, "model": 3}
    with pytest.raises(ValueError, match="needs 12 devices"):
        S.make_mesh(2, 6)


@mesh_only
def test_mesh_param_and_cache_shardings_are_the_documented_ones(prompt: np.ndarray) -> None:
    mesh, model = sharded_tiny(2, 4)
    assert S.model_specs(model) == S.param_specs(TINY)
    assert model.inv_freq.get_value().sharding.spec == P()
    cache = S.empty_sharded_cache(TINY, mesh, 2, 32)
    logits, cache = S.sharded_forward(model, S.shard_tokens(prompt, mesh), cache, mesh=mesh)
    for arr in cache.k + cache.v:
        assert trimmed(arr.sharding.spec) == ("data", "model")
        assert arr.addressable_shards[0].data.shape == (1, 2, 32, TINY.head_dim)  # 1 row, 2 of the 8 KV heads
    assert trimmed(logits.sharding.spec) == ("data", None, "model")
    assert S.cache_spec(mesh, 1) == P(None, "model", None, None)  # batch 1 cannot split over data=2


@mesh_only
@pytest.mark.parametrize("data, model", [(2, 4), (1, 8)])
def test_mesh_dense_matches_single_device(data: int, model: int, prompt: np.ndarray, dense_reference) -> None:
    mesh, sharded = sharded_tiny(data, model)
    tokens, logits = S.greedy_logits(sharded, prompt, 3, mesh=mesh)
    np.testing.assert_allclose(logits, dense_reference[1], atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(tokens, dense_reference[0])


@mesh_only
def test_mesh_megatron_pairs_need_two_all_reduces_per_layer(prompt: np.ndarray) -> None:
    mesh, model = sharded_tiny(2, 4)
    cache = S.empty_sharded_cache(TINY, mesh, 2, 32)
    hlo = S.sharded_forward.lower(model, S.shard_tokens(prompt, mesh), cache, mesh=mesh).compile().as_text()
    counts = S.collective_counts(hlo)
    assert counts["all-reduce"] == 2 * TINY.num_layers and counts["all-gather"] == 0, counts


@mesh_only
@pytest.mark.parametrize("head_map", [None, CROSSING], ids=["local", "crossing"])
def test_mesh_kascade_matches_single_device(head_map, prompt: np.ndarray) -> None:
    attention = KascadeAttention(tiny_schedule(head_map))
    want_tokens, want = S.greedy_logits(Llama(TINY, rngs=nnx.Rngs(0)), prompt, 2, attention=attention)
    mesh, model = sharded_tiny(2, 4)
    tokens, got = S.greedy_logits(model, prompt, 2, mesh=mesh, attention=attention)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(tokens, want_tokens)
    cache = S.empty_sharded_cache(TINY, mesh, 2, prompt.shape[1] + 2)
    hlo = S.sharded_forward.lower(model, S.shard_tokens(prompt, mesh), cache, mesh=mesh,
                                  attention=S.shard_attention(attention, mesh)).compile().as_text()
    gathers = S.collective_counts(hlo)["all-gather"]
    # local head map: indices never leave their device; crossing: one gather of (idx, keep) for layer 1
    assert gathers == (0 if head_map is None else 2)


@mesh_only
def test_mesh_localised_schedule_matches_and_needs_no_gather(prompt: np.ndarray) -> None:
    sched = tiny_schedule(CROSSING)
    _, want = S.greedy_logits(Llama(TINY, rngs=nnx.Rngs(0)), prompt, 2, attention=KascadeAttention(sched))
    local, perms = S.localize_head_map(sched, 4)
    mesh = S.make_mesh(2, 4)
    model = Llama(TINY, rngs=nnx.Rngs(0))
    for layer, perm in perms.items():
        S.permute_kv_heads(model, layer, perm)
    S.shard_model(model, mesh)
    _, got = S.greedy_logits(model, prompt, 2, mesh=mesh, attention=KascadeAttention(local))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@mesh_only
def test_mesh_smollm2_shape_on_a_2x3_submesh() -> None:
    """SmolLM2's 3 KV heads: a model axis of 3 on 6 of the 8 devices (2 layers and a small vocabulary; real widths)."""
    cfg = dataclasses.replace(SMOLLM2_135M, num_layers=2, vocab_size=3072)
    prompt = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 10))
    _, want = S.greedy_logits(Llama(cfg, rngs=nnx.Rngs(0)), prompt, 2)
    mesh = S.make_mesh(2, 3)
    model = S.shard_model(Llama(cfg, rngs=nnx.Rngs(0)), mesh)
    _, got = S.greedy_logits(model, prompt, 2, mesh=mesh)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert S.model_specs(model)["embed"] == P()  # tied: the one table is replicated
    with pytest.raises(ValueError, match="num_kv_heads=3 is not divisible"):
        S.shard_model(Llama(cfg, rngs=nnx.Rngs(0)), S.make_mesh(2, 4))
