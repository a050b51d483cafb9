"""Perplexity: per-window NLL against a direct computation and against `transformers` cross-entropy."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kascade_lite.config import LlamaConfig
from kascade_lite.eval import nll_per_window, perplexity
from kascade_lite.model import Llama, dense_attention, forward

CFG = LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16)
WINDOWS = np.random.default_rng(0).integers(0, CFG.vocab_size, (5, 16)).astype(np.int32)


@pytest.fixture(scope="module")
def model() -> Llama:
    return Llama(CFG)


def direct_nll(model: Llama, windows: np.ndarray) -> np.ndarray:
    logits = np.asarray(forward(model, jnp.asarray(windows))[0], np.float64)[:, :-1]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    return -np.take_along_axis(logp, windows[:, 1:, None], axis=-1)[..., 0].mean(-1)


def test_nll_matches_direct_computation(model):
    nll = nll_per_window(model, WINDOWS, batch_size=2, progress=False)  # 5 windows: the last batch is padded
    assert nll.shape == (5,)
    np.testing.assert_allclose(nll, direct_nll(model, WINDOWS), rtol=1e-5)
    np.testing.assert_allclose(nll_per_window(model, WINDOWS, batch_size=5, progress=False), nll, rtol=1e-5)


def test_perplexity_is_exp_mean_nll(model):
    nll = nll_per_window(model, WINDOWS, progress=False)
    assert perplexity(model, WINDOWS, progress=False) == pytest.approx(float(np.exp(nll.mean())), rel=1e-9)
    # a random model is close to uniform over the vocabulary
    assert 0.5 * CFG.vocab_size < perplexity(model, WINDOWS, progress=False) < 2 * CFG.vocab_size


def test_custom_attention_function_is_used(model):
    calls = []

    def spy(layer, q, k, v, *, q_offset, kv_len, carry):
        calls.append(layer)  # runs while tracing
        return dense_attention(layer, q, k, v, q_offset=q_offset, kv_len=kv_len, carry=carry)

    nll = nll_per_window(model, WINDOWS, attention=spy, batch_size=5, progress=False)
    assert calls == [0, 1]
    np.testing.assert_allclose(nll, nll_per_window(model, WINDOWS, batch_size=5, progress=False), rtol=1e-6)


def test_matches_transformers_cross_entropy(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from kascade_lite.convert import convert_checkpoint, load_converted

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG.to_hf_dict())).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_converted(convert_checkpoint(tmp_path / "hf", tmp_path / "out", progress=False))
    with torch.no_grad():
        ref = hf(torch.tensor(WINDOWS, dtype=torch.long), labels=torch.tensor(WINDOWS, dtype=torch.long)).loss
    assert float(np.mean(nll_per_window(ours, WINDOWS, progress=False))) == pytest.approx(float(ref), abs=1e-5)


@pytest.mark.parametrize("bad, match", [
    (np.zeros((4,), np.int32), "windows must be"),
    (np.zeros((2, 1), np.int32), "windows must be"),
    (np.zeros((2, 8), np.float32), "integer"),
    (np.full((2, 8), 10_000, np.int32), "token ids"),
])
def test_bad_windows(model, bad, match):
    with pytest.raises(ValueError, match=match):
        nll_per_window(model, bad, progress=False)
