"""Progress bars for the package's long loops (calibration, conversion, perplexity, the CLI).

`tqdm` here is tqdm's plain text bar (``tqdm.std``), never the notebook widget of ``tqdm.auto``: that one needs
``ipywidgets`` (which the book does not install) and otherwise warns ``TqdmWarning: IProgress not found`` on import.
A bar shows only where someone watches it, a terminal: on a non-TTY stream (a notebook kernel, a book build, a CI
log, a pipe) it is disabled, so executed chapters hold no progress-bar lines. ``KASCADE_PROGRESS=1`` forces bars on,
``KASCADE_PROGRESS=0`` forces them off. ``disable=True`` (what ``progress=False`` arguments pass) always wins.

`transformers` and `huggingface_hub` import ``tqdm.auto`` themselves. Importing this module (the package does, in
``kascade_lite/__init__.py``) imports ``tqdm.auto`` once with exactly that ``IProgress not found`` warning filtered;
it then falls back to the plain bar, and later imports find it in ``sys.modules`` and stay quiet. No other warning
is touched.
"""

from __future__ import annotations

import os
import sys
import warnings

from tqdm import std
from tqdm import TqdmWarning

__all__ = ["progress_disabled", "tqdm"]


def _import_tqdm_auto_quietly() -> None:
    """Import ``tqdm.auto`` without its ``IProgress not found`` warning (a Jupyter kernel without ipywidgets)."""
    if "tqdm.auto" in sys.modules:
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="IProgress not found", category=TqdmWarning)
        import tqdm.auto  # noqa: F401


_import_tqdm_auto_quietly()


def progress_disabled(disable: bool = False) -> bool | None:
    """The ``disable`` value for a bar: True (off), False (forced on by ``KASCADE_PROGRESS=1``) or None (tqdm's own
    rule: off unless the output stream is a TTY)."""
    if disable:
        return True
    setting = os.environ.get("KASCADE_PROGRESS", "").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return True
    if setting in ("1", "true", "yes", "on"):
        return False
    return None


class tqdm(std.tqdm):  # noqa: N801 - a drop-in for tqdm.tqdm
    """``tqdm.std.tqdm`` whose bars are shown on a terminal only (see the module docstring)."""

    def __init__(self, *args, disable: bool = False, **kwargs):
        super().__init__(*args, disable=progress_disabled(disable), **kwargs)
