"""Shared pytest setup: CPU JAX unless told otherwise, smoke sizes, a Hypothesis profile without deadlines (the
first call of a jitted function compiles, which would trip Hypothesis' default 200 ms deadline), tests marked
``slow`` left out unless asked for (``--slow`` or ``KASCADE_SLOW=1``, or any ``-m`` expression, which then decides
alone), and the chapters executed once per session as on Colab (`colab_runs`), shared by tests/test_notebooks.py and
tests/test_book.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("KASCADE_SMOKE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("kascade", deadline=None, max_examples=30, derandomize=True)
settings.load_profile("kascade")


SLOW_ENV = "KASCADE_SLOW"
"""``KASCADE_SLOW=1`` runs the tests marked slow too (as ``--slow`` does)."""


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", default=False,
                     help=f"also run the tests marked slow (as {SLOW_ENV}=1 does)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the tests marked slow unless ``--slow``, ``KASCADE_SLOW=1`` or a ``-m`` expression asks otherwise."""
    if config.getoption("--slow") or os.environ.get(SLOW_ENV) == "1" or config.getoption("markexpr"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


@pytest.fixture
def rng() -> np.random.Generator:
    """A fresh, seeded NumPy generator per test."""
    return np.random.default_rng(0)


# ------------------------------------------------------------------------------------------------------------------
# The chapters, executed once per session as a Colab user runs them. tests/test_notebooks.py checks each run,
# tests/test_book.py builds the book from the executed notebooks (``book/build.py --executed``, chapters not executed
# again).


@dataclass
class ColabRun:
    """One chapter executed as on Colab: the executed notebook (None if it failed), the error, and the files its
    folder held afterwards."""

    notebook: Path | None
    error: str
    files: list[str]


class ColabRuns:
    """Executes each chapter at most once, as on Colab: with `installed` (a non-editable install) ahead of the test
    environment on ``PYTHONPATH``, the chapter alone in an empty folder, smoke sizes, no results or figures folder
    and, when a local WikiText-2 copy stands in for it (``KASCADE_DATA_DIR``), the hub offline. A cell appended to
    the chapter checks that the kernel imported the installed copy; the executed notebook, without that cell, is
    saved as ``executed/NN_name.ipynb``. A chapter that read a path of the repository (``data/``, ``../shared``,
    ``book/``) fails there."""

    def __init__(self, installed: Path, folder: Path) -> None:
        from kascade_lite.data import local_data_dir

        self.installed, self.folder, self.wikitext = installed, folder, local_data_dir()
        self.executed = folder / "executed"
        self.executed.mkdir()
        self.runs: dict[str, ColabRun] = {}
        self.env = {"PYTHONPATH": str(installed), "KASCADE_SMOKE": "1", "KASCADE_RESULTS_DIR": "",
                    "KASCADE_FIGURES_DIR": "", "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
        if self.wikitext is not None:
            self.env |= {"KASCADE_DATA_DIR": str(self.wikitext.resolve()), "HF_HUB_OFFLINE": "1",
                         "HF_DATASETS_OFFLINE": "1"}

    def run(self, path: Path) -> ColabRun:
        if path.stem not in self.runs:
            self.runs[path.stem] = self._execute(path)
        return self.runs[path.stem]

    def _execute(self, path: Path) -> ColabRun:
        import nbformat

        from kascade_lite.notebooks import execute_notebook

        nb = nbformat.read(path, as_version=4)
        nb.cells.append(nbformat.v4.new_code_cell(
            "import kascade_lite\n"
            f"assert kascade_lite.__file__.startswith({str(self.installed)!r}), kascade_lite.__file__"))
        alone = self.folder / path.stem
        alone.mkdir()
        nbformat.write(nb, alone / path.name)
        try:
            executed = execute_notebook(alone / path.name, env=self.env, timeout=900)
        except Exception as e:  # a failing cell (RuntimeError), a timeout, a dead kernel: that chapter's failure
            return ColabRun(None, f"{type(e).__name__}: {e}", sorted(p.name for p in alone.iterdir()))
        executed.cells.pop()
        nbformat.write(executed, self.executed / path.name)
        return ColabRun(self.executed / path.name, "", sorted(p.name for p in alone.iterdir()))


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A non-editable install of the package (no dependencies: those come from the test environment), made from a
    copy of the sources so that the checkout gets no build folders."""
    from kascade_lite.data import checkout_root

    repo = checkout_root()
    src, target = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("site")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, src / name)
    for folder in ("kascade_lite", "data"):
        shutil.copytree(repo / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", ".stamps"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(src)], check=True, cwd=src)
    assert (target / "kascade_lite" / "shipped" / "coverage.json").is_file()
    return target


@pytest.fixture(scope="session")
def colab_runs(installed: Path, tmp_path_factory: pytest.TempPathFactory) -> ColabRuns:
    return ColabRuns(installed, tmp_path_factory.mktemp("colab"))
