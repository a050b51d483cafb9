"""The named models the book, the benchmarks and the tests run: the bundled SmolLM2-135M-Instruct (its GGUF converted
once into a cache by `convert.convert_checkpoint`, then loaded from there) and, at smoke size, a tiny random Llama of
the same vocabulary and head layout. How a checkpoint is converted and loaded is `kascade_lite.convert`; this module
only says which model, and where its converted weights live."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from .config import LlamaConfig
from .convert import convert_checkpoint, load_converted, verify_converted
from .data import smollm2_gguf_path
from .model import Llama


def default_cache_root() -> Path:
    """``$KASCADE_CACHE`` or ``~/.cache/kascade-lite``: where converted checkpoints are kept."""
    return Path(os.environ.get("KASCADE_CACHE") or Path.home() / ".cache" / "kascade-lite")


def smollm2_dir() -> Path:
    """Where the converted SmolLM2-135M-Instruct lives: ``<cache root>/smollm2-135m``."""
    return default_cache_root() / "smollm2-135m"


def converted_smollm2(*, progress: bool = False) -> Path:
    """Convert the bundled SmolLM2 GGUF once (float32) into `smollm2_dir` and return that directory.

    A later call only re-hashes the files (about a second) and converts nothing if they match the manifest."""
    out = smollm2_dir()
    if verify_converted(out):
        return out
    return convert_checkpoint(smollm2_gguf_path(), out, dtype="float32", force=True, progress=progress)


def load_smollm2(*, dtype: Any = jnp.float32) -> Llama:
    """SmolLM2-135M-Instruct as a `Llama` (converted once, cached; weights and activations in ``dtype``)."""
    return load_converted(converted_smollm2(), param_dtype=dtype, dtype=dtype)


def smollm2_or_tiny(smoke: bool, num_layers: int = 4) -> Llama:
    """SmolLM2-135M (float32), or with ``smoke`` a tiny random Llama of ``num_layers`` layers with SmolLM2's
    vocabulary and head layout (9 query / 3 KV heads): what the benchmark scripts run at full and smoke size."""
    if not smoke:
        return load_smollm2()
    return Llama(LlamaConfig(vocab_size=49152, hidden_size=48, intermediate_size=96, num_layers=num_layers,
                             num_heads=9, num_kv_heads=3, head_dim=16, max_position_embeddings=8192,
                             tie_word_embeddings=True))
