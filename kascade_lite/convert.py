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
``$KASCADE_CONVERT_PAUSE`` (seconds, test-only) sleeps before each output tensor so a test can kill a conversion
mid-file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from .checkpoints import ST_CODES, Checkpoint, check_tensor_names, open_checkpoint
from .config import LlamaConfig
from .files import atomic_path, sha256_file, write_json_atomic
from .model import LAYER_TENSORS, Llama, expected_shapes

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
EMBEDDINGS_FILE = "embeddings.safetensors"

DTYPES: dict[str, Any] = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
"""Output dtypes accepted by `convert_checkpoint`."""

PAUSE_ENV = "KASCADE_CONVERT_PAUSE"
"""Test hook: seconds to sleep before producing each output tensor, so a test can kill a conversion mid-way."""



def layer_file(i: int) -> str:
    """File name of layer ``i``: ``layer_00.safetensors`` (two digits, more when a model has > 100 layers)."""
    return f"layer_{i:02d}.safetensors"


def default_cache_root() -> Path:
    """``$KASCADE_CACHE`` or ``~/.cache/kascade-lite``: where converted checkpoints are kept."""
    return Path(os.environ.get("KASCADE_CACHE") or Path.home() / ".cache" / "kascade-lite")


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
                return ckpt.tensor(full[n], file_shapes[n], np_dtype)

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


def smollm2_or_tiny(smoke: bool, num_layers: int = 4) -> Llama:
    """SmolLM2-135M (float32), or with ``smoke`` a tiny random Llama of ``num_layers`` layers with SmolLM2's
    vocabulary and head layout (9 query / 3 KV heads): what the benchmark scripts run at full and smoke size."""
    if not smoke:
        return load_smollm2()
    return Llama(LlamaConfig(vocab_size=49152, hidden_size=48, intermediate_size=96, num_layers=num_layers,
                             num_heads=9, num_kv_heads=3, head_dim=16, max_position_embeddings=8192,
                             tie_word_embeddings=True))
