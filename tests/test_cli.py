"""The ``kascade-lite`` command line: every ``--help``, errors, the whole ``reproduce --smoke`` pipeline, and that
no command writes into the repository unless ``--out`` names it.

The pipeline test runs in a temporary results root. To stay within a few minutes on 2 busy cores it leaves out
the twelve slowest benchmark steps (`SLOW_BENCH`: minutes each even at smoke size; `test_benchmark_flags_exist`
checks statically that their scripts accept the flags the CLI passes) and executes only the 01_rope notebook for
figures (the book test executes every notebook).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from kascade_lite import cli
from kascade_lite.data import checkout_root, smollm2_gguf_path

REPO = checkout_root()

SUBCOMMANDS = ("convert", "calibrate", "schedule", "eval", "bench", "figures", "reproduce")
SLOW_BENCH = ("bench-attention", "bench-e2e", "bench-perplexity", "bench-convert", "bench-accuracy-retrieval",
              "bench-accuracy-retrieval-ablation", "bench-accuracy-retrieval-frontier",
              "bench-accuracy-retrieval-natural", "bench-schedule-selection",
              "bench-variant-selection", "bench-variant-selection-natural", "bench-tidal-selection")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    assert f"kascade-lite {command}" in capsys.readouterr().out


def test_help_script_is_fast_and_lists_commands() -> None:
    res = subprocess.run([sys.executable, "-m", "kascade_lite.cli", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0
    for command in SUBCOMMANDS:
        assert command in res.stdout


def test_bad_input_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["schedule", "--model", str(tmp_path), "--out", str(tmp_path)]) == 2  # no calibration there
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kascade-lite schedule: error:") and "calibrate" in err[0]
    assert cli.main(["reproduce", "--model", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert cli.main(["figures", "--only", "99_nothing", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 2


def test_debug_shows_traceback(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        cli.main(["--debug", "schedule", "--model", str(tmp_path), "--out", str(tmp_path)])


def test_model_spec() -> None:
    from kascade_lite.models import SMOLLM2, model_spec

    assert model_spec(None).name == SMOLLM2 and model_spec(None).dtype == "float32"
    spec = model_spec(str(REPO / "notebooks"))  # any existing folder: name and dtype only
    assert spec.name == "notebooks" and spec.dtype == "bfloat16" and spec.tokenizer == str(REPO / "notebooks")


def test_benchmark_flags_exist() -> None:
    """Every flag the CLI passes to a benchmark script is defined by that script (read, not run)."""
    for name, bench in cli.BENCHMARKS.items():
        source = (REPO / "benchmarks" / bench.script).read_text()
        flags = {a for a in bench.args + bench.smoke_args if a.startswith("--")}
        for flag in flags | ({"--schedule-dir"} if bench.reads_schedules else set()):
            assert f'"{flag}"' in source, f"{bench.script} has no {flag} (benchmark {name})"
        assert "--smoke" not in bench.smoke_args or '"--smoke"' in source


def _strip_volatile(obj):
    """Drop provenance (date, machine) and timings so two runs can be compared."""
    if isinstance(obj, dict):
        return {k: _strip_volatile(v) for k, v in obj.items() if k not in ("provenance", "seconds")}
    if isinstance(obj, list):
        return [_strip_volatile(v) for v in obj]
    return obj


def _run(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    assert cli.main(argv) == 0
    return capsys.readouterr().out


@pytest.mark.slow
def test_reproduce_smoke(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.numpy import load_file

    from kascade_lite.files import is_smoke
    from kascade_lite.schedule import Schedule

    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    base = ["reproduce", "--smoke", "--out", str(tmp_path), "--skip", ",".join(SLOW_BENCH)]
    out = _run(base, capsys)
    steps = ["convert", "calibrate", "schedules", "eval", "bench-accuracy-ppl", "bench-memory-plan", "figures"]
    for step in steps:
        assert re.search(rf"\] {step}: done", out), out
        assert (tmp_path / "data" / ".stamps" / f"{step}.json").is_file()

    data = tmp_path / "data"
    for path in (data / "calibration" / "smollm2-135m.json", data / "coverage.json", data / "eval_smollm2-135m.json",
                 data / "accuracy_ppl.json", data / "memory_plan.json"):
        assert "provenance" in json.loads(path.read_text()), path
    arrays = load_file(str(data / "calibration" / "smollm2-135m.safetensors"))
    assert arrays["similarity"].shape == (30, 30, 3, 3)
    schedules = sorted((data / "schedules").glob("smollm2-135m_*.json"))
    assert len(schedules) == 15 and all(Schedule.load(p).num_layers == 30 for p in schedules)  # dp, dpimp K=2..8, greedy
    results = json.loads((data / "eval_smollm2-135m.json").read_text())["results"]
    assert [r["policy"] for r in results] == ["dense", "kascade_dp_k4"] and all(r["ppl"] > 1 for r in results)
    # the smoke sizes exercise the method: Top-k drops keys, so Kascade's perplexity is not dense's
    assert json.loads((data / "calibration" / "smollm2-135m.json").read_text())["settings"]["k_prev"] > 0
    assert abs(results[1]["delta_vs_dense_pct"]) > 1e-3, results
    assert Schedule.load(schedules[0]).min_keys == cli.SMOKE_MIN_KEYS
    for path in [*schedules, *(data / n for n in ("coverage.json", "eval_smollm2-135m.json", "accuracy_ppl.json",
                                                  "memory_plan.json"))]:
        assert is_smoke(json.loads(path.read_text())), path
    pngs = sorted((tmp_path / "book" / "figures").glob("*.png"))
    assert {p.stem for p in pngs} >= {"01_rope_toeplitz", "01_rope_wavelengths", "01_rope_llama31_scaling"}
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in pngs)

    # a second run finds every step up to date
    out = _run(base, capsys)
    assert all(re.search(rf"\] {step}: up to date, skipped", out) for step in steps), out
    assert "0 steps ran" in out

    # determinism: forcing the model steps again gives the same JSON, provenance and timings aside
    before = {p: _strip_volatile(json.loads(p.read_text())) for p in [*schedules, data / "eval_smollm2-135m.json",
                                                                        data / "calibration" / "smollm2-135m.json"]}
    out = _run([*base, "--force", "--steps", "calibrate,schedules,eval"], capsys)
    assert "3 steps ran" in out
    for path, old in before.items():
        assert _strip_volatile(json.loads(path.read_text())) == old, path


def _tiny_hf_checkpoint(path: Path) -> Path:
    """A random 4-layer Llama in Hugging Face layout with the SmolLM2 tokenizer saved beside it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kascade_lite.data import load_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path)
    load_tokenizer().save_pretrained(path)
    return path


