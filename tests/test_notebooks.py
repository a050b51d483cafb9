"""The chapters as a Colab user runs them, and their Colab cells.

`test_chapter_runs_like_on_colab` installs the package *non-editable* into a temporary folder (``pip install
--no-deps --target``, from a copy of the sources, so the checkout gets no build folders), copies each chapter
alone into an empty folder and executes it at smoke size with only that copy of the package importable ahead of the
test environment (``PYTHONPATH``), the hub offline and WikiText-2 provided through ``KASCADE_DATA_DIR``. A chapter
that read a path of the repository (``data/``, ``../shared``, ``book/``) fails there; an appended cell checks that
the kernel imported the installed copy. The nine chapters take a few minutes at smoke size.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from kascade_lite import REPOSITORY_URL
from kascade_lite.data import checkout_root, local_data_dir
from kascade_lite.notebooks import chapter_notebooks, colab_badge, colab_install_lines, execute_notebook

REPO = checkout_root()
CHAPTERS = chapter_notebooks(REPO / "notebooks")


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_colab_cells_come_from_the_one_repository_url(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    setup = next(c for c in nb.cells if c.cell_type == "code")
    assert setup.source.split("\n")[:3] == colab_install_lines(), path.name
    assert colab_badge(path.stem) in nb.cells[0].source, path.name
    for url in re.findall(r"github\.com/[\w.-]+/[\w.-]+", path.read_text()):
        assert REPOSITORY_URL.endswith(url.removeprefix("github.com")), (path.name, url)


def test_book_config_names_the_same_repository() -> None:
    config = (REPO / "book" / "_config.yml").read_text()
    assert re.search(rf"^\s*url:\s*{re.escape(REPOSITORY_URL)}\s*$", config, re.M)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A non-editable install of the package (no dependencies: those come from the test environment)."""
    src, target = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("site")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for folder in ("kascade_lite", "data"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", ".stamps"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(src)], check=True, cwd=src)
    assert (target / "kascade_lite" / "shipped" / "coverage.json").is_file()
    return target


@pytest.mark.slow
@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_runs_like_on_colab(path: Path, installed: Path, tmp_path: Path) -> None:
    wikitext = local_data_dir()
    if wikitext is None:
        pytest.skip("no local WikiText-2 copy (KASCADE_DATA_DIR or ../shared/data) to stand in for the hub")
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(
        "import kascade_lite\n"
        f"assert kascade_lite.__file__.startswith({str(installed)!r}), kascade_lite.__file__"))
    alone = tmp_path / "colab"
    alone.mkdir()
    nbformat.write(nb, alone / path.name)
    env = {"PYTHONPATH": str(installed), "KASCADE_SMOKE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "KASCADE_DATA_DIR": str(wikitext.resolve()), "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
           "KASCADE_RESULTS_DIR": "", "KASCADE_FIGURES_DIR": ""}
    execute_notebook(alone / path.name, env=env, timeout=900)
    assert sorted(p.name for p in alone.iterdir()) == [path.name], "the chapter wrote into its folder"
    assert not any((installed / "kascade_lite").rglob("*.png")), "a figure went into the installed package"
