"""Every bad input is one clear ``ValueError`` naming the file / key / value (the table in ``docs/errors.md``), and
on the command line exit status 2 with one ``kascade-lite <cmd>: error: ...`` line and no traceback.

Cases already covered elsewhere are not repeated here: truncated/corrupt HF safetensors, missing tensor, shape
mismatch, non-float dtype, truncated GGUF and torch files (``test_convert.py``); schedule version, reuse before an
anchor, head map out of range, layer count (``test_schedule.py``); budget of `kascade.keys_kept`
(``test_kascade.py``); hostile headers (``test_security.py``).
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from tiny_checkpoints import TINY, write_gguf, write_hf

from kascade_lite.calibrate import calibrate, topk_keys
from kascade_lite.cli import main as cli_main
from kascade_lite.convert import MANIFEST, convert_checkpoint, load_converted, verify_converted
from kascade_lite.model import Llama, forward
from kascade_lite.schedule import Schedule
from kascade_lite.kascade import KascadeAttention


def raises(match: str, *names: Path | str):
    """``pytest.raises(ValueError)`` whose message contains every one of ``names`` and matches ``match``."""
    return pytest.raises(ValueError, match="".join(f"(?=.*{re.escape(str(n))})" for n in names) + f".*{match}")


# ------------------------------------------------------------------------------------------------ checkpoints
def test_wrong_magic(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGML" + bytes(60))
    with raises("cannot read GGUF file", bad):
        convert_checkpoint(bad, tmp_path / "out", progress=False)
    with raises("unsupported checkpoint file", tmp_path / "model.bin"):
        (tmp_path / "model.bin").write_bytes(b"x")
        convert_checkpoint(tmp_path / "model.bin", tmp_path / "out", progress=False)


def test_truncated_tiny_gguf_names_the_tensor(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf")
    path.write_bytes(path.read_bytes()[:-1000])
    with raises(r"tensor \S+: data ends at byte \d+, the file has \d+", path):
        convert_checkpoint(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_extra_tensors_are_an_error(tmp_path: Path) -> None:
    extra = {"model.layers.3.mlp.up_proj.weight": np.zeros((64, 32), np.float32)}  # a 4th layer, config says 3
    src = write_hf(tmp_path / "src", add=extra)
    with raises(r"unexpected tensor\(s\) \['model\.layers\.3\.mlp\.up_proj\.weight'\]: not part of the 3-layer",
                src / "model.safetensors"):
        convert_checkpoint(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_rope_tables_are_not_extra(tmp_path: Path) -> None:
    src = write_hf(tmp_path / "src", add={"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)})
    assert verify_converted(convert_checkpoint(src, tmp_path / "out", progress=False))


def test_gguf_metadata_disagrees_with_tensors(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", num_kv_heads=4)  # metadata: 4 KV heads; tensors: 2
    with raises(r"tensor blk\.0\.attn_k\.weight has shape \(16, 32\), the config implies \(32, 32\)", path):
        convert_checkpoint(path, tmp_path / "out", progress=False)


@pytest.mark.parametrize("change, message", [
    (dict(num_key_value_heads=3), "num_heads=4 is not divisible by num_kv_heads=3"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "unsupported rope_type='yarn'"),
    (dict(hidden_size=0), "hidden_size must be a positive integer, got 0"),
    (dict(head_dim=7), "head_dim=7 must be even"),
])
def test_bad_hf_config(tmp_path: Path, change: dict, message: str) -> None:
    src = write_hf(tmp_path / "src", hf_config=TINY.to_hf_dict() | change)
    with raises(re.escape(message), src / "config.json"):
        convert_checkpoint(src, tmp_path / "out", progress=False)


def test_gguf_heads_not_dividing(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", num_kv_heads=3)
    with raises("invalid or incomplete llama metadata .*num_heads=4 is not divisible by num_kv_heads=3", path):
        convert_checkpoint(path, tmp_path / "out", progress=False)


def test_gguf_other_architecture(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", arch="mistral")
    with raises(r"unsupported architecture general\.architecture='mistral'", path):
        convert_checkpoint(path, tmp_path / "out", progress=False)


def test_tampered_converted_file_is_detected(tmp_path: Path) -> None:
    out = convert_checkpoint(write_hf(tmp_path / "src"), tmp_path / "out", progress=False)
    data = bytearray((out / "layer_01.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (out / "layer_01.safetensors").write_bytes(bytes(data))
    with raises(f"a file does not match its checksum in {MANIFEST}", out):
        load_converted(out, verify=True)
    with raises(f"no {MANIFEST}", tmp_path):
        load_converted(tmp_path)


# ------------------------------------------------------------------------------------------------ calibration
@pytest.fixture(scope="module")
def model() -> Llama:
    return Llama(replace(TINY, num_layers=2, max_position_embeddings=64))


@pytest.mark.parametrize("seqs, kw, message", [
    (np.zeros((0, 32), np.int32), {}, r"sequences must be \[num, seq_len\] token ids .* got shape \(0, 32\)"),
    (np.zeros((2, 0), np.int32), {}, r"got shape \(2, 0\)"),
    (np.zeros(32, np.int32), {}, r"got shape \(32,\)"),
    (np.zeros((2, 8), np.int32), {}, r"seq_len=8 must be a positive multiple of tile_size=16"),
    (np.zeros((2, 40), np.int32), {}, r"seq_len=40 must be a positive multiple of tile_size=16"),
    (np.full((2, 32), 64), {}, r"token ids in \[64, 64\], outside the model's vocabulary \[0, 64\)"),
    (np.full((2, 32), -1), {}, r"token ids in \[-1, -1\]"),
    (np.zeros((2, 32), np.float32), {}, "must be integer token ids, got dtype float32"),
    (np.zeros((1, 128), np.int32), {}, "seq_len=128 exceeds the model's max_position_embeddings=64"),
    (np.zeros((2, 32), np.int32), dict(budget=0.0), r"budget=0\.0 must be a fraction in \(0, 1\]"),
    (np.zeros((2, 32), np.int32), dict(budget=1.5), r"budget=1\.5 must be a fraction in \(0, 1\]"),
    (np.zeros((2, 32), np.int32), dict(save_every=0), "save_every=0 must be >= 1"),
])
def test_bad_calibration_input(model: Llama, seqs: np.ndarray, kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        calibrate(model, seqs, **(dict(tile_size=16, progress=False) | kw))


def test_too_short_token_stream() -> None:
    from kascade_lite.data import token_windows

    with pytest.raises(ValueError, match="need at least one window of 512 tokens; the stream has 100 tokens"):
        token_windows(np.zeros(100, np.int32), 512)


def test_topk_keys_tile_must_divide() -> None:
    with pytest.raises(ValueError, match="seq_len=100 must be a positive multiple of tile_size=32"):
        topk_keys(100, 32, 0.1)


# ------------------------------------------------------------------------------------------------ schedules
def schedule_dict(**change) -> dict:
    return Schedule.from_anchors("tiny", 2, 2, [1]).to_dict() | change


@pytest.mark.parametrize("change, message", [
    (dict(budget=0), r"budget=0 must be a fraction in \(0, 1\]"),
    (dict(budget=1.5), r"budget=1\.5 must be a fraction in \(0, 1\]"),
    (dict(tile_size=0), "tile_size=0 must be positive"),
    (dict(min_keys=-1), "min_keys=-1 must be >= 0"),
    (dict(layer_types=["dense", "sparse"]), r"unknown layer types \['sparse'\]"),
    (dict(colour="red"), r"unknown keys \['colour'\]"),
])
def test_bad_schedule_json(tmp_path: Path, change: dict, message: str) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps(schedule_dict(**change)))
    with raises(message, path):
        Schedule.load(path)


def test_schedule_for_another_model(model: Llama) -> None:
    tokens = jnp.zeros((1, 16), jnp.int32)
    short = KascadeAttention(Schedule.from_anchors("other", 1, 2, []))
    with pytest.raises(ValueError, match=r"schedule for 1 layers x 2 KV heads cannot run layer 1"):
        forward(model, tokens, None, short)
    heads = KascadeAttention(Schedule.from_anchors("other", 2, 1, [1]))
    with pytest.raises(ValueError, match=r"schedule for 2 layers x 1 KV heads cannot run layer 0"):
        forward(model, tokens, None, heads)


def test_sequence_longer_than_max_position(model: Llama) -> None:
    with pytest.raises(ValueError, match="sequence of 65 tokens exceeds max_position_embeddings=64"):
        forward(model, jnp.zeros((1, 65), jnp.int32))


# ------------------------------------------------------------------------------------------------ command line
def cli_error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run the CLI, expect exit status 2 and one error line without a traceback; return that line."""
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"kascade-lite {argv[0]}: error: "), err
    return err


def test_cli_convert_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGML" + bytes(60))
    assert str(bad) in cli_error(["convert", str(bad), str(tmp_path / "out"), "--quiet"], capsys)
    src = write_hf(tmp_path / "src", hf_config=TINY.to_hf_dict() | dict(num_key_value_heads=3))
    assert "not divisible" in cli_error(["convert", str(src), str(tmp_path / "out"), "--quiet"], capsys)
    assert "no such checkpoint" in cli_error(["convert", str(tmp_path / "nowhere"), str(tmp_path / "o")], capsys)
    with pytest.raises(ValueError, match="not divisible"):  # --debug shows the real exception
        cli_main(["--debug", "convert", str(src), str(tmp_path / "out"), "--quiet"])


def test_cli_other_commands_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from kascade_lite.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)
    if "calibrate" in commands:
        assert "does not exist" in cli_error(["calibrate", "--model", str(tmp_path / "nowhere.gguf"),
                                              "--out", str(tmp_path)], capsys)
    if "schedule" in commands:
        assert "not found" in cli_error(["schedule", "--calibration", str(tmp_path / "none"),
                                         "--out", str(tmp_path)], capsys)
