r"""Rotary position embeddings (RoPE), Su et al. 2021, with Llama-3.1 frequency scaling.

Each pair of feature dimensions :math:`(x_{2i}, x_{2i+1})` of a query or key at position :math:`m` is rotated by the
angle :math:`m\,\omega_i`, with :math:`\omega_i = \theta^{-2i/d}`. Because rotations compose,
:math:`\langle R_m q, R_n k\rangle = \langle q, R_{n-m} k\rangle`: the score depends only on the offset.

Two pairing conventions exist for the same maths:

* **interleaved** (Meta checkpoints): pairs are adjacent dimensions ``(0,1), (2,3), ...``;
* **half-split** (Hugging Face, and this package): pairs are ``(i, i + d/2)``.

`apply_rope` uses half-split. Converting a Meta checkpoint therefore permutes the output rows of ``wq``/``wk``
(`interleaved_to_half_permutation`), so that the half-split rotation of the permuted projection equals the
interleaved rotation of the original one.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from .config import RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    r"""Angular frequencies :math:`\omega_i`, shape ``[head_dim // 2]`` (float32).

    With ``scaling`` (Llama-3.1's ``rope_type: llama3``): wavelengths longer than
    ``original_max_position_embeddings / low_freq_factor`` are divided by ``factor``, shorter than
    ``original / high_freq_factor`` are kept, and those in between are interpolated smoothly.
    """
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"RoPE needs a positive even head_dim, got head_dim={head_dim}")
    if theta <= 0:
        raise ValueError(f"RoPE theta must be positive, got {theta}")
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    inv_freq = inv_freq.astype(np.float32)
    if scaling is None:
        return inv_freq
    s = scaling
    if s.high_freq_factor <= s.low_freq_factor:
        raise ValueError(f"llama3 RoPE scaling needs high_freq_factor > low_freq_factor, got {s}")
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions: jnp.ndarray, inv_freq: jnp.ndarray | np.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Cosine and sine tables in half-split layout.

    positions: ``[seq]`` or ``[batch, seq]`` integer positions. Returns ``cos, sin`` of shape
    ``positions.shape + (head_dim,)``, float32, with the frequencies repeated ``[ω, ω]``.
    """
    angles = jnp.asarray(positions, jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def rotate_half(x: jnp.ndarray) -> jnp.ndarray:
    """``[x1, x2] -> [-x2, x1]`` on the last axis (the 90° rotation of every half-split pair)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate ``x: [batch, seq, heads, head_dim]`` by tables ``cos, sin: [seq, head_dim]`` or
    ``[batch, seq, head_dim]`` (from `rope_cos_sin`). Computed in float32, returned in ``x.dtype``."""
    if x.ndim != 4:
        raise ValueError(f"apply_rope expects x of shape [batch, seq, heads, head_dim], got {x.shape}")
    if x.shape[-1] % 2:
        raise ValueError(f"apply_rope needs an even head_dim, got x.shape={x.shape}")
    if cos.shape[-1] != x.shape[-1] or cos.shape[-2] != x.shape[1] or cos.shape != sin.shape:
        raise ValueError(f"apply_rope: tables cos{cos.shape}/sin{sin.shape} do not match x{x.shape} "
                         "(need [seq, head_dim] or [batch, seq, head_dim]); positions longer than the table?")
    if cos.ndim == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    xf = x.astype(jnp.float32)
    return (xf * cos + rotate_half(xf) * sin).astype(x.dtype)


def apply_rope_interleaved(x: jnp.ndarray, positions: jnp.ndarray, inv_freq: np.ndarray) -> jnp.ndarray:
    """Meta's convention: rotate adjacent pairs ``(x[2i], x[2i+1])`` of ``x: [batch, seq, heads, head_dim]``.

    Used to show (and test) that the q/k permutation makes both conventions agree.
    """
    angles = jnp.asarray(positions, jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [seq, d/2]
    cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
    xf = x.astype(jnp.float32)
    even, odd = xf[..., 0::2], xf[..., 1::2]
    out = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def interleaved_to_half_permutation(head_dim: int) -> np.ndarray:
    """Index array ``p`` such that ``x_half = x_interleaved[..., p]`` for one head of size ``head_dim``.

    Half-split position ``i < d/2`` holds interleaved ``2i`` and position ``d/2 + i`` holds ``2i + 1``.
    """
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    return np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])


def permute_qk_weight(w_out_in: np.ndarray, num_heads: int, head_dim: int) -> np.ndarray:
    """Permute the output rows of a Meta ``wq``/``wk`` weight ``[num_heads * head_dim, in]`` from interleaved to
    half-split RoPE pairs, head by head. Works on any array whose first axis is ``num_heads * head_dim``."""
    if w_out_in.shape[0] != num_heads * head_dim:
        raise ValueError(f"weight rows {w_out_in.shape[0]} != num_heads*head_dim = {num_heads}*{head_dim}")
    perm = interleaved_to_half_permutation(head_dim)
    rows = (np.arange(num_heads)[:, None] * head_dim + perm[None, :]).reshape(-1)
    return w_out_in[rows]


def wavelengths(inv_freq: np.ndarray) -> np.ndarray:
    """Wavelength in tokens of each dimension pair, ``2π / ω_i``."""
    return 2 * np.pi / np.asarray(inv_freq, np.float64)
