"""The JAX model on real weights: SmolLM2-135M against `transformers`, and KV-cache decode against the full forward."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kascade_lite.config import LlamaConfig, RopeScaling
from kascade_lite.models import converted_smollm2, load_smollm2
from kascade_lite.data import load_tokenizer, load_wikitext, smollm2_gguf_path
from kascade_lite.model import KVCache, Llama, forward, generate

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def smollm2() -> Llama:
    return load_smollm2()


@pytest.fixture(scope="module")
def hf_smollm2():
    """transformers' own GGUF path (its dequantisation and q/k un-permutation), float32 — an independent reference."""
    gguf = smollm2_gguf_path()
    return transformers.LlamaForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                         dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt_128() -> np.ndarray:
    ids = load_tokenizer()(load_wikitext("test")[:4000], add_special_tokens=False)["input_ids"]
    return np.asarray([ids[:128]], np.int32)


def test_smollm2_config_from_gguf(smollm2):
    from kascade_lite.config import SMOLLM2_135M
    assert smollm2.cfg == SMOLLM2_135M


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2, hf_smollm2, prompt_128):
    with torch.no_grad():
        ref = hf_smollm2(torch.tensor(prompt_128, dtype=torch.long)).logits.numpy()
    ours = np.asarray(forward(smollm2, jnp.asarray(prompt_128))[0])
    assert np.abs(ours - ref).max() <= 1e-3


@pytest.mark.slow
def test_smollm2_greedy_generation_matches_transformers(smollm2, hf_smollm2, prompt_128):
    prompt = prompt_128[:, :32]
    with torch.no_grad():
        ref = hf_smollm2.generate(torch.tensor(prompt, dtype=torch.long), max_new_tokens=20, do_sample=False,
                                  eos_token_id=None).numpy()
    ours = generate(smollm2, prompt, 20)
    np.testing.assert_array_equal(ours, ref)


def decode_token_by_token(model: Llama, tokens: np.ndarray, prefill: int) -> np.ndarray:
    """Logits ``[batch, seq, vocab]``: prefill ``prefill`` tokens, then feed the rest one at a time via the cache."""
    cache = KVCache.empty(model.cfg, tokens.shape[0], tokens.shape[1])
    logits, cache, _ = forward(model, jnp.asarray(tokens[:, :prefill]), cache)
    steps = [np.asarray(logits)]
    for t in range(prefill, tokens.shape[1]):
        logits, cache, _ = forward(model, jnp.asarray(tokens[:, t:t + 1]), cache)
        steps.append(np.asarray(logits))
    assert int(cache.length) == tokens.shape[1]
    return np.concatenate(steps, axis=1)


@pytest.mark.slow
def test_kv_cache_decode_equals_full_forward_smollm2(smollm2, prompt_128):
    tokens = prompt_128[:, :52]  # prefill 32 + 20 steps: the shapes `generate` compiled in the test above
    full = np.asarray(forward(smollm2, jnp.asarray(tokens))[0])
    np.testing.assert_allclose(decode_token_by_token(smollm2, tokens, prefill=32), full, atol=2e-4, rtol=0)


def test_kv_cache_decode_equals_full_forward_random_gqa():
    cfg = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=8,
                      num_kv_heads=2, head_dim=16, rope_scaling=RopeScaling())
    model = Llama(cfg)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 12)).astype(np.int32)
    full = np.asarray(forward(model, jnp.asarray(tokens))[0])
    np.testing.assert_allclose(decode_token_by_token(model, tokens, prefill=1), full, atol=1e-5, rtol=0)


def test_cached_conversion_is_reused(smollm2):
    out = converted_smollm2()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert converted_smollm2() == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
