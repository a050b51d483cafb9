"""LlamaConfig: presets, round trips through our JSON and Hugging Face / Meta forms, and clear errors."""

import dataclasses
import json

import pytest

from kascade_lite.config import LLAMA_3_1_8B, LLAMA_3_1_70B, PRESETS, SMOLLM2_135M, LlamaConfig, RopeScaling


def test_presets_match_published_architectures() -> None:
    c = LLAMA_3_1_8B
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.group_size) == (32, 32, 8, 128, 4)
    assert c.rope_theta == 500_000.0 and c.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    s = SMOLLM2_135M
    assert (s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim, s.group_size) == (30, 9, 3, 64, 3)
    b = LLAMA_3_1_70B
    assert (b.num_layers, b.num_heads, b.num_kv_heads, b.head_dim, b.group_size) == (80, 64, 8, 128, 8)
    assert set(PRESETS) == {"llama-3.1-8b", "llama-3.1-70b", "smollm2-135m"}


@pytest.mark.parametrize("cfg", list(PRESETS.values()))
def test_round_trips(cfg: LlamaConfig, tmp_path) -> None:
    assert LlamaConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    cfg.save(tmp_path / "config.json")
    assert LlamaConfig.load(tmp_path / "config.json") == cfg
    assert LlamaConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


def test_meta_params_derive_llama_3_1_8b_mlp_width() -> None:
    params = {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
              "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "norm_eps": 1e-05, "rope_theta": 500000.0,
              "use_scaled_rope": True}
    cfg = LlamaConfig.from_meta_params(params)
    assert cfg.intermediate_size == 14336
    assert cfg.rope_scaling == RopeScaling()
    assert (cfg.num_kv_heads, cfg.head_dim) == (8, 128)


def test_meta_params_derive_llama_3_1_70b_preset() -> None:
    params = {"dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "vocab_size": 128256,
              "ffn_dim_multiplier": 1.3, "multiple_of": 4096, "norm_eps": 1e-05, "rope_theta": 500000.0,
              "use_scaled_rope": True}
    cfg = LlamaConfig.from_meta_params(params)
    assert dataclasses.replace(cfg, bos_token_id=128_000, eos_token_id=128_009) == LLAMA_3_1_70B


@pytest.mark.parametrize("change, message", [
    (dict(num_heads=9, num_kv_heads=2), "not divisible"),
    (dict(head_dim=63), "must be even"),
    (dict(num_layers=0), "num_layers"),
    (dict(rope_theta=-1.0), "rope_theta"),
])
def test_bad_configs_name_the_field(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(SMOLLM2_135M, **change)


def test_foreign_format_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="model_type='mistral'"):
        LlamaConfig.from_hf_dict({**SMOLLM2_135M.to_hf_dict(), "model_type": "mistral"})
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        LlamaConfig.from_hf_dict({**SMOLLM2_135M.to_hf_dict(), "rope_scaling": {"rope_type": "yarn", "factor": 2}})
    with pytest.raises(ValueError, match="unknown keys"):
        LlamaConfig.from_dict({**SMOLLM2_135M.to_dict(), "n_layers": 3})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        LlamaConfig.load(tmp_path / "config.json")


def test_num_parameters_matches_the_models() -> None:
    """SmolLM2-135M (tied) and Llama-3.1-8B: the published sizes, and the count of the NNX model's tensors."""
    from kascade_lite.config import LLAMA_3_1_8B, SMOLLM2_135M

    assert round(SMOLLM2_135M.num_parameters / 1e6, 1) == 134.5
    assert round(LLAMA_3_1_8B.num_parameters / 1e9, 2) == 8.03
