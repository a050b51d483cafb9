"""Build the book, executing every chapter, and fail loudly if any chapter did not execute cleanly.

Usage (from anywhere): ``python book/build.py [OUTPUT_DIR] [--executed DIR]``. The HTML lands in
``OUTPUT_DIR/_build/html``; ``OUTPUT_DIR`` defaults to ``book`` (so ``book/_build/html``, what ``make book`` builds);
the tests pass a temporary folder so that they never replace that book. Sizes follow ``KASCADE_SMOKE`` (``1``: tiny
CI sizes). The previous HTML is removed first, so no stale page can pass for a built one. The figures the chapters
save go to ``OUTPUT_DIR/_build/figures`` (``$KASCADE_FIGURES_DIR``), never to the committed ``book/figures``: building
the book modifies no tracked file (``kascade-lite figures --out .`` is what replaces the committed figures).

``--executed DIR``: build from chapter notebooks already executed into ``DIR/NN_name.ipynb`` (the tests execute each
chapter once, as on Colab, and build the book from those): the sources are copied to ``OUTPUT_DIR/_build/source``
with the chapters excluded from execution (`CHAPTER_PATTERN`), and a chapter with no executed notebook has no page,
which fails the build. The book's own pages that compute what they show from ``data/`` (``book/intro.md``,
``book/reproducing.md``, ``book/perplexity_table.md``: MyST Markdown notebooks, a few seconds) still execute, in both
modes.

The build fails when

- a notebook did not execute: myst-nb writes one ``reports/<docname>.err.log`` per failed notebook, listed here;
- a chapter has no HTML page;
- a cell wrote to stderr: ``book/_config.yml`` sets ``execute.stderr_output: remove-warn``, so stderr never shows up
  as a box on a page, and myst-nb logs ``stderr was found in the cell outputs ... [mystnb.stderr]`` instead; this
  script turns those log lines into a failure. Warnings and progress bars belong to the package to silence at
  their source; a cell whose stderr is expected can carry the ``remove-stderr`` tag. myst-nb checks the outputs
  when it renders a page, so this holds for ``--executed`` notebooks too.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from kascade_lite.notebooks import chapter_notebooks as find_chapters
from kascade_lite.plots import FIGURES_ENV

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "book"
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colour codes in the execution logs
STDERR_WARNING = re.compile(r"^(?P<file>\S+?\.(?:ipynb|md))(?::\d+)?: WARNING: (?P<msg>stderr was found in the cell "
                            r"outputs of cell \d+)", re.M)
CHAPTER_PATTERN = "notebooks/*.ipynb"
"""Excluded from execution when building from executed chapters (``--executed``): matched against the end of a path."""


def html_dir(output: Path = DEFAULT_OUTPUT) -> Path:
    """Where ``jupyter-book build --path-output output`` puts the HTML."""
    return Path(output) / "_build" / "html"


def figures_dir(output: Path = DEFAULT_OUTPUT) -> Path:
    """Where the chapters executed by a build into ``output`` save their figures."""
    return Path(output) / "_build" / "figures"


def source_tree(output: Path, executed: Path) -> Path:
    """``output/_build/source``: the book's sources with the executed chapters from ``executed``, which are excluded
    from execution."""
    source = Path(output) / "_build" / "source"
    shutil.rmtree(source, ignore_errors=True)
    shutil.copytree(REPO / "book", source / "book", ignore=shutil.ignore_patterns("_build", "figures", "*.py",
                                                                                  "__pycache__"))
    config = yaml.safe_load((REPO / "book" / "_config.yml").read_text())
    config["execute"]["exclude_patterns"] = [CHAPTER_PATTERN]  # executed already; the book's own pages still run
    (source / "book" / "_config.yml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    (source / "notebooks").mkdir()
    for nb in chapter_notebooks():
        if (Path(executed) / nb.name).is_file():
            shutil.copy(Path(executed) / nb.name, source / "notebooks" / nb.name)
    return source


def chapter_notebooks() -> list[Path]:
    """The chapter notebooks the TOC glob picks up (``notebooks/NN_name.ipynb``; the one list, shared with
    ``kascade-lite figures``)."""
    return find_chapters(REPO / "notebooks")


def failed_notebooks(html: Path) -> dict[str, str]:
    """``{docname: error log}`` for every notebook whose execution failed in the last build into ``html``."""
    failed = {}
    for log in sorted((html / "reports").rglob("*.err.log")):
        docname = log.relative_to(html / "reports").as_posix().removesuffix(".err.log")
        failed[docname] = ANSI.sub("", log.read_text(errors="replace"))
    return failed


def missing_pages(html: Path) -> list[str]:
    """Chapter notebooks that have no HTML page after the build."""
    return [nb.name for nb in chapter_notebooks() if not (html / "notebooks" / f"{nb.stem}.html").is_file()]


def stderr_cells(log: str) -> list[str]:
    """``"notebooks/NN.ipynb: stderr was found in the cell outputs of cell N"`` for each such myst-nb warning."""
    found = []
    for m in STDERR_WARNING.finditer(ANSI.sub("", log)):
        name = Path(m["file"]).as_posix()
        for folder in ("notebooks/", "book/"):
            if folder in name:
                name = name[name.rfind(folder):]
                break
        found.append(f"{name}: {m['msg']}")
    return found


def build(output: Path = DEFAULT_OUTPUT, executed: Path | None = None) -> int:
    """Build into ``output/_build/html``, executing the chapters (or, with ``executed``, from the notebooks already
    executed there); return 0 only if every chapter executed cleanly and has a page."""
    output = Path(output).resolve()
    html = html_dir(output)
    shutil.rmtree(html, ignore_errors=True)
    source = REPO if executed is None else source_tree(output, Path(executed).resolve())
    jupyter_book = [sys.executable, "-c", "from jupyter_book.cli.main import main; main()"]
    cmd = [*jupyter_book, "build", str(source), "--config", "book/_config.yml", "--toc", "book/_toc.yml",
           "--path-output", str(output), "--all"]
    env = {**os.environ, FIGURES_ENV: str(figures_dir(output))}
    # jupyter-book's output is echoed as it comes and kept, to find myst-nb's stderr warnings in it.
    proc = subprocess.Popen(cmd, cwd=source, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace")
    lines = []
    for line in proc.stdout:
        sys.stdout.write(line)
        lines.append(line)
    code = proc.wait()
    if code:
        print(f"book/build.py: jupyter-book exited with {code}", file=sys.stderr)
        return code
    failures, missing, stderr = failed_notebooks(html), missing_pages(html), stderr_cells("".join(lines))
    for docname, log in failures.items():
        print(f"\n=== {docname}.ipynb failed to execute ===\n{log[-3000:]}", file=sys.stderr)
    if missing:
        print(f"book/build.py: no HTML page for {', '.join(missing)}", file=sys.stderr)
    if stderr:
        print("book/build.py: cells wrote to stderr (fix the source, or tag the cell remove-stderr):\n  "
              + "\n  ".join(stderr), file=sys.stderr)
    if failures or missing or stderr:
        print(f"book/build.py: FAILED notebooks: {', '.join(failures) or '-'}", file=sys.stderr)
        return 1
    done = "executed" if executed is None else f"built from the notebooks executed in {executed}"
    print(f"book/build.py: {len(chapter_notebooks())} chapters {done}; open {html / 'index.html'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", nargs="?", type=Path, default=DEFAULT_OUTPUT,
                        help="folder for _build/ (default: book, i.e. book/_build/html)")
    parser.add_argument("--executed", type=Path, metavar="DIR",
                        help="build from the chapter notebooks already executed in DIR (chapters not executed again)")
    args = parser.parse_args(argv)
    return build(args.output, args.executed)


if __name__ == "__main__":
    sys.exit(main())
