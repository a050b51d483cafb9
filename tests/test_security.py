"""Untrusted checkpoints: nothing is unpickled, and hostile headers are refused before anything large is allocated.

* no code path may unpickle: a scan of the package, benchmarks, notebooks and tests for pickle use;
* a torch ``.bin``/``.pth`` whose pickle would run a command is refused (``weights_only=True``) and the command
  does not run;
* safetensors and GGUF headers claiming absurd sizes, offsets or types fail fast with the file and tensor named,
  without the process growing (resident memory is checked);
* an index file cannot point outside the checkpoint directory.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from tiny_checkpoints import TINY, patch_gguf_tensor_info, write_gguf, write_hf

from kascade_lite.checkpoints import SafetensorsFile, open_checkpoint
from kascade_lite.convert import convert_checkpoint

REPO = Path(__file__).resolve().parents[1]

# Each pattern is one way to unpickle untrusted bytes. (Built from pieces so this file does not match itself.)
PICKLE = "pick" + "le"
FORBIDDEN = {
    f"import {PICKLE}": re.compile(rf"^\s*(import|from)\s+(c?{PICKLE}|dill|joblib)\b", re.M),
    f"{PICKLE}.load": re.compile(rf"\b{PICKLE}\.loads?\("),
    f"cloud{PICKLE}": re.compile(rf"cloud{PICKLE}"),
    f"np.load(allow_{PICKLE}=True)": re.compile(rf"allow_{PICKLE}\s*=\s*True"),
}
TORCH_LOAD = re.compile(r"torch\.load\(")


def source_files() -> list[Path]:
    files = []
    for folder in ("kascade_lite", "benchmarks", "notebooks", "tests"):
        files += [p for p in (REPO / folder).rglob("*") if p.suffix in (".py", ".ipynb") and p.is_file()
                  and ".ipynb_checkpoints" not in p.parts]
    return files


def torch_load_calls(text: str) -> list[str]:
    """The text of every call of torch's loader (parentheses balanced), to check its arguments."""
    calls = []
    for m in TORCH_LOAD.finditer(text):
        depth, i = 0, m.end() - 1
        while i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            if depth == 0:
                break
            i += 1
        calls.append(text[m.start():i + 1])
    return calls


def test_no_pickle_anywhere() -> None:
    problems = []
    for path in source_files():
        text = path.read_text(errors="replace")
        if path.suffix == ".ipynb":  # notebook JSON: look at the code, unescaped
            cells = json.loads(text)["cells"]
            text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        for what, pattern in FORBIDDEN.items():
            if pattern.search(text):
                problems.append(f"{path.relative_to(REPO)}: {what}")
        for call in torch_load_calls(text):
            if not re.search(r"weights_only\s*=\s*True", call):
                problems.append(f"{path.relative_to(REPO)}: {call.splitlines()[0]} without weights_only=True")
    assert not problems, "\n".join(problems)
    assert len(source_files()) > 20  # the scan did look at the project


