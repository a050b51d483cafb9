"""RoPE against the Hugging Face reference (`LlamaRotaryEmbedding`, `apply_rotary_pos_emb`), the Meta/HF pairing
permutation, input validation, and the norm-preserving property."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kascade_lite.config import LLAMA_3_1_8B, SMOLLM2_135M, LlamaConfig, RopeScaling
from kascade_lite.rope import (apply_rope, apply_rope_interleaved, interleaved_to_half_permutation,
                               inverse_frequencies, permute_qk_weight, rope_cos_sin, wavelengths)

torch = pytest.importorskip("torch")
hf_llama = pytest.importorskip("transformers.models.llama.modeling_llama")
from transformers import LlamaConfig as HFLlamaConfig  # noqa: E402

CONFIGS = {"default (SmolLM2, θ=1e5)": SMOLLM2_135M, "llama3 scaling (Llama-3.1-8B)": LLAMA_3_1_8B}


def hf_rotary(cfg: LlamaConfig):
    return hf_llama.LlamaRotaryEmbedding(HFLlamaConfig(**cfg.to_hf_dict()))


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_inverse_frequencies_match_hf(cfg: LlamaConfig) -> None:
    ours = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    ref = hf_rotary(cfg).inv_freq.numpy()
    assert ours.shape == (cfg.head_dim // 2,) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_cos_sin_and_rotation_match_hf(cfg: LlamaConfig, rng: np.random.Generator) -> None:
    """Same frequencies in, same tables and rotated queries out (1e-6), including positions far from 0."""
    batch, seq, heads = 2, 37, 3
    positions = np.stack([np.arange(seq), np.arange(seq) + 100_000])  # second row: deep into a long context
    rotary = hf_rotary(cfg)
    x = rng.standard_normal((batch, seq, heads, cfg.head_dim)).astype(np.float32)
    xt = torch.from_numpy(x)
    ref_cos, ref_sin = rotary(xt, torch.from_numpy(positions))
    ref_q, _ = hf_llama.apply_rotary_pos_emb(xt, xt, ref_cos, ref_sin, unsqueeze_dim=2)

    cos, sin = rope_cos_sin(positions, rotary.inv_freq.numpy())
    np.testing.assert_allclose(cos, ref_cos.numpy(), atol=1e-6)
    np.testing.assert_allclose(sin, ref_sin.numpy(), atol=1e-6)
    np.testing.assert_allclose(apply_rope(jnp.asarray(x), cos, sin), ref_q.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_end_to_end_tables_match_hf(cfg: LlamaConfig) -> None:
    """Our own frequencies: torch's float32 ``pow`` and NumPy's differ by up to 1 ulp (both within 1e-6 relative),
    so the angle ``position * ω`` may differ by ``position * 2^-23`` — 1e-6 near the start of the sequence."""
    rotary = hf_rotary(cfg)
    positions = np.arange(8)[None]
    ref_cos, ref_sin = rotary(torch.zeros(1), torch.from_numpy(positions))
    cos, sin = rope_cos_sin(positions, inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
    np.testing.assert_allclose(cos, ref_cos.numpy(), atol=1e-6)
    np.testing.assert_allclose(sin, ref_sin.numpy(), atol=1e-6)
    far = np.arange(100_000, 100_008)[None]
    ref_cos, _ = rotary(torch.zeros(1), torch.from_numpy(far))
    cos, _ = rope_cos_sin(far, inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
    np.testing.assert_allclose(cos, ref_cos.numpy(), atol=2 * 100_008 * 2.0**-23)


def test_llama3_scaling_bands() -> None:
    """High frequencies untouched, low frequencies divided by 8, the band in between interpolated."""
    s = RopeScaling()
    base = inverse_frequencies(128, 500_000.0)
    scaled = inverse_frequencies(128, 500_000.0, s)
    wl = wavelengths(base)
    short, long = wl < s.original_max_position_embeddings / s.high_freq_factor, wl > s.original_max_position_embeddings
    np.testing.assert_array_equal(scaled[short], base[short])
    np.testing.assert_allclose(scaled[long], base[long] / s.factor, rtol=1e-6)
    mid = ~short & ~long
    assert mid.any() and np.all(scaled[mid] <= base[mid]) and np.all(scaled[mid] >= base[mid] / s.factor)


def test_table_shapes_with_batch_positions() -> None:
    cos, sin = rope_cos_sin(jnp.arange(10)[None].repeat(3, 0), inverse_frequencies(64, 1e4))
    assert cos.shape == sin.shape == (3, 10, 64)


def test_permutation_makes_meta_and_hf_agree(rng: np.random.Generator) -> None:
    """half-split RoPE of (permuted W) x  ==  permute(interleaved RoPE of W x), head by head."""
    heads, head_dim, hidden, seq = 3, 16, 24, 11
    w_meta = rng.standard_normal((heads * head_dim, hidden)).astype(np.float32)
    x = rng.standard_normal((1, seq, hidden)).astype(np.float32)
    inv_freq = inverse_frequencies(head_dim, 10_000.0)
    positions = np.arange(seq)

    q_meta = (x @ w_meta.T).reshape(1, seq, heads, head_dim)
    rotated_meta = apply_rope_interleaved(jnp.asarray(q_meta), positions, inv_freq)
    q_hf = (x @ permute_qk_weight(w_meta, heads, head_dim).T).reshape(1, seq, heads, head_dim)
    rotated_hf = apply_rope(jnp.asarray(q_hf), *rope_cos_sin(positions, inv_freq))

    perm = interleaved_to_half_permutation(head_dim)
    np.testing.assert_allclose(rotated_hf, np.asarray(rotated_meta)[..., perm], atol=1e-5)
    # and attention scores (what the model sees) are identical without any permutation of the result
    scores_meta = np.einsum("bqhd,bkhd->bhqk", rotated_meta, rotated_meta)
    scores_hf = np.einsum("bqhd,bkhd->bhqk", rotated_hf, rotated_hf)
    np.testing.assert_allclose(scores_hf, scores_meta, rtol=1e-4, atol=1e-3)


def test_permutation_indices() -> None:
    np.testing.assert_array_equal(interleaved_to_half_permutation(8), [0, 2, 4, 6, 1, 3, 5, 7])
    w = np.arange(2 * 4)[:, None]  # two heads of head_dim 4, one column: rows are their own indices
    np.testing.assert_array_equal(permute_qk_weight(w, 2, 4)[:, 0], [0, 2, 1, 3, 4, 6, 5, 7])


@pytest.mark.parametrize("shape", [(4, 64), (1, 4, 2, 3, 64)])
def test_apply_rope_rejects_wrong_rank(shape: tuple[int, ...]) -> None:
    cos, sin = rope_cos_sin(jnp.arange(4), inverse_frequencies(64, 1e4))
    with pytest.raises(ValueError, match=r"\[batch, seq, heads, head_dim\]"):
        apply_rope(jnp.zeros(shape), cos, sin)


def test_odd_head_dim_is_rejected() -> None:
    with pytest.raises(ValueError, match="head_dim=7"):
        inverse_frequencies(7, 1e4)
    with pytest.raises(ValueError, match="even head_dim"):
        apply_rope(jnp.zeros((1, 4, 2, 7)), jnp.zeros((4, 7)), jnp.zeros((4, 7)))
    with pytest.raises(ValueError, match="must be even"):
        interleaved_to_half_permutation(7)


def test_table_shorter_than_sequence_is_a_clear_error() -> None:
    cos, sin = rope_cos_sin(jnp.arange(8), inverse_frequencies(16, 1e4))
    with pytest.raises(ValueError, match=r"positions longer than the table"):
        apply_rope(jnp.zeros((1, 12, 2, 16)), cos, sin)


def test_permute_rejects_wrong_rows() -> None:
    with pytest.raises(ValueError, match="num_heads\\*head_dim"):
        permute_qk_weight(np.zeros((10, 4)), 3, 4)


@given(seed=st.integers(0, 2**31 - 1), offset=st.integers(0, 200_000), head_dim=st.sampled_from([2, 8, 64, 128]),
       scaled=st.booleans())
def test_rotation_preserves_norms(seed: int, offset: int, head_dim: int, scaled: bool) -> None:
    x = np.random.default_rng(seed).standard_normal((1, 5, 2, head_dim)).astype(np.float32)
    inv_freq = inverse_frequencies(head_dim, 500_000.0, RopeScaling() if scaled else None)
    out = apply_rope(jnp.asarray(x), *rope_cos_sin(offset + np.arange(5), inv_freq))
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


@given(m=st.integers(0, 5000), n=st.integers(0, 5000), shift=st.integers(0, 5000))
def test_scores_depend_only_on_offset(m: int, n: int, shift: int) -> None:
    rng = np.random.default_rng(m * 7919 + n)
    q, k = (rng.standard_normal((1, 1, 1, 64)).astype(np.float32) for _ in range(2))
    inv_freq = inverse_frequencies(64, 10_000.0)

    def score(pq: int, pk: int) -> float:
        rq = apply_rope(jnp.asarray(q), *rope_cos_sin(np.array([pq]), inv_freq))
        rk = apply_rope(jnp.asarray(k), *rope_cos_sin(np.array([pk]), inv_freq))
        return float(jnp.sum(rq * rk))

    assert score(m, n) == pytest.approx(score(m + shift, n + shift), abs=2e-3)
