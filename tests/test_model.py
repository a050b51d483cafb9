"""The JAX model on real weights: SmolLM2-135M against `transformers`, and KV-cache decode against the full forward."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kascade_lite.config import LlamaConfig, RopeScaling
from kascade_lite.models import converted_smollm2, load_smollm2
from kascade_lite.data import load_tokenizer, load_wikitext, smollm2_gguf_path
from kascade_lite.model import (KVCache, Llama, dense_attention, forward, forward_split, generate, make_forward,
                                write_cache)

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


def decode_token_by_token(model: Llama, tokens: np.ndarray, prefill: int, attention=dense_attention) -> np.ndarray:
    """Logits ``[batch, seq, vocab]``: prefill ``prefill`` tokens, then feed the rest one at a time via the cache
    (each step donating it, as `decode` does)."""
    step = make_forward(model, attention, donate=True)
    cache = KVCache.empty(model.cfg, tokens.shape[0], tokens.shape[1])
    logits, cache, _ = step(jnp.asarray(tokens[:, :prefill]), cache)
    steps = [np.asarray(logits)]
    for t in range(prefill, tokens.shape[1]):
        logits, cache, _ = step(jnp.asarray(tokens[:, t:t + 1]), cache)
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


TINY = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=6, num_kv_heads=2,
                   head_dim=16)


def full_cache_ops(hlo: str, cache: KVCache) -> list[str]:
    """Instructions of a compiled HLO module that produce an array of one layer's full cache shape (parameters and
    the tuple of outputs aside): a copy of the cache, or a fused update that rewrites it."""
    b, h, n, d = cache.k[0].shape
    shape = re.compile(rf"= f32\[{b},{h},{n},{d}\]\{{[0-9,]+\}} (?!parameter\()")
    return [line.strip() for line in hlo.splitlines() if shape.search(line)]


def test_a_decode_step_never_copies_the_cache():
    """The forward program only reads the cache (no instruction makes a cache-sized array) and the write program
    updates the donated buffers in place (aliased, no copy): a decode step moves the weights, the K/V it reads and
    one new row per layer, never the whole cache."""
    from flax import nnx

    from kascade_lite.kascade import KascadeAttention
    from kascade_lite.schedule import default_schedule

    model = Llama(TINY)
    graphdef, state = nnx.split(model)
    cache = KVCache.empty(TINY, 1, 200)
    tok = jnp.zeros((1, 1), jnp.int32)
    kascade = KascadeAttention(default_schedule("tiny", 3, 2, 2, 16, 0.25), min_keys=16)
    for attention in (dense_attention, kascade, KascadeAttention(kascade.schedule, granularity="tile", min_keys=16)):
        hlo = forward_split.lower(graphdef, state, tok, cache, attention, False, False).compile().as_text()
        assert not full_cache_ops(hlo, cache), (attention, full_cache_ops(hlo, cache)[:3])
    new = forward_split(graphdef, state, tok, cache, dense_attention)[1]
    hlo = write_cache.lower(cache, new).compile().as_text()
    assert "input_output_alias" in hlo and not any("copy(" in op for op in full_cache_ops(hlo, cache))
    before = cache.k[0].unsafe_buffer_pointer()
    written = write_cache(cache, new)
    assert cache.k[0].is_deleted() and written.k[0].unsafe_buffer_pointer() == before


def test_split_decode_equals_decode_on_the_written_cache():
    """Dense and Kascade decode steps that read the cache and their own key separately (`reads_new_separately`)
    give the logits of the same attention run on the cache with the key written (the generic path)."""
    from kascade_lite.kascade import KascadeAttention
    from kascade_lite.schedule import default_schedule

    model = Llama(TINY, rngs=__import__("flax").nnx.Rngs(3))
    tokens = np.random.default_rng(2).integers(0, TINY.vocab_size, (1, 70)).astype(np.int32)
    schedule = default_schedule("tiny", 3, 2, 2, 16, 0.25)
    for attention in (dense_attention, KascadeAttention(schedule, min_keys=16),
                      KascadeAttention(schedule, granularity="tile", min_keys=16)):
        generic = GenericPath(attention)
        np.testing.assert_allclose(decode_token_by_token(model, tokens, 64, attention),
                                   decode_token_by_token(model, tokens, 64, generic), atol=1e-5, rtol=0)


class GenericPath:
    """An attention function without ``reads_new_separately``: the model hands it the cache with the keys
    written."""

    def __init__(self, attention):
        self.attention = attention

    def __call__(self, layer, q, k, v, *, q_offset, kv_len, carry):
        return self.attention(layer, q, k, v, q_offset=q_offset, kv_len=kv_len, carry=carry)

    def __hash__(self):
        return hash(("generic", self.attention))

    def __eq__(self, other):
        return isinstance(other, GenericPath) and other.attention == self.attention
