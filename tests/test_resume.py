"""Nothing lost or half-written: a conversion killed with SIGKILL mid-file resumes to byte-identical output with no
temp files left, and an interrupted calibration resumes from its partial sums to bit-identical statistics.

The kill test converts in a child process whose checkpoint reader sleeps before each tensor (`SLOW_CONVERT`: it
wraps `convert.open_checkpoint`), so that the kill lands while a layer file is being written.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from tiny_checkpoints import TINY, write_hf

import kascade_lite.calibrate as calibrate_module
from kascade_lite.calibrate import calibrate, partial_path
from kascade_lite.convert import MANIFEST, convert_checkpoint, load_converted, verify_converted
from kascade_lite.model import Llama

REPO = Path(__file__).resolve().parents[1]

SLOW_CONVERT = """
import sys, time
import kascade_lite.convert as convert

real_open = convert.open_checkpoint

def slow_open(src):
    ckpt = real_open(src)
    read = ckpt.tensor
    def tensor(*args, **kwargs):
        time.sleep(0.3)  # before each output tensor, so the kill lands mid-file
        return read(*args, **kwargs)
    ckpt.tensor = tensor
    return ckpt

convert.open_checkpoint = slow_open
convert.convert_checkpoint(sys.argv[1], sys.argv[2], progress=False)
"""


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"conversion exited early ({proc.returncode}): {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("conversion made no progress")
        time.sleep(0.02)


def test_sigkill_mid_conversion_then_resume_is_byte_identical(tmp_path: Path) -> None:
    src = write_hf(tmp_path / "src", replace(TINY, num_layers=4))
    clean = convert_checkpoint(src, tmp_path / "clean", progress=False)
    out = tmp_path / "out"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, str(src), str(out)],
                            env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:  # kill while layer_01 is half-written: layer_00 done, layer_01's temp file open
        wait_for(lambda: (out / "layer_00.safetensors").is_file() and any(out.glob(".layer_01.*.tmp")), proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert any(out.glob(".layer_01.*.tmp")) and not (out / "layer_01.safetensors").exists()
    assert not verify_converted(out)
    with pytest.raises(ValueError, match="conversion incomplete"):
        load_converted(out)
    kept = (out / "layer_00.safetensors").stat().st_mtime_ns

    convert_checkpoint(src, out, progress=False)  # resume

    assert (out / "layer_00.safetensors").stat().st_mtime_ns == kept  # verified and skipped, not rewritten
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in clean.iterdir())  # no temp files
    for f in clean.iterdir():
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name  # manifest included
    assert verify_converted(out)
    assert (out / MANIFEST).is_file()


# ------------------------------------------------------------------------------------------------ calibration
CFG = replace(TINY, num_layers=2)
SEQS = np.random.default_rng(3).integers(0, CFG.vocab_size, (5, 32))
KW = dict(tile_size=8, budget=0.5, model_name="tiny", progress=False)


class Interrupt(Exception):
    pass


def test_interrupted_calibration_resumes_bit_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = Llama(CFG)
    expected = calibrate(model, SEQS, **KW)
    partial = partial_path(tmp_path, "tiny")

    real, calls = calibrate_module.sequence_stats, []

    def dies_on_fourth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise Interrupt  # like a kill after three sequences
        return real(*args, **kwargs)

    monkeypatch.setattr(calibrate_module, "sequence_stats", dies_on_fourth)
    with pytest.raises(Interrupt):
        calibrate(model, SEQS, partial=partial, save_every=2, **KW)
    assert partial.is_file() and not list(tmp_path.glob(".*.tmp"))  # saved after 2 sequences, atomically

    calls.clear()
    resumed = calibrate(model, SEQS, partial=partial, save_every=2, **KW)
    assert len(calls) == 3  # sequences 3..5 only
    assert not partial.exists()  # removed once finished
    for name in ("similarity", "importance", "coverage", "tile_coverage"):
        np.testing.assert_array_equal(getattr(resumed, name), getattr(expected, name))
    assert resumed.settings == expected.settings


def test_partial_of_another_run_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = Llama(CFG)
    partial = partial_path(tmp_path, "tiny")
    real = calibrate_module.sequence_stats
    calls: list[int] = []

    def dies_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise Interrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(calibrate_module, "sequence_stats", dies_on_third)
    with pytest.raises(Interrupt):
        calibrate(model, SEQS, partial=partial, save_every=1, **KW)
    monkeypatch.setattr(calibrate_module, "sequence_stats", real)
    other = SEQS[:, ::-1].copy()  # other sequences: the partial sums must not be used
    np.testing.assert_array_equal(calibrate(model, other, partial=partial, **KW).similarity,
                                  calibrate(model, other, **KW).similarity)
