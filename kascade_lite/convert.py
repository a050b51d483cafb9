"""Streamed, verified conversion of a Llama checkpoint into kascade-lite's own layout, and loading it back.

Sources (GGUF, Hugging Face, Meta) are read by `kascade_lite.checkpoints`. Output directory::

    config.json               LlamaConfig.save
    embeddings.safetensors    embed [vocab, hidden], final_norm [hidden], lm_head [hidden, vocab] (if untied)
    layer_00.safetensors      attn_norm, wq [hidden, H*d], wk/wv [hidden, Hkv*d], wo, mlp_norm, w_gate, w_up, w_down
    ...
    manifest.json             per file: tensor names, shapes, dtypes, sha256; the source; format version

Every projection is stored ``[in, out]`` (so the model computes ``x @ w``), K/V keep their ``num_kv_heads`` heads,
and q/k rows use the half-split RoPE pairing of `kascade_lite.rope` (see `Checkpoint.tensor`).

Conversion streams: one output file is produced at a time and only one tensor of it is in memory (the safetensors
file is written tensor by tensor). Each output file is written atomically; ``manifest.json`` is rewritten after
every file and marked ``complete`` only at the end, so a rerun resumes by skipping files whose checksum matches, and
a half-converted directory is never loaded; temp files of an interrupted run are removed.

Loading streams too (`load_converted`): the model is built shape-only and filled one tensor at a time from the
memory-mapped files, each put on the device before the next is read, so loading Llama-3.1-8B in bfloat16 needs the
model's 16 GB and one tensor more, never a host copy of the model. `write_converted` writes the same layout from a
function (synthetic checkpoints for benchmarks and tests). Named models (the bundled SmolLM2, converted once into
a cache) are `kascade_lite.models`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from .checkpoints import ST_CODES, ST_DTYPES, Checkpoint, check_tensor_names, open_checkpoint
from .config import LlamaConfig
from .files import atomic_path, sha256_file, write_json_atomic
from .model import LAYER_TENSORS, Llama, expected_shapes

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
EMBEDDINGS_FILE = "embeddings.safetensors"

DTYPES: dict[str, Any] = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
"""Output dtypes accepted by `convert_checkpoint`."""


def layer_file(i: int) -> str:
    """File name of layer ``i``: ``layer_00.safetensors`` (two digits, more when a model has > 100 layers)."""
    return f"layer_{i:02d}.safetensors"


# ================================================================================================ writing
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


def _remove_stale_temp_files(out: Path, plan: dict[str, list[str]]) -> None:
    """Delete temp files an interrupted run left behind (``.<our file name>.<random>.tmp``, see `atomic_path`)."""
    ours = set(plan) | {"config.json", MANIFEST}
    for tmp in out.glob(".*.tmp"):
        if tmp.name[1:].rsplit(".", 2)[0] in ours:
            tmp.unlink(missing_ok=True)


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
        _write_config(out, cfg, manifest)
        bar = tqdm(_plan(cfg), desc=f"convert {ckpt.path.name}", unit="file", disable=not progress)
        for file in bar:
            entry = manifest["files"].get(file)
            if entry and (out / file).is_file() and sha256_file(out / file) == entry.get("sha256"):
                continue

            _write_file(out, cfg, file, np_dtype, lambda name, shape: ckpt.tensor(name, shape, np_dtype), manifest)
            ckpt.release()
        manifest["complete"] = True
        write_json_atomic(out / MANIFEST, manifest)
    finally:
        ckpt.close()
    return out


def write_converted(out_dir: str | os.PathLike, cfg: LlamaConfig,
                    produce: Callable[[str, tuple[int, ...]], np.ndarray], *, dtype: str = "bfloat16",
                    source: str = "generated", progress: bool = True) -> Path:
    """Write a converted directory of ``cfg`` whose weights come from ``produce(full tensor name, [in, out] shape)``
    (called once per tensor, one tensor in memory at a time) and return ``out_dir``.

    The same files and manifest as `convert_checkpoint` (source format ``"generated"``, named ``source``), so
    `load_converted` reads it: for synthetic checkpoints (benchmarks, tests). ``out_dir`` must be empty or absent."""
    from .progress import tqdm

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: not empty; write_converted writes into an empty or new directory")
    identity = {"source_name": source, "source_format": "generated", "dtype": dtype, "config": cfg.to_dict()}
    manifest = dict(format_version=FORMAT_VERSION, complete=False, **identity, source=source, files={})
    _write_config(out, cfg, manifest)
    for file in tqdm(_plan(cfg), desc=f"write {out.name}", unit="file", disable=not progress):
        _write_file(out, cfg, file, DTYPES[dtype], produce, manifest)
    manifest["complete"] = True
    write_json_atomic(out / MANIFEST, manifest)
    return out


def _write_config(out: Path, cfg: LlamaConfig, manifest: dict[str, Any]) -> None:
    """Write ``config.json`` atomically and record its checksum in ``manifest``."""
    cfg_file = out / "config.json"
    with atomic_path(cfg_file) as tmp:
        cfg.save(tmp)
    manifest["files"]["config.json"] = {"sha256": sha256_file(cfg_file)}


def _write_file(out: Path, cfg: LlamaConfig, file: str, np_dtype: Any,
                produce: Callable[[str, tuple[int, ...]], np.ndarray], manifest: dict[str, Any]) -> None:
    """Write output ``file`` of `_plan` tensor by tensor (``produce(full name, shape)`` gives each, in
    ``np_dtype``), record its tensors and SHA-256 in ``manifest`` and rewrite ``manifest.json``."""
    shapes = expected_shapes(cfg)
    names = _plan(cfg)[file]
    file_shapes = {n: shapes[_full_name(file, n)] for n in names}
    digest = write_safetensors(out / file, names, file_shapes, np_dtype,
                               lambda n: produce(_full_name(file, n), file_shapes[n]))
    manifest["files"][file] = {
        "sha256": digest,
        "tensors": {n: {"shape": list(file_shapes[n]), "dtype": ST_CODES[np.dtype(np_dtype)]} for n in names}}
    write_json_atomic(out / MANIFEST, manifest)


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


@contextmanager
def _safe_open(path: Path) -> Iterator[Any]:
    """``safetensors.safe_open(path, framework="numpy")`` (memory-mapped; tensors are read only when asked for),
    with a damaged file reported as ``ValueError`` naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        f = safe_open(str(path), framework="numpy")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: unreadable safetensors file ({e})") from e
    with f:
        yield f


