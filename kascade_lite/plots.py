"""Shared plotting helpers: one visual style for every chapter, and atomic figure files under ``book/figures``.

Notebooks call `set_style()` once, draw with matplotlib/seaborn, then `save_figure(fig, "NN_name")`: the figure is
written to ``book/figures/NN_name.png`` (atomically) and still shown inline by the notebook.
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import seaborn as sns

from .data import REPO_ROOT
from .files import atomic_path

FIGURES_DIR = REPO_ROOT / "book" / "figures"
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


def save_figure(fig: plt.Figure, name: str, directory: str | Path | None = None) -> Path:
    """Write ``fig`` to ``<directory or book/figures>/<name>.png`` atomically and return the path.

    ``name`` is a bare file stem such as ``"01_rope_wavelengths"`` (letters, digits, ``_ . -``; no folders).
    """
    if not _NAME.match(name) or name.endswith(".png"):
        raise ValueError(f"save_figure: name must be a bare file stem like '01_rope_wavelengths', got {name!r}")
    path = Path(directory or FIGURES_DIR) / f"{name}.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