@pytest.mark.slow
def test_reproduce_model_path(tmp_path: Path, capsys: pytest.CaptureFixture,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """`reproduce --model DIR` converts a checkpoint folder, uses its tokenizer and runs the model steps only."""
    ckpt = _tiny_hf_checkpoint(tmp_path / "Tiny-Llama")
    out = _run(["reproduce", "--model", str(ckpt), "--smoke", "--out", str(tmp_path / "root"),
                "--cache", str(tmp_path / "cache")], capsys)
    assert "4 steps ran" in out and "bench-" not in out and "figures:" not in out
    data = tmp_path / "root" / "data"
    assert (tmp_path / "cache" / "tiny-llama" / "manifest.json").is_file()
    assert json.loads((data / "calibration" / "tiny-llama.json").read_text())["settings"]["model"] == "tiny-llama"
    assert sorted(p.stem for p in (data / "schedules").glob("*.json")) == [
        "tiny-llama_dp_k2", "tiny-llama_dp_k3", "tiny-llama_dp_k4", "tiny-llama_dpimp_k2", "tiny-llama_dpimp_k3",
        "tiny-llama_dpimp_k4", "tiny-llama_greedy"]
    assert json.loads((data / "eval_tiny-llama.json").read_text())["results"][1]["policy"] == "kascade_dp_k4"


def _git_status(*paths: str) -> str:
    return subprocess.run(["git", "status", "--porcelain", "--", *paths], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout


def test_full_size_without_out_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for argv in (["calibrate"], ["schedule"], ["eval"], ["bench", "memory-plan"], ["figures"], ["reproduce"]):
        assert cli.main(argv) == 2, argv
        assert "--out" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_smoke_without_out_writes_only_to_a_temporary_folder(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Every command at smoke size with no --out, from a folder outside the checkout: nothing in the repository's
    data/ or book/figures changes, and each run says which new temporary folder it wrote."""
    assert _git_status("data", "book/figures") == "", "data/ or book/figures is modified before the test"
    work, temp = tmp_path / "cwd", tmp_path / "tmp"
    work.mkdir(), temp.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    runs = [["calibrate", "--smoke", "--num-sequences", "1"], ["schedule", "--smoke"],
            ["eval", "--smoke", "--windows", "1", "--batch-size", "1"],
            ["bench", "memory-plan", "--smoke"], ["figures", "--smoke", "--only", "02"],
            ["reproduce", "--smoke", "--steps", "convert,bench-memory-plan", "--figures", "none"]]
    roots = []
    for argv in runs:
        out = _run(argv, capsys)
        found = re.search(r"smoke run: writing under (\S+)", out)
        assert found, (argv, out)
        roots.append(Path(found.group(1)))
        assert roots[-1].parent == temp and any(roots[-1].rglob("*.*")), argv
    assert _run(["convert", str(smollm2_gguf_path()), str(work / "converted"), "--quiet"], capsys)
    assert _git_status("data", "book/figures") == ""
    evaluated = json.loads((roots[2] / "data" / "eval_smollm2-135m.json").read_text())
    assert abs(evaluated["results"][1]["delta_vs_dense_pct"]) > 1e-3  # the shipped schedules drop keys too
