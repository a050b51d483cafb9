r"""Evaluation: perplexity on token windows.

Perplexity of a window of tokens :math:`x_1..x_T` is :math:`\exp\big(-\frac{1}{T-1}\sum_{t=2}^{T}
\log p(x_t \mid x_{<t})\big)`; over a corpus cut into windows we average the negative log-likelihood (NLL) over every
predicted token of every window, then exponentiate. The ``attention`` argument is the per-layer attention function of
`kascade_lite.model.forward`, so the same code measures dense and sparse attention.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .model import AttentionFn, Llama, dense_attention


@functools.partial(jax.jit, static_argnames=("graphdef", "attention"))
def _window_nll(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, attention: AttentionFn) -> jax.Array:
    """Mean NLL ``[batch]`` (float32) of predicting ``tokens[:, 1:]`` from ``tokens: [batch, seq]``, for a model split
    by ``nnx.split`` (the jit style of `model.forward_split`; the logits never leave the program)."""
    logits, _, _ = nnx.merge(graphdef, state)(tokens, attention=attention)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    target = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]  # [batch, seq - 1]
    return -jnp.mean(target, axis=-1)


def nll_per_window(model: Llama, windows: np.ndarray, *, attention: AttentionFn = dense_attention,
                   batch_size: int = 4, progress: bool = True) -> np.ndarray:
    """Mean token NLL (nats) of each window: ``windows: [n, seq]`` int -> ``[n]`` float64.

    Windows are independent sequences (no cache is carried across them); batches are padded to ``batch_size`` so
    the jitted forward compiles once.
    """
    from .progress import tqdm

    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[1] < 2 or windows.shape[0] == 0:
        raise ValueError(f"windows must be [n>0, seq>=2] token ids, got shape {windows.shape}")
    if not np.issubdtype(windows.dtype, np.integer):
        raise ValueError(f"windows must hold integer token ids, got dtype {windows.dtype}")
    if windows.min() < 0 or windows.max() >= model.cfg.vocab_size:
        raise ValueError(f"token ids must lie in [0, {model.cfg.vocab_size}), got [{windows.min()}, {windows.max()}]")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    graphdef, state = nnx.split(model)
    out = []
    for start in tqdm(range(0, len(windows), batch_size), desc="nll", unit="batch", disable=not progress):
        batch = windows[start:start + batch_size]
        pad = batch_size - len(batch)
        padded = np.concatenate([batch, np.repeat(batch[:1], pad, axis=0)]) if pad else batch
        nll = _window_nll(graphdef, state, jnp.asarray(padded, jnp.int32), attention)
        out.append(np.asarray(nll, np.float64)[:len(batch)])
    return np.concatenate(out)


def perplexity(model: Llama, windows: np.ndarray, *, attention: AttentionFn = dense_attention, batch_size: int = 4,
               progress: bool = True) -> float:
    """``exp`` of the mean token NLL over all predicted tokens of ``windows: [n, seq]`` (equal-length windows, so
    the mean of the per-window means is the mean over tokens)."""
    nll = nll_per_window(model, windows, attention=attention, batch_size=batch_size, progress=progress)
    return float(np.exp(nll.mean()))
