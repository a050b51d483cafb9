"""Tiny random checkpoints written from scratch (no `transformers`), for the security, bad-input and resume tests.

`write_hf` writes a Hugging Face directory (``config.json`` + ``model.safetensors``), `write_gguf` a llama GGUF
file (float32 tensors), both for a `LlamaConfig`; `patch_gguf_tensor_info` rewrites one tensor's header entry in
place, to craft damaged or hostile files.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from kascade_lite.config import LlamaConfig
from kascade_lite.checkpoints import GGUF_GLOBAL, GGUF_LAYER, HF_GLOBAL, HF_LAYER
from kascade_lite.model import expected_shapes

TINY = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
                   head_dim=8, rope_theta=10_000.0, max_position_embeddings=256, tie_word_embeddings=False)
"""A 3-layer GQA model of a few hundred kB: every test file converts it in well under a second."""


def source_tensors(cfg: LlamaConfig, layer: dict[str, str], glob: dict, prefix: str,
                   seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 tensors under a source format's names, stored ``[out, in]`` like real checkpoints."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_shapes(cfg).items():
        if name.startswith("layers."):
            _, i, short = name.split(".", 2)
            key, matrix = prefix.format(i=i) + layer[short], len(shape) == 2
        else:
            key, matrix = glob[name].key, glob[name].transpose
        out[key] = (rng.standard_normal(shape[::-1] if matrix else shape) * 0.1).astype(np.float32)
    return out


def write_hf(path: Path, cfg: LlamaConfig = TINY, *, seed: int = 0, add: dict[str, np.ndarray] | None = None,
             drop: tuple[str, ...] = (), hf_config: dict | None = None) -> Path:
    """A Hugging Face checkpoint directory; ``add``/``drop`` tensors, or replace ``config.json`` by ``hf_config``."""
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    tensors = source_tensors(cfg, HF_LAYER, HF_GLOBAL, "model.layers.{i}.", seed)
    tensors.update(add or {})
    for key in drop:
        del tensors[key]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf_config if hf_config is not None else cfg.to_hf_dict()))
    return path


def write_gguf(path: Path, cfg: LlamaConfig = TINY, *, seed: int = 0, arch: str = "llama",
               num_kv_heads: int | None = None) -> Path:
    """A llama GGUF file with float32 tensors (GGUF lists dimensions innermost first: numpy ``[out, in]``)."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_layers)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads if num_kv_heads is None else num_kv_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_vocab_size(cfg.vocab_size)
    for key, arr in source_tensors(cfg, GGUF_LAYER, GGUF_GLOBAL, "blk.{i}.", seed).items():
        w.add_tensor(key, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def patch_gguf_tensor_info(path: Path, name: str, *, dims: list[int] | None = None, ggml_type: int | None = None,
                           offset: int | None = None) -> None:
    """Overwrite tensor ``name``'s dimensions (same count), type or data offset in a GGUF header, in place.

    A tensor info is: name (u64 length + bytes), n_dims (u32), dims (u64 each), type (u32), offset (u64)."""
    data = bytearray(path.read_bytes())
    key = struct.pack("<Q", len(name)) + name.encode()
    at = data.index(key) + len(key)
    (n_dims,) = struct.unpack_from("<I", data, at)
    if dims is not None:
        assert len(dims) == n_dims
        struct.pack_into(f"<{n_dims}Q", data, at + 4, *dims)
    at += 4 + 8 * n_dims
    if ggml_type is not None:
        struct.pack_into("<I", data, at, ggml_type)
    if offset is not None:
        struct.pack_into("<Q", data, at + 4, offset)
    path.write_bytes(bytes(data))