def _stored_nbytes(f: Any, path: Path, name: str, shape: tuple[int, ...]) -> int:
    """Bytes of tensor ``name`` of the open file ``f`` (at ``path``), after checking that it is there, of ``shape``
    and of a float dtype (reads the header only)."""
    if name not in f.keys():
        raise ValueError(f"{path}: missing tensor {name}")
    view = f.get_slice(name)
    got, dtype = tuple(view.get_shape()), view.get_dtype()
    if got != shape:
        raise ValueError(f"{path}: tensor {name} has shape {got}, config.json expects {shape}")
    if dtype not in ST_DTYPES:
        raise ValueError(f"{path}: tensor {name} has dtype {dtype}, expected a float type ({', '.join(ST_DTYPES)})")
    return math.prod(got) * np.dtype(ST_DTYPES[dtype]).itemsize


class ConvertedTensors(Mapping[str, Any]):
    """The weights of a converted directory as a read-only mapping ``{full tensor name: array}`` that reads lazily.

    Building it reads only the file headers and checks each file's tensor names, shapes and dtypes against
    ``config.json`` (a ``ValueError`` naming the file and the tensor). Looking a tensor up opens its file
    memory-mapped and copies out that one tensor, a NumPy array in its stored dtype (bfloat16 arrives as
    ``ml_dtypes.bfloat16``). With ``dtype``, a look-up returns a device array instead: the tensor cast to ``dtype``
    on the host if it is stored otherwise, put on the device, and the transfer finished before it returns, the host
    copy then dropped (or, on CPU, adopted as the device buffer), so reading the whole model holds at most one tensor
    in host memory beside the device arrays, never a host copy of the model.
    Iteration follows the files: embeddings, then each layer. ``nbytes``: the bytes of all tensors as stored;
    ``on_read(nbytes)``, if set, is called after each read.
    """

    def __init__(self, path: Path, cfg: LlamaConfig, manifest: dict[str, Any], *, dtype: Any = None):
        self.path, self.dtype, self.on_read, self.nbytes = path, dtype, None, 0
        self._where: dict[str, tuple[str, str]] = {}  # full name -> (file, name in the file), in reading order
        shapes = expected_shapes(cfg)
        for file, names in _plan(cfg).items():
            if file not in manifest["files"]:
                raise ValueError(f"{path / MANIFEST}: no entry for {file}")
            with _safe_open(path / file) as f:
                extra = sorted(set(f.keys()) - set(names))
                if extra:
                    raise ValueError(f"{path / file}: unexpected tensors {extra}")
                for n in names:
                    self.nbytes += _stored_nbytes(f, path / file, n, shapes[_full_name(file, n)])
                    self._where[_full_name(file, n)] = (file, n)

    @property
    def files(self) -> dict[str, list[str]]:
        """File name -> the full names of its tensors, in reading order."""
        out: dict[str, list[str]] = {}
        for name, (file, _) in self._where.items():
            out.setdefault(file, []).append(name)
        return out

    def __getitem__(self, name: str) -> np.ndarray | jax.Array:
        file, short = self._where[name]
        with _safe_open(self.path / file) as f:
            arr = f.get_tensor(short)
        if self.on_read is not None:
            self.on_read(arr.nbytes)
        if self.dtype is None:
            return arr
        # on CPU, JAX adopts a 64-byte-aligned host buffer as the device buffer instead of copying it: either way
        # no second copy of the tensor outlives this call
        return jax.device_put(arr.astype(self.dtype, copy=False)).block_until_ready()

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def iter_converted(path: str | os.PathLike, *, verify: bool = False) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """Yield ``(file name, {full tensor name: array})`` one file at a time (embeddings first, then each layer)."""
    path = Path(path)
    cfg, manifest = _open_converted(path, verify)
    tensors = ConvertedTensors(path, cfg, manifest)
    for file, names in tensors.files.items():
        yield file, {name: tensors[name] for name in names}


def load_converted(path: str | os.PathLike, *, param_dtype: Any = jnp.float32, dtype: Any = jnp.float32,
                   verify: bool = False, progress: bool = False) -> Llama:
    """Build a `Llama` from a converted directory (weights cast to ``param_dtype``; activations in ``dtype``).

    Streams, without a host copy of the model: the model is built shape-only (`Llama.from_tensors`: no random
    init) and filled from `ConvertedTensors` one tensor at a time (a memory-mapped read, cast to ``param_dtype``
    only if stored otherwise, put on the device, the host copy dropped before the next read). Host memory above
    the model is one tensor: for Llama-3.1-8B in bfloat16, at most the 1 GB embedding. ``progress`` shows a bar
    of the bytes read."""
    from .progress import tqdm

    path = Path(path)
    cfg, manifest = _open_converted(path, verify)
    tensors = ConvertedTensors(path, cfg, manifest, dtype=param_dtype)
    with tqdm(total=tensors.nbytes, desc=f"load {path.name}", unit="B", unit_scale=True,
              disable=not progress) as bar:
        tensors.on_read = bar.update
        return Llama.from_tensors(cfg, tensors, param_dtype=param_dtype, dtype=dtype)
