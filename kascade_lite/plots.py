"""Shared plotting helpers: one visual style for every chapter, and atomic figure files for the book.

Notebooks call `set_style()` once, draw with matplotlib/seaborn, then `save_figure(fig, "NN_name")`: the figure is
still shown inline by the notebook, and written (atomically) to the book's figure folder when there is one (see
`figures_dir`); elsewhere, on Colab say, nothing is written.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import seaborn as sns

from .files import atomic_path

FIGURES_ENV = "KASCADE_FIGURES_DIR"
"""Environment variable naming the folder chapter figures go to (``kascade-lite figures --out ROOT`` sets it)."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def set_style() -> None:
    """Seaborn ``whitegrid`` with sizes readable in the book (and in a Colab cell)."""
    sns.set_theme(style="whitegrid", context="notebook", palette="colorblind")
    matplotlib.rcParams.update({
        "figure.figsize": (7.0, 4.0),
        "figure.dpi": 100,
        "savefig.dpi": 150,
        "savefig.bbox": "tight",
        "axes.titlesize": 13,
        "axes.labelsize": 12,
        "legend.fontsize": 10,
        "xtick.labelsize": 10,
        "ytick.labelsize": 10,
    })


def figures_dir(cwd: str | Path | None = None) -> Path | None:
    """Where chapter figures go: ``$KASCADE_FIGURES_DIR`` if set, else ``book/figures`` of the book checkout that
    ``cwd`` (default: the current folder, which is ``notebooks/`` when the book build runs a chapter) lies in,
    else None. At smoke size (``KASCADE_SMOKE=1``) only ``$KASCADE_FIGURES_DIR``: the committed figures are
    full-size ones and a smoke build must not replace them.

    Never the package's own location: on a non-editable install that is site-packages, which is not ours to write
    into, and a chapter run outside a checkout (Colab) has no book to put figures in: they are only shown."""
    from .data import smoke

    if os.environ.get(FIGURES_ENV):
        return Path(os.environ[FIGURES_ENV])
    if smoke():
        return None
    here = Path(cwd or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "book" / "_config.yml").is_file() and (folder / "notebooks").is_dir():
            return folder / "book" / "figures"
    return None


def save_figure(fig: plt.Figure, name: str, directory: str | Path | None = None) -> Path | None:
    """Write ``fig`` to ``<directory or figures_dir()>/<name>.png`` atomically and return the path; return None
    (writing nothing) when there is no figure folder (see `figures_dir`).

    ``name`` is a bare file stem such as ``"01_rope_wavelengths"`` (letters, digits, ``_ . -``; no folders).
    """
    if not _NAME.match(name) or name.endswith(".png"):
        raise ValueError(f"save_figure: name must be a bare file stem like '01_rope_wavelengths', got {name!r}")
    folder = Path(directory) if directory is not None else figures_dir()
    if folder is None:
        return None
    path = folder / f"{name}.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
