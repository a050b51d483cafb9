"""The chapters as a Colab user runs them, and their Colab cells.

`test_chapter_runs_like_on_colab` checks each chapter's run by `conftest.ColabRuns`: the package installed
*non-editable* into a temporary folder (``pip install --no-deps --target``), the chapter alone in an empty folder at
smoke size with only that copy of the package importable ahead of the test environment (``PYTHONPATH``), the hub
offline and WikiText-2 provided through ``KASCADE_DATA_DIR``. A chapter that read a path of the repository
(``data/``, ``../shared``, ``book/``) fails there; an appended cell checks that the kernel imported the installed
copy. These are the only executions of the chapters in the test run: tests/test_book.py builds the book from the
executed notebooks. The ten chapters take a few minutes at smoke size.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

from kascade_lite import REPOSITORY_URL
from kascade_lite.data import checkout_root
from kascade_lite.notebooks import chapter_notebooks, colab_badge, colab_install_lines, show

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


def test_show_prints_the_source(capsys: pytest.CaptureFixture[str]) -> None:
    show(colab_badge)
    out = capsys.readouterr().out
    assert out.startswith("def colab_badge(stem: str) -> str:") and "colab-badge.svg" in out


def test_book_config_names_the_same_repository() -> None:
    config = (REPO / "book" / "_config.yml").read_text()
    assert re.search(rf"^\s*url:\s*{re.escape(REPOSITORY_URL)}\s*$", config, re.M)


@pytest.mark.book
@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_runs_like_on_colab(path: Path, colab_runs) -> None:
    if colab_runs.wikitext is None:
        pytest.skip("no local WikiText-2 copy (KASCADE_DATA_DIR or ../shared/data) to stand in for the hub")
    run = colab_runs.run(path)
    assert not run.error, run.error
    assert run.files == [path.name], "the chapter wrote into its folder"
    assert not any((colab_runs.installed / "kascade_lite").rglob("*.png")), "a figure went into the installed package"
