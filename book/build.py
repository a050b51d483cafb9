"""Build the book, executing every chapter, and fail loudly if any chapter did not execute cleanly.

Usage (from anywhere): ``python book/build.py``. Output: ``book/_build/html``. Sizes follow ``KASCADE_SMOKE``
(``1``: tiny CI sizes). The previous HTML is removed first, so no stale page can pass for a built one. myst-nb
writes one ``reports/<docname>.err.log`` per notebook whose execution failed; this script lists them and exits
non-zero naming the failing notebooks.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from kascade_lite.notebooks import chapter_notebooks as find_chapters

REPO = Path(__file__).resolve().parents[1]
HTML = REPO / "book" / "_build" / "html"
REPORTS = HTML / "reports"
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colour codes in the execution logs


def chapter_notebooks() -> list[Path]:
    """The chapter notebooks the TOC glob picks up (``notebooks/NN_name.ipynb``; the one list, shared with
    ``kascade-lite figures``)."""
    return find_chapters(REPO / "notebooks")


def failed_notebooks() -> dict[str, str]:
    """``{docname: error log}`` for every notebook whose execution failed in the last build."""
    failed = {}
    for log in sorted(REPORTS.rglob("*.err.log")):
        docname = log.relative_to(REPORTS).as_posix().removesuffix(".err.log")
        failed[docname] = ANSI.sub("", log.read_text(errors="replace"))
    return failed


def missing_pages() -> list[str]:
    """Chapter notebooks that have no HTML page after the build."""
    return [nb.name for nb in chapter_notebooks() if not (HTML / "notebooks" / f"{nb.stem}.html").is_file()]


def build() -> int:
    """Build into ``book/_build/html``; return 0 only if every chapter executed and has a page."""
    shutil.rmtree(HTML, ignore_errors=True)
    jupyter_book = [sys.executable, "-c", "from jupyter_book.cli.main import main; main()"]
    cmd = [*jupyter_book, "build", str(REPO), "--config", "book/_config.yml", "--toc", "book/_toc.yml",
           "--path-output", "book", "--all"]
    code = subprocess.run(cmd, cwd=REPO).returncode
    if code:
        print(f"book/build.py: jupyter-book exited with {code}", file=sys.stderr)
        return code
    failures, missing = failed_notebooks(), missing_pages()
    for docname, log in failures.items():
        print(f"\n=== {docname}.ipynb failed to execute ===\n{log[-3000:]}", file=sys.stderr)
    if missing:
        print(f"book/build.py: no HTML page for {', '.join(missing)}", file=sys.stderr)
    if failures or missing:
        print(f"book/build.py: FAILED notebooks: {', '.join(failures) or '-'}", file=sys.stderr)
        return 1
    print(f"book/build.py: {len(chapter_notebooks())} chapters executed; open {HTML / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(build())
