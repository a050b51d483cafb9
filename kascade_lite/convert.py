"""Streamed, verified conversion of Llama checkpoints into kascade-lite's own layout, and loading it back.

Inputs (detected by `open_checkpoint`):

* a **GGUF** file (llama.cpp; quantised tensors are dequantised with the ``gguf`` package),
* a **Hugging Face** directory: ``config.json`` plus ``model.safetensors``, sharded ``model-*.safetensors`` with
  ``model.safetensors.index.json``, or ``pytorch_model*.bin`` (read with ``torch.load(weights_only=True)``),
* a **Meta** directory: ``params.json`` plus ``consolidated.*.pth``.

Output directory::

    config.json               LlamaConfig.save
    embeddings.safetensors    embed [vocab, hidden], final_norm [hidden], lm_head [hidden, vocab] (if untied)
    layer_00.safetensors      attn_norm, wq [hidden, H*d], wk/wv [hidden, Hkv*d], wo, mlp_norm, w_gate, w_up, w_down
    ...
    manifest.json             per file: tensor names, shapes, dtypes, sha256; the source; format version

Every projection is stored ``[in, out]`` (so the model computes ``x @ w``; checkpoints store ``[out, in]``), K/V keep
their ``num_kv_heads`` heads, and q/k rows use the half-split RoPE pairing of `kascade_lite.rope`.

Conversion streams: one output file is produced at a time and only one tensor of it is in memory (the safetensors
file is written tensor by tensor). Source safetensors are read with positioned reads of row blocks rather than a
memory map, so the pages of a 5 GB shard never count towards the converter's resident memory. Each output file is
written atomically; ``manifest.json`` is rewritten after every file and marked ``complete`` only at the end, so a
rerun resumes by skipping files whose checksum matches, and a half-converted directory is never loaded; temp files
of an interrupted run are removed. ``$KASCADE_CONVERT_PAUSE`` (seconds, test-only) sleeps before each output tensor
so a test can kill a conversion mid-file.

Sources are untrusted: nothing is unpickled (torch files only through ``weights_only=True``), and safetensors and
GGUF headers are validated (dtypes, shapes, offsets, sizes against the file size) before any tensor is read, so a
header claiming an absurd size fails at once with the file and tensor named. Tensors the config does not account for
are an error. See ``docs/errors.md`` for every error and its message.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import struct
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from .config import LlamaConfig
from .files import atomic_path, sha256_file, write_json_atomic
from .model import LAYER_TENSORS, Llama, expected_shapes
from .rope import permute_qk_weight

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
EMBEDDINGS_FILE = "embeddings.safetensors"

DTYPES: dict[str, Any] = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
"""Output dtypes accepted by `convert_checkpoint`."""

# safetensors dtype codes <-> numpy dtypes (floating point only: weights must be floats)
ST_DTYPES: dict[str, Any] = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}
ST_CODES: dict[Any, str] = {np.dtype(v): k for k, v in ST_DTYPES.items()}

ROW_BLOCK_BYTES = 64 << 20  # source rows are read (and transposed) in blocks of about this size
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit on a header's JSON
MAX_TENSOR_ELEMENTS = 1 << 40  # no Llama tensor comes near this; a header claiming more is damaged or hostile
IGNORED_SOURCE_KEYS = re.compile(r"(.*\.)?(rotary_emb\.inv_freq|rope\.freqs)")
"""Source tensors that carry no weights (precomputed RoPE tables of old checkpoints): skipped, not an error."""
PAUSE_ENV = "KASCADE_CONVERT_PAUSE"
"""Test hook: seconds to sleep before producing each output tensor, so a test can kill a conversion mid-way."""


def layer_file(i: int) -> str:
    """File name of layer ``i``: ``layer_00.safetensors`` (two digits, more when a model has > 100 layers)."""
    return f"layer_{i:02d}.safetensors"


def default_cache_root() -> Path:
    """``$KASCADE_CACHE`` or ``~/.cache/kascade-lite``: where converted checkpoints are kept."""
    return Path(os.environ.get("KASCADE_CACHE") or Path.home() / ".cache" / "kascade-lite")


# ================================================================================================ sources
@dataclass(frozen=True)
class TensorSpec:
    """Where one of our tensors lives in a source checkpoint and how to bring it to our layout.

    ``key`` is the source name; source matrices are ``[out, in]`` and ``transpose`` makes them ``[in, out]``;
    ``rope_heads`` (q/k only) undoes an interleaved RoPE row order, head by head, before the transpose.
    """

    key: str
    transpose: bool = False
    rope_heads: int | None = None


class Checkpoint(ABC):
    """A source checkpoint: its config and random access to its tensors by source key."""

    format: str = ""

    def __init__(self, path: Path, config: LlamaConfig):
        self.path, self.config = path, config

    @abstractmethod
    def spec(self, name: str) -> TensorSpec:
        """Where our tensor ``name`` (``embed``, ``layers.3.wq``, ...) is stored."""

    @abstractmethod
    def keys(self) -> set[str]:
        """Every tensor key of the source."""

    @abstractmethod
    def shape(self, key: str) -> tuple[int, ...]:
        """Stored shape of ``key`` (``[out, in]`` for matrices)."""

    @abstractmethod
    def read(self, key: str, rows: slice | None = None) -> np.ndarray:
        """The stored tensor (or its rows ``rows``) as a floating-point numpy array."""

    def where(self, key: str) -> str:
        """The file holding ``key`` (for error messages)."""
        return str(self.path)

    def release(self) -> None:
        """Drop memory maps between output files, so mapped pages do not accumulate in resident memory."""

    def close(self) -> None:
        """Release open files."""
        self.release()


def _layer_spec(name: str, table: dict[str, str], prefix: str, cfg: LlamaConfig,
                qk: tuple[str, str] | None) -> TensorSpec:
    """Spec of ``layers.{i}.{short}`` given a table ``short -> source suffix`` and the source layer prefix."""
    _, i, short = name.split(".", 2)
    key = prefix.format(i=i) + table[short]
    heads = {qk[0]: cfg.num_heads, qk[1]: cfg.num_kv_heads}.get(short) if qk else None
    return TensorSpec(key, transpose=len(LAYER_TENSORS[short].split(",")) == 2, rope_heads=heads)


# ------------------------------------------------------------------------------------------------ safetensors
class SafetensorsFile:
    """Minimal safetensors reader using positioned reads (no memory map), validating the header against the file.

    Layout: 8-byte little-endian header length ``n``, ``n`` bytes of JSON ``{name: {dtype, shape,
    data_offsets: [begin, end]}}``, then the raw little-endian data (offsets relative to ``8 + n``).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise ValueError(f"{self.path}: corrupt safetensors header (claims {n} bytes of JSON, the limit is "
                                 f"{MAX_HEADER_BYTES})")
            if 8 + n > size:
                raise ValueError(f"{self.path}: truncated safetensors file (header of {n} bytes, file {size})")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{self.path}: corrupt safetensors header ({e})") from e
        if not isinstance(header, dict):
            raise ValueError(f"{self.path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
        header.pop("__metadata__", None)
        self.data_start, self.entries = 8 + n, header
        spans = sorted((self._check_entry(key, e, size), key) for key, e in header.items())
        for ((_, end), key), ((begin, _), nxt) in zip(spans, spans[1:]):
            if begin < end:
                raise ValueError(f"{self.path}: corrupt safetensors header: tensors {key} and {nxt} overlap")

    def _check_entry(self, key: str, e: Any, size: int) -> tuple[int, int]:
        """Validate one header entry against the file size (before any data is read); return its byte span."""
        def bad(msg: str) -> ValueError:
            return ValueError(f"{self.path}: tensor {key}: {msg}")

        if not isinstance(e, dict):
            raise bad(f"header entry is a {type(e).__name__}, not an object")
        if e.get("dtype") not in ST_DTYPES:
            raise ValueError(f"{self.path}: tensor {key} has dtype {e.get('dtype')}, expected a float type "
                             f"({', '.join(ST_DTYPES)})")
        shape, offsets = e.get("shape"), e.get("data_offsets")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise bad(f"shape {shape!r} is not a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise bad(f"data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end")
        elements = math.prod(shape)  # Python ints: an absurd shape cannot overflow into a small number
        if elements > MAX_TENSOR_ELEMENTS:
            raise bad(f"shape {shape} claims {elements} elements (more than {MAX_TENSOR_ELEMENTS}); refusing it")
        begin, end = offsets
        nbytes = elements * np.dtype(ST_DTYPES[e["dtype"]]).itemsize
        if end - begin != nbytes:
            raise ValueError(f"{self.path}: tensor {key} holds {end - begin} bytes, shape {shape} "
                             f"{e['dtype']} needs {nbytes}")
        if self.data_start + end > size:
            raise ValueError(f"{self.path}: truncated file: tensor {key} ends at byte {self.data_start + end}, "
                             f"the file has {size}")
        return begin, end

    def keys(self) -> set[str]:
        return set(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def read(self, key: str, rows: slice | None = None) -> np.ndarray:
        """Tensor ``key``, or rows ``rows`` (a contiguous slice of the first axis) of it."""
        e = self.entries[key]
        dtype, shape = np.dtype(ST_DTYPES[e["dtype"]]), tuple(e["shape"])
        if not shape:
            rows = None
        r0, r1, _ = (rows or slice(None)).indices(shape[0] if shape else 1)
        row_items = int(np.prod(shape[1:], dtype=np.int64))
        offset = self.data_start + e["data_offsets"][0] + r0 * row_items * dtype.itemsize
        count = (r1 - r0) * row_items if shape else 1
        arr = np.fromfile(self.path, dtype=dtype.newbyteorder("<"), count=count, offset=offset)
        return arr.reshape(((r1 - r0),) + shape[1:] if shape else ())


HF_LAYER = {"attn_norm": "input_layernorm.weight", "wq": "self_attn.q_proj.weight",
            "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight", "wo": "self_attn.o_proj.weight",
            "mlp_norm": "post_attention_layernorm.weight", "w_gate": "mlp.gate_proj.weight",
            "w_up": "mlp.up_proj.weight", "w_down": "mlp.down_proj.weight"}
HF_GLOBAL = {"embed": TensorSpec("model.embed_tokens.weight"), "final_norm": TensorSpec("model.norm.weight"),
             "lm_head": TensorSpec("lm_head.weight", transpose=True)}


class HFCheckpoint(Checkpoint):
    """Hugging Face ``LlamaForCausalLM`` directory: single or sharded safetensors, or ``pytorch_model*.bin``."""

    def __init__(self, path: Path):
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise ValueError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
        try:
            hf = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: invalid JSON ({e})") from e
        archs = hf.get("architectures") or ["LlamaForCausalLM"]
        if hf.get("model_type", "llama") != "llama" or "LlamaForCausalLM" not in archs:
            raise ValueError(f"{cfg_path}: unsupported architecture model_type={hf.get('model_type')!r} "
                             f"architectures={archs} (only LlamaForCausalLM)")
        try:
            config = LlamaConfig.from_hf_dict(hf)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{cfg_path}: {e}") from e
        super().__init__(path, config)
        self.file_of, self.listing = self._weight_map(path)  # key -> file name
        self.format = "hf-safetensors" if next(iter(self.file_of.values())).endswith(".safetensors") else "hf-torch"
        self._open: dict[str, Any] = {}

    @staticmethod
    def _weight_map(path: Path) -> tuple[dict[str, str], str]:
        """``(key -> file name, the file listing the keys)`` from an index file or the single weights file."""
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = path / index_name
            if index.is_file():
                try:
                    weight_map = dict(json.loads(index.read_text())["weight_map"])
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                    raise ValueError(f"{index}: not a valid index file ({e})") from e
                for key, name in weight_map.items():
                    if (not isinstance(name, str) or Path(name).name != name or name.startswith(".")
                            or Path(name).suffix not in (".safetensors", ".bin")):
                        raise ValueError(f"{index}: tensor {key} points at {name!r}; expected a .safetensors or "
                                         f".bin file name inside {path}")
                return weight_map, index_name
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (path / single).is_file():
                return {key: single for key in _file_reader(path / single).keys()}, single
        raise ValueError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model*.bin")

    def _file(self, key: str):
        if key not in self.file_of:
            raise ValueError(f"{self.path}: missing tensor {key}")
        name = self.file_of[key]
        if name not in self._open:
            self._open[name] = _file_reader(self.path / name)
        return self._open[name]

    def spec(self, name: str) -> TensorSpec:
        if name.startswith("layers."):
            return _layer_spec(name, HF_LAYER, "model.layers.{i}.", self.config, None)
        return HF_GLOBAL[name]

    def keys(self) -> set[str]:
        return set(self.file_of)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._file(key).shape(key)

    def read(self, key: str, rows: slice | None = None) -> np.ndarray:
        return self._file(key).read(key, rows)

    def where(self, key: str) -> str:
        return str(self.path / self.file_of.get(key, self.listing))

    def release(self) -> None:
        for f in self._open.values():
            if isinstance(f, TorchFile):
                f.release()


class TorchFile:
    """A torch pickle checkpoint read safely: ``torch.load(mmap=True, weights_only=True)`` (torch imported lazily).

    ``weights_only=True`` restricts unpickling to tensors and plain containers, so loading cannot run code.
    ``release()`` drops the memory map (its touched pages count as resident memory); the next read maps it again.
    """

    def __init__(self, path: Path):
        self.path = path
        self._state: dict | None = self._load()  # fail early on a damaged file

    def _load(self) -> dict:
        import torch  # only needed for torch checkpoints

        try:
            state = torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # torch raises many types for a damaged zip/pickle
            raise ValueError(f"{self.path}: cannot read torch checkpoint ({type(e).__name__}: {e})") from e
        if not isinstance(state, dict):
            raise ValueError(f"{self.path}: expected a dict of tensors, found {type(state).__name__}")
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{self.path}: entry {key!r} is a {type(value).__name__}, expected a tensor")
        return state

    @property
    def state(self) -> dict:
        if self._state is None:
            self._state = self._load()
        return self._state

    def release(self) -> None:
        self._state = None

    def keys(self) -> set[str]:
        return set(self.state)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.state[key].shape)

    def read(self, key: str, rows: slice | None = None) -> np.ndarray:
        import torch

        t = self.state[key]
        if not t.is_floating_point():
            raise ValueError(f"{self.path}: tensor {key} has dtype {t.dtype}, expected a float type")
        t = (t if rows is None or t.ndim == 0 else t[rows]).contiguous()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()


def _file_reader(path: Path) -> SafetensorsFile | TorchFile:
    return SafetensorsFile(path) if path.suffix == ".safetensors" else TorchFile(path)


# ------------------------------------------------------------------------------------------------ Meta
META_LAYER = {"attn_norm": "attention_norm.weight", "wq": "attention.wq.weight", "wk": "attention.wk.weight",
              "wv": "attention.wv.weight", "wo": "attention.wo.weight", "mlp_norm": "ffn_norm.weight",
              "w_gate": "feed_forward.w1.weight", "w_up": "feed_forward.w3.weight",
              "w_down": "feed_forward.w2.weight"}
META_GLOBAL = {"embed": TensorSpec("tok_embeddings.weight"), "final_norm": TensorSpec("norm.weight"),
               "lm_head": TensorSpec("output.weight", transpose=True)}


class MetaCheckpoint(Checkpoint):
    """Meta's original release: ``params.json`` + ``consolidated.NN.pth`` (one per model-parallel rank).

    Meta rotates *interleaved* pairs ``(x[2i], x[2i+1])``; we (and Hugging Face) rotate half-split pairs
    ``(x[i], x[i + d/2])``. Reordering the output rows of ``wq``/``wk`` per head (`permute_qk_weight`) makes the
    half-split rotation of the new projection equal the interleaved rotation of the old one. ``q·k`` is unchanged
    because q and k are permuted the same way. Ranks > 1 are concatenated along the axis that was split.
    """

    format = "meta"

    def __init__(self, path: Path, shards: list[Path]):
        params_path = path / "params.json"
        try:
            params = json.loads(params_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{params_path}: cannot read params.json ({e})") from e
        self.shards = [TorchFile(s) for s in shards]
        first = self.shards[0]
        if "tok_embeddings.weight" not in first.keys():
            raise ValueError(f"{first.path}: missing tensor tok_embeddings.weight")
        vocab = first.shape("tok_embeddings.weight")[0]
        if len(self.shards) > 1 and first.shape("tok_embeddings.weight")[1] == params.get("dim"):
            vocab *= len(self.shards)  # vocab-parallel embedding (Llama 3) rather than dim-parallel (Llama 2)
        try:
            config = LlamaConfig.from_meta_params(params, vocab_size=params.get("vocab_size") or vocab)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{params_path}: {e}") from e
        super().__init__(path, replace(config, tie_word_embeddings="output.weight" not in first.keys()))

    def spec(self, name: str) -> TensorSpec:
        if name.startswith("layers."):
            return _layer_spec(name, META_LAYER, "layers.{i}.", self.config, ("wq", "wk"))
        return META_GLOBAL[name]

    def keys(self) -> set[str]:
        return self.shards[0].keys()

    def _full_shape(self, key: str) -> tuple[int, ...] | None:
        """Our expected shape of the source tensor ``key`` (``[out, in]``), if it is one of ours."""
        for name, shape in expected_shapes(self.config).items():
            spec = self.spec(name)
            if spec.key == key:
                return shape[::-1] if spec.transpose else shape
        return None

    def shape(self, key: str) -> tuple[int, ...]:
        shapes = [s.shape(key) for s in self.shards]
        full = self._full_shape(key)
        if len(shapes) == 1 or full is None or len(full) < 2 or shapes[0] == full:
            return shapes[0]
        axis = 0 if shapes[0][1] == full[1] else 1
        out = list(shapes[0])
        out[axis] = sum(s[axis] for s in shapes)
        return tuple(out)

    def read(self, key: str, rows: slice | None = None) -> np.ndarray:
        for s in self.shards:
            if key not in s.keys():
                raise ValueError(f"{s.path}: missing tensor {key}")
        parts = [s.read(key) for s in self.shards]
        if len(parts) > 1 and parts[0].ndim == 2 and parts[0].shape != self.shape(key):
            axis = 0 if parts[0].shape[1] == self.shape(key)[1] else 1
            full = np.concatenate(parts, axis=axis)
        else:
            full = parts[0]
        return full if rows is None else full[rows]

    def where(self, key: str) -> str:
        return str(self.shards[0].path)

    def release(self) -> None:
        for s in self.shards:
            s.release()


# ------------------------------------------------------------------------------------------------ GGUF
GGUF_LAYER = {"attn_norm": "attn_norm.weight", "wq": "attn_q.weight", "wk": "attn_k.weight",
              "wv": "attn_v.weight", "wo": "attn_output.weight", "mlp_norm": "ffn_norm.weight",
              "w_gate": "ffn_gate.weight", "w_up": "ffn_up.weight", "w_down": "ffn_down.weight"}
GGUF_GLOBAL = {"embed": TensorSpec("token_embd.weight"), "final_norm": TensorSpec("output_norm.weight"),
               "lm_head": TensorSpec("output.weight", transpose=True)}


class GGUFCheckpoint(Checkpoint):
    """A llama.cpp GGUF file (architecture ``llama``); quantised tensors are dequantised to float32.

    llama.cpp's converter reorders the rows of ``attn_q``/``attn_k`` from Hugging Face's half-split RoPE layout into
    the interleaved layout its kernels use (``convert_hf_to_gguf.py``: ``reshape(heads, 2, d/2, in).swapaxes(1, 2)``).
    Undoing it is the same per-head permutation as for Meta checkpoints (``transformers`` does the same in
    ``LlamaTensorProcessor._reverse_permute_weights``), with ``num_kv_heads`` heads for ``attn_k``.
    """

    format = "gguf"

    def __init__(self, path: Path):
        import gguf

        try:
            self.reader = _checked_gguf_reader_class()(str(path))
        except ValueError as e:
            if str(path) in str(e):  # already one of our messages
                raise
            raise ValueError(f"{path}: cannot read GGUF file ({e})") from e
        except Exception as e:  # the reader raises IndexError/KeyError/struct errors on damaged files
            raise ValueError(f"{path}: cannot read GGUF file ({type(e).__name__}: {e})") from e
        self.tensors = {t.name: t for t in self.reader.tensors}
        super().__init__(path, self._config(path))

    def _field(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def _config(self, path: Path) -> LlamaConfig:
        arch = self._field("general.architecture")
        if arch != "llama":
            raise ValueError(f"{path}: unsupported architecture general.architecture={arch!r} (only 'llama')")
        if "rope_freqs.weight" in self.tensors or self._field("llama.rope.scaling.type") not in (None, "none"):
            raise ValueError(f"{path}: RoPE frequency scaling in GGUF files is not supported")
        if "token_embd.weight" not in self.tensors:
            raise ValueError(f"{path}: missing tensor token_embd.weight")
        try:
            hidden, heads = int(self._field("llama.embedding_length")), int(self._field("llama.attention.head_count"))
            return LlamaConfig(
                vocab_size=int(self._field("llama.vocab_size", self.tensors["token_embd.weight"].shape[-1])),
                hidden_size=hidden, intermediate_size=int(self._field("llama.feed_forward_length")),
                num_layers=int(self._field("llama.block_count")), num_heads=heads,
                num_kv_heads=int(self._field("llama.attention.head_count_kv", heads)),
                head_dim=int(self._field("llama.rope.dimension_count", hidden // heads)),
                rms_norm_eps=_f32(self._field("llama.attention.layer_norm_rms_epsilon", 1e-5)),
                rope_theta=_f32(self._field("llama.rope.freq_base", 10_000.0)),
                max_position_embeddings=int(self._field("llama.context_length", 8192)),
                tie_word_embeddings="output.weight" not in self.tensors,
                bos_token_id=self._field("tokenizer.ggml.bos_token_id"),
                eos_token_id=self._field("tokenizer.ggml.eos_token_id"))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: invalid or incomplete llama metadata ({e})") from e

    def spec(self, name: str) -> TensorSpec:
        if name.startswith("layers."):
            return _layer_spec(name, GGUF_LAYER, "blk.{i}.", self.config, ("wq", "wk"))
        return GGUF_GLOBAL[name]

    def keys(self) -> set[str]:
        return set(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self.tensors[key].shape))  # GGUF lists dimensions innermost first

    def read(self, key: str, rows: slice | None = None) -> np.ndarray:
        from gguf.quants import dequantize

        t = self.tensors[key]
        try:
            arr = dequantize(t.data, t.tensor_type).reshape(self.shape(key))
        except (NotImplementedError, ValueError) as e:
            raise ValueError(f"{self.path}: tensor {key} ({t.tensor_type.name}) cannot be dequantised ({e})") from e
        arr = arr.astype(np.float32, copy=False)
        return arr if rows is None else arr[rows]

    def close(self) -> None:
        self.tensors.clear()
        del self.reader


@functools.cache
def _checked_gguf_reader_class() -> type:
    """A ``gguf.GGUFReader`` that validates every tensor's type, dimensions and data span against the file size
    before the reader builds its (memory-mapped) views, so an absurd header fails with the tensor's name."""
    import gguf

    class CheckedGGUFReader(gguf.GGUFReader):
        def _build_tensors(self, start_offs: int, fields: list) -> None:
            size = len(self.data)
            for field in fields:
                _, name_data, _, dims, raw_dtype, offset = field.parts
                name = bytes(name_data).decode("utf-8", errors="replace")
                where = f"{Path(self.data.filename)}: tensor {name}"
                try:
                    qtype = gguf.GGMLQuantizationType(int(raw_dtype[0]))
                except ValueError:
                    raise ValueError(f"{where}: unknown GGML type {int(raw_dtype[0])}") from None
                shape = [int(d) for d in dims]
                elements = math.prod(shape)
                if not shape or min(shape) <= 0 or elements > MAX_TENSOR_ELEMENTS:
                    raise ValueError(f"{where}: dimensions {shape} ({elements} elements) must be positive and hold "
                                     f"at most {MAX_TENSOR_ELEMENTS} elements; refusing it")
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
                if shape[0] % block:
                    raise ValueError(f"{where}: row of {shape[0]} values is not a whole number of {qtype.name} "
                                     f"blocks of {block}")
                end = int(start_offs) + int(offset[0]) + elements // block * type_size
                if end > size:
                    raise ValueError(f"{where}: data ends at byte {end}, the file has {size} (truncated or corrupt)")
            super()._build_tensors(start_offs, fields)

    return CheckedGGUFReader


def _f32(value: float) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (``9.99999974e-06`` -> ``1e-05``)."""
    return float(str(np.float32(value)))


def open_checkpoint(src: str | os.PathLike) -> Checkpoint:
    """Detect the format of ``src`` (GGUF file, Meta dir, Hugging Face dir) and open it."""
    path = Path(src)
    if path.is_file():
        if path.suffix == ".gguf":
            return GGUFCheckpoint(path)
        raise ValueError(f"{path}: unsupported checkpoint file (expected a .gguf file or a checkpoint directory)")
    if not path.is_dir():
        raise ValueError(f"{path}: no such checkpoint file or directory")
    shards = sorted(path.glob("consolidated.*.pth"))
    if shards and (path / "params.json").is_file():
        return MetaCheckpoint(path, shards)
    return HFCheckpoint(path)


# ================================================================================================ writing
def _our_tensor(ckpt: Checkpoint, name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """Read our tensor ``name`` from ``ckpt`` in our layout (``[in, out]``, half-split q/k) and ``dtype``.

    Large matrices are read in row blocks and transposed block by block into the output, so the peak memory is
    the output tensor plus one block."""
    spec = ckpt.spec(name)
    if spec.key not in ckpt.keys():
        raise ValueError(f"{ckpt.where(spec.key)}: missing tensor {spec.key} (for {name})")
    stored = shape[::-1] if spec.transpose else shape
    if ckpt.shape(spec.key) != stored:
        raise ValueError(f"{ckpt.where(spec.key)}: tensor {spec.key} has shape {ckpt.shape(spec.key)}, the config "
                         f"implies {stored}")
    if spec.rope_heads is not None:  # small: permute the whole [out, in] matrix, then transpose
        w = permute_qk_weight(ckpt.read(spec.key), spec.rope_heads, ckpt.config.head_dim)
        return np.ascontiguousarray(w.T, dtype=dtype)
    if not spec.transpose:
        return np.ascontiguousarray(ckpt.read(spec.key), dtype=dtype)
    out = np.empty(shape, dtype)
    block = max(1, ROW_BLOCK_BYTES // (4 * shape[0]))
    for r0 in range(0, stored[0], block):
        out[:, r0:r0 + block] = ckpt.read(spec.key, slice(r0, r0 + block)).T
    return out


def write_safetensors(path: Path, names: list[str], shapes: dict[str, tuple[int, ...]], dtype: Any,
                      produce: Callable[[str], np.ndarray]) -> str:
    """Write a safetensors file tensor by tensor (only one tensor in memory) and return its SHA-256.

    The header is known up front from ``shapes`` and ``dtype``; ``produce(name)`` is called once per tensor, in
    order, and must return exactly that shape and dtype."""
    dt = np.dtype(dtype)
    header: dict[str, Any] = {}
    offset = 0
    for name in names:
        nbytes = int(np.prod(shapes[name], dtype=np.int64)) * dt.itemsize
        header[name] = {"dtype": ST_CODES[dt], "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    digest = hashlib.sha256()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for chunk in (struct.pack("<Q", len(blob)), blob):
            f.write(chunk)
            digest.update(chunk)
        for name in names:
            arr = produce(name)
            if arr.shape != tuple(shapes[name]) or arr.dtype != dt:
                raise ValueError(f"{path.name}: tensor {name} is {arr.shape} {arr.dtype}, expected "
                                 f"{tuple(shapes[name])} {dt}")
            data = memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
            f.write(data)
            digest.update(data)
            del arr, data
    return digest.hexdigest()


def _plan(cfg: LlamaConfig) -> dict[str, list[str]]:
    """Output file -> our tensor names in it (layer files hold names without the ``layers.i.`` prefix)."""
    first = ["embed", "final_norm"] + ([] if cfg.tie_word_embeddings else ["lm_head"])
    plan = {EMBEDDINGS_FILE: first}
    for i in range(cfg.num_layers):
        plan[layer_file(i)] = list(LAYER_TENSORS)
    return plan


def _full_name(file: str, short: str) -> str:
    m = re.fullmatch(r"layer_(\d+)\.safetensors", file)
    return f"layers.{int(m.group(1))}.{short}" if m else short


def check_tensor_names(ckpt: Checkpoint) -> None:
    """Raise ``ValueError`` if the source holds tensors the config does not account for (e.g. more layers than
    ``num_layers``, or another architecture's weights); RoPE tables (`IGNORED_SOURCE_KEYS`) are allowed."""
    cfg, keys = ckpt.config, ckpt.keys()
    if cfg.num_layers * len(LAYER_TENSORS) > len(keys):  # before listing the names of an absurd layer count
        raise ValueError(f"{ckpt.where(next(iter(keys), ''))}: the config describes {cfg.num_layers} layers "
                         f"({cfg.num_layers * len(LAYER_TENSORS)} layer tensors), the checkpoint holds only "
                         f"{len(keys)} tensors")
    used = {ckpt.spec(name).key for name in expected_shapes(cfg)}
    if ckpt.config.tie_word_embeddings:  # some tied checkpoints also store the (identical) output matrix
        used.add(ckpt.spec("lm_head").key)
    extra = sorted(k for k in keys - used if not IGNORED_SOURCE_KEYS.fullmatch(k))
    if extra:
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        raise ValueError(f"{ckpt.where(extra[0])}: unexpected tensor(s) {extra[:5]}{more}: not part of the "
                         f"{cfg.num_layers}-layer model its config describes")


def _remove_stale_temp_files(out: Path, plan: dict[str, list[str]]) -> None:
    """Delete temp files an interrupted run left behind (``.<our file name>.<random>.tmp``, see `atomic_path`)."""
    ours = set(plan) | {"config.json", MANIFEST}
    for tmp in out.glob(".*.tmp"):
        if tmp.name[1:].rsplit(".", 2)[0] in ours:
            tmp.unlink(missing_ok=True)


def _pause() -> None:
    """Sleep ``$KASCADE_CONVERT_PAUSE`` seconds (unset: no pause). Test-only: lets a test kill a run mid-file."""
    seconds = float(os.environ.get(PAUSE_ENV) or 0)
    if seconds > 0:
        time.sleep(seconds)


def _identity(ckpt: Checkpoint, dtype: str) -> dict[str, Any]:
    """What makes two conversions the same model: the source's file name and format, the config and the output
    dtype. Not the source's full path: the same checkpoint in another folder (another venv, a moved download) is
    the same model, and its conversion resumes or is reused."""
    return {"source_name": ckpt.path.name, "source_format": ckpt.format, "dtype": dtype,
            "config": ckpt.config.to_dict()}


def _read_manifest(out: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{out / MANIFEST}: unreadable manifest ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{out / MANIFEST}: not a kascade-lite manifest of format version {FORMAT_VERSION}")
    return manifest


def _prepare_output(out: Path, identity: dict[str, Any], force: bool) -> dict[str, Any]:
    """Return the manifest to resume from (empty ``files`` when starting afresh); refuse foreign content."""
    fresh = dict(format_version=FORMAT_VERSION, complete=False, **identity, files={})
    if not out.exists() or not any(out.iterdir()):
        return fresh
    try:
        old = _read_manifest(out)
    except ValueError:
        if not force:
            raise
        old = None
    same = old is not None and all(old.get(k) == v for k, v in identity.items())
    if same:
        return dict(fresh, files=old.get("files", {}))
    if not force:
        what = f"a different model ({old.get('source')}, dtype {old.get('dtype')})" if old else "files but no manifest"
        raise ValueError(f"{out}: directory holds {what}; pass force=True (--force) to overwrite it")
    for p in list(out.glob("layer_*.safetensors")) + [out / EMBEDDINGS_FILE, out / "config.json", out / MANIFEST]:
        p.unlink(missing_ok=True)
    return fresh


def convert_checkpoint(src: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "float32",
                       force: bool = False, progress: bool = True) -> Path:
    """Convert the checkpoint at ``src`` into ``out_dir`` (see the module docstring) and return ``out_dir``.

    Resumes an interrupted conversion of the same source (files whose SHA-256 matches the manifest are skipped);
    refuses a directory holding another model unless ``force``. Raises ``ValueError`` naming the file and tensor
    for damaged or inconsistent input; the manifest is marked complete only when every file is written.
    """
    from .progress import tqdm

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out, np_dtype = Path(out_dir), DTYPES[dtype]
    ckpt = open_checkpoint(src)
    try:
        cfg = ckpt.config
        check_tensor_names(ckpt)
        manifest = _prepare_output(out, _identity(ckpt, dtype), force)
        manifest["source"] = str(ckpt.path.resolve())  # where it came from this time (information only)
        out.mkdir(parents=True, exist_ok=True)
        _remove_stale_temp_files(out, _plan(cfg))
        shapes = expected_shapes(cfg)
        cfg_file = out / "config.json"
        with atomic_path(cfg_file) as tmp:
            cfg.save(tmp)
        manifest["files"]["config.json"] = {"sha256": sha256_file(cfg_file)}
        plan = _plan(cfg)
        bar = tqdm(plan.items(), desc=f"convert {ckpt.path.name}", unit="file", disable=not progress)
        for file, names in bar:
            entry = manifest["files"].get(file)
            if entry and (out / file).is_file() and sha256_file(out / file) == entry.get("sha256"):
                continue
            full = {n: _full_name(file, n) for n in names}
            file_shapes = {n: shapes[full[n]] for n in names}
            def produce(n: str) -> np.ndarray:
                _pause()
                return _our_tensor(ckpt, full[n], file_shapes[n], np_dtype)

            digest = write_safetensors(out / file, names, file_shapes, np_dtype, produce)
            manifest["files"][file] = {
                "sha256": digest,
                "tensors": {n: {"shape": list(file_shapes[n]), "dtype": ST_CODES[np.dtype(np_dtype)]} for n in names}}
            write_json_atomic(out / MANIFEST, manifest)
            ckpt.release()
        manifest["complete"] = True
        write_json_atomic(out / MANIFEST, manifest)
    finally:
        ckpt.close()
    return out


# ================================================================================================ loading
def verify_converted(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a complete conversion whose every file matches its manifest checksum."""
    path = Path(path)
    try:
        manifest = _read_manifest(path)
    except ValueError:
        return False
    if not manifest or not manifest.get("complete"):
        return False
    return all((path / f).is_file() and sha256_file(path / f) == e["sha256"] for f, e in manifest["files"].items())


def _open_converted(path: Path, verify: bool) -> tuple[LlamaConfig, dict[str, Any]]:
    manifest = _read_manifest(path)
    if manifest is None:
        raise ValueError(f"{path}: no {MANIFEST} (not a converted checkpoint; run `kascade-lite convert`)")
    if not manifest.get("complete"):
        raise ValueError(f"{path}: conversion incomplete (rerun `kascade-lite convert` to resume)")
    if verify and not verify_converted(path):
        raise ValueError(f"{path}: a file does not match its checksum in {MANIFEST}")
    return LlamaConfig.load(path / "config.json"), manifest


def iter_converted(path: str | os.PathLike, *, verify: bool = False) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """Yield ``(file name, {full tensor name: array})`` one file at a time (embeddings first, then each layer)."""
    from safetensors import safe_open

    path = Path(path)
    cfg, manifest = _open_converted(path, verify)
    for file in _plan(cfg):
        if file not in manifest["files"]:
            raise ValueError(f"{path / MANIFEST}: no entry for {file}")
        with safe_open(str(path / file), framework="numpy") as f:
            yield file, {_full_name(file, n): f.get_tensor(n) for n in f.keys()}


def load_converted(path: str | os.PathLike, *, param_dtype: Any = jnp.float32, dtype: Any = jnp.float32,
                   verify: bool = False) -> Llama:
    """Build a `Llama` from a converted directory (weights cast to ``param_dtype``; activations in ``dtype``)."""
    path = Path(path)
    cfg, _ = _open_converted(path, verify)
    tensors: dict[str, np.ndarray] = {}
    for _, part in iter_converted(path):
        tensors.update(part)
    return Llama.from_tensors(cfg, tensors, param_dtype=param_dtype, dtype=dtype)


def smollm2_dir() -> Path:
    """Where the converted SmolLM2-135M-Instruct lives: ``<cache root>/smollm2-135m``."""
    return default_cache_root() / "smollm2-135m"


def converted_smollm2(*, progress: bool = False) -> Path:
    """Convert the bundled SmolLM2 GGUF once (float32) into `smollm2_dir` and return that directory.

    A later call only re-hashes the files (about a second) and converts nothing if they match the manifest."""
    from .data import smollm2_gguf_path

    out = smollm2_dir()
    if verify_converted(out):
        return out
    return convert_checkpoint(smollm2_gguf_path(), out, dtype="float32", force=True, progress=progress)


def load_smollm2(*, dtype: Any = jnp.float32) -> Llama:
    """SmolLM2-135M-Instruct as a `Llama` (converted once, cached; weights and activations in ``dtype``)."""
    return load_converted(converted_smollm2(), param_dtype=dtype, dtype=dtype)