# ------------------------------------------------------------------------------------------------ malicious pickles
class Payload:
    """Unpickling this calls ``os.system("touch <marker>")``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_malicious(path: Path, marker: Path) -> None:
    import torch

    torch.save({"model.embed_tokens.weight": torch.zeros(TINY.vocab_size, TINY.hidden_size),
                "model.norm.weight": Payload(marker)}, path)


def reduces_to_system(path: Path) -> bool:
    """True when the pickle inside a torch zip really imports ``system`` (so the test below is not vacuous)."""
    import pickletools  # a disassembler: it lists opcodes and never unpickles (nothing here can run the payload)

    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    return any(arg == "system" or (isinstance(arg, str) and arg.endswith(" system"))
               for _, arg, _ in pickletools.genops(data))


@pytest.mark.parametrize("layout", ["hf-bin", "meta-pth"])
def test_malicious_pickle_is_refused_and_never_runs(layout: str, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    marker = tmp_path / "pwned"
    src = tmp_path / "src"
    src.mkdir()
    if layout == "hf-bin":
        (src / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
        weights = src / "pytorch_model.bin"
    else:
        (src / "params.json").write_text(json.dumps({"dim": 32, "n_layers": 1, "n_heads": 4, "vocab_size": 64}))
        weights = src / "consolidated.00.pth"
    write_malicious(weights, marker)
    assert reduces_to_system(weights)
    with pytest.raises(ValueError, match=re.escape(str(weights)) + r".*cannot read torch checkpoint") as err:
        convert_checkpoint(src, tmp_path / "out", progress=False)
    assert "weights_only" in str(err.value) or "Unsupported" in str(err.value) or "global" in str(err.value).lower()
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_torch_file_must_hold_only_tensors(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
    torch.save({"model.norm.weight": torch.ones(32), "step": 3}, src / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: entry 'step' is a int, expected a tensor"):
        convert_checkpoint(src, tmp_path / "out", progress=False)


# ------------------------------------------------------------------------------------------------ hostile headers
def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kB


def safetensors_bytes(header: dict, data: bytes = b"", length: int | None = None) -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob) if length is None else length) + blob + data


@pytest.mark.parametrize("content, message", [
    (safetensors_bytes({}, length=1 << 60), r"claims 1152921504606846976 bytes of JSON"),
    (safetensors_bytes({"w": {"dtype": "F32", "shape": [10**15], "data_offsets": [0, 4 * 10**15]}}),
     r"tensor w: shape \[1000000000000000\] claims 1000000000000000 elements"),
    (safetensors_bytes({"w": {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]}}),
     r"tensor w: shape \[4294967296, 4294967296\] claims"),  # int64 product would wrap to 0
    (safetensors_bytes({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
     r"truncated file: tensor w ends at byte"),
    (safetensors_bytes({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, b"\0" * 16),
     r"tensor w: shape \[-4\] is not a list of non-negative integers"),
    (safetensors_bytes({"w": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}, b"\0" * 16),
     r"tensor w: data_offsets \[16, 0\] are not \[begin, end\]"),
    (safetensors_bytes({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                        "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, b"\0" * 16),
     r"tensors a and b overlap"),
    (safetensors_bytes({"w": {"dtype": "F32"}}), r"tensor w: shape None"),
    (safetensors_bytes([1, 2]), r"corrupt safetensors header \(a JSON list"),
    (safetensors_bytes({"w": "x"}), r"tensor w: header entry is a str"),
])
def test_hostile_safetensors_header(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    before = max_rss_mb()
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + message):
        SafetensorsFile(path)
    assert max_rss_mb() - before < 50  # nothing of the claimed size was allocated


@pytest.mark.parametrize("patch, message", [
    (dict(dims=[10**15, 32]), r"dimensions \[1000000000000000, 32\] \(32000000000000000 elements\)"),
    (dict(dims=[2**32, 2**32]), r"dimensions \[4294967296, 4294967296\]"),  # uint64 product would wrap to 0
    (dict(dims=[0, 32]), r"dimensions \[0, 32\]"),
    (dict(offset=1 << 40), r"data ends at byte \d+, the file has \d+"),
    (dict(ggml_type=999), r"unknown GGML type 999"),
    (dict(dims=[8, 128], ggml_type=2), r"row of 8 values is not a whole number of Q4_0 blocks of 32"),
])
def test_hostile_gguf_tensor_header(tmp_path: Path, patch: dict, message: str) -> None:
    path = write_gguf(tmp_path / "m.gguf")
    patch_gguf_tensor_info(path, "blk.1.attn_q.weight", **patch)
    before = max_rss_mb()
    with pytest.raises(ValueError, match=re.escape(str(path)) + f": tensor blk\\.1\\.attn_q\\.weight: {message}"):
        convert_checkpoint(path, tmp_path / "out", progress=False)
    assert max_rss_mb() - before < 50
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field_offset, value", [(8, 1 << 60), (16, 1 << 60)])  # tensor count, metadata count
def test_gguf_absurd_counts_fail_fast(tmp_path: Path, field_offset: int, value: int) -> None:
    path = write_gguf(tmp_path / "m.gguf")
    data = bytearray(path.read_bytes())
    struct.pack_into("<Q", data, field_offset, value)
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=re.escape(str(path))):
        open_checkpoint(path)


def test_gguf_claiming_a_billion_layers(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf")
    data = bytearray(path.read_bytes())
    key = b"llama.block_count"
    at = data.index(struct.pack("<Q", len(key)) + key) + 8 + len(key)  # then: u32 value type, u32 value
    struct.pack_into("<I", data, at + 4, 10**9)
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"m\.gguf: the config describes 1000000000 layers"):
        convert_checkpoint(path, tmp_path / "out", progress=False)


def test_index_cannot_point_outside_the_checkpoint(tmp_path: Path) -> None:
    src = write_hf(tmp_path / "src")
    outside = tmp_path / "secret.safetensors"
    shutil.copy(src / "model.safetensors", outside)
    (src / "model.safetensors").rename(src / "model-00001-of-00001.safetensors")
    keys = SafetensorsFile(src / "model-00001-of-00001.safetensors").keys()
    weight_map = {k: "model-00001-of-00001.safetensors" for k in keys}
    for bad in ("../secret.safetensors", str(outside), "notes.txt"):
        (src / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": dict(weight_map, **{"model.norm.weight": bad})}))
        with pytest.raises(ValueError, match=r"index\.json: tensor model\.norm\.weight points at"):
            convert_checkpoint(src, tmp_path / "out", progress=False)
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert convert_checkpoint(src, tmp_path / "out", progress=False).is_dir()


def test_read_only_header_validation_does_not_read_data(tmp_path: Path) -> None:
    """A well-formed header is accepted by looking at the header and the file size only."""
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = tmp_path / "ok.safetensors"
    path.write_bytes(safetensors_bytes({"w": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]}},
                                       arr.tobytes()))
    f = SafetensorsFile(path)
    np.testing.assert_array_equal(f.read("w", slice(1, 3)), arr[1:3])
