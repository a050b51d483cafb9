"""`kascade_lite.files` and `plots.save_figure`: shipped results are found without a checkout path, smoke results
are refused as measurements, every shipped file says it is a full-size run, and nothing is written into the
package's install location."""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from kascade_lite import files, plots  # noqa: E402
from kascade_lite.data import checkout_root  # noqa: E402

PACKAGE = Path(files.__file__).resolve().parent


def test_shipped_results_are_full_size_runs() -> None:
    shipped = files.shipped_dir()
    docs = sorted(shipped.rglob("*.json"))
    assert len(docs) >= 19 and (shipped / "calibration" / "smollm2-135m.safetensors").is_file()
    for path in docs:
        prov = files.record_provenance(json.loads(path.read_text()))
        assert prov is not None and prov["smoke"] is False, path


def test_results_file_prefers_results_dir_and_refuses_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KASCADE_SMOKE", raising=False)
    monkeypatch.delenv(files.RESULTS_ENV, raising=False)
    assert files.results_file("coverage.json") == files.shipped_dir() / "coverage.json"
    assert files.load_results("memory_plan.json")["provenance"]["smoke"] is False
    doc = {"x": 1, "provenance": files.provenance("pytest", smoke=True)}
    (tmp_path / "coverage.json").write_text(json.dumps(doc))
    (tmp_path / "calibration").mkdir()
    (tmp_path / "calibration" / "m.safetensors").write_bytes(b"")
    (tmp_path / "calibration" / "m.json").write_text(json.dumps(doc))
    monkeypatch.setenv(files.RESULTS_ENV, str(tmp_path))
    assert files.results_file("perplexity.json") == files.shipped_dir() / "perplexity.json"  # not there: shipped
    for name in ("coverage.json", "calibration/m.safetensors"):
        with pytest.raises(files.SmokeResultsError, match="smoke-size run"):
            files.results_file(name)
    monkeypatch.setenv("KASCADE_SMOKE", "1")  # a smoke run of a chapter may read smoke results
    assert files.load_results("coverage.json") == doc
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        files.results_file("nothing.json")


def test_save_figure_writes_only_where_figures_dir_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ``$KASCADE_FIGURES_DIR`` nothing is written, even at full size inside the checkout (the committed
    book/figures change only through ``kascade-lite figures --out .``)."""
    monkeypatch.delenv(plots.FIGURES_ENV, raising=False)
    monkeypatch.setenv("KASCADE_SMOKE", "0")
    fig, repo = plt.figure(), checkout_root()
    for cwd in [tmp_path] + ([repo / "notebooks"] if repo is not None else []):
        monkeypatch.chdir(cwd)
        assert plots.figures_dir() is None and plots.save_figure(fig, "00_test") is None
    assert not any(tmp_path.iterdir()) and not (PACKAGE.parent / "book" / "figures" / "00_test.png").exists()
    monkeypatch.setenv(plots.FIGURES_ENV, str(tmp_path / "figs"))
    assert plots.save_figure(fig, "00_test") == tmp_path / "figs" / "00_test.png"
    assert (tmp_path / "figs" / "00_test.png").read_bytes()[:4] == b"\x89PNG"
    plt.close(fig)


def test_package_has_one_entry_point_and_no_repository_paths() -> None:
    """The CLI is the only entry point (no module-level mains) and no module locates data by a checkout path."""
    for module in sorted(PACKAGE.glob("*.py")):
        text = module.read_text()
        assert "REPO_ROOT" not in text, module
        if module.name != "cli.py":
            assert not re.search(r"^if __name__ == .__main__.:|^def main\(", text, re.M), module


def test_provenance_records_list_every_shipped_result_with_its_continuations(tmp_path: Path) -> None:
    rows = files.provenance_records()
    shipped = sorted(p.relative_to(files.shipped_dir()).as_posix() for p in files.shipped_dir().rglob("*.json")
                     if not any(part.startswith(".") for part in p.relative_to(files.shipped_dir()).parts))
    assert [r["file"] for r in rows] == shipped
    assert all(r["command"] and r["machine"] and r["date"] and r["smoke"] is False for r in rows), rows
    ppl = next(r for r in rows if r["file"] == "accuracy_ppl.json")
    assert [c["date"] for c in ppl["continued"]] == [c["date"] for c in files.load_results("accuracy_ppl.json")
                                                     ["resumed_by"]]

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "s.json").write_text(json.dumps({"meta": {"provenance": {"command": "c", "machine": "m",
                                                                                  "date": "d", "smoke": True}}}))
    (tmp_path / "plain.json").write_text("{}")
    (tmp_path / ".stamps").mkdir()
    (tmp_path / ".stamps" / "x.json").write_text("{}")
    assert files.provenance_records(tmp_path) == [
        {"file": "plain.json", "command": None, "machine": None, "date": None, "smoke": None, "continued": []},
        {"file": "sub/s.json", "command": "c", "machine": "m", "date": "d", "smoke": True, "continued": []}]
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json"):
        files.provenance_records(tmp_path)


def test_resume_accepts_new_schedules_but_not_changed_ones(tmp_path: Path) -> None:
    """A schedule written since the run (e.g. one with head budgets) may join on resume (``grow``); a changed one
    may not, and the other settings must still match."""
    path = tmp_path / "x.json"
    old = {"a": {"budget": 0.1}, "b": {"budget": 0.1}}
    files.ResultsLog(path, "test", {"n": 1, "schedules": old}, smoke=True).save()

    def resume(schedules: dict, n: int = 1) -> files.ResultsLog:
        return files.ResultsLog(path, "test", {"n": n, "schedules": schedules}, smoke=True, resume=True,
                                grow=("schedules",))

    grown = {**old, "c_hb": {"budget": 0.1}}
    assert resume(grown).doc["settings"]["schedules"] == grown                          # no error
    with pytest.raises(ValueError, match=r"x.json: --resume found the schedules \['b'\] changed"):
        resume({**old, "b": {"budget": 0.2}})
    with pytest.raises(ValueError, match="same settings"):
        resume(old, n=2)

