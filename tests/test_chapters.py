"""Every chapter teaches the same way (docs/CONTRIBUTING.md, "Chapter structure"): it opens with what the reader will
learn, ends with a Summary whose numbers are rendered by code, then Exercises whose solutions are collapsed, executed
with the chapter and checked with ``assert``; it links once to the "Reproducing the numbers" appendix instead of
printing provenance; and no page of the book carries project bookkeeping (`INTERNAL_WORDS`).

These checks read the notebooks' sources; tests/test_notebooks.py executes them (so a wrong solution fails there)."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

from kascade_lite.data import checkout_root
from kascade_lite.notebooks import chapter_notebooks

REPO = checkout_root()
CHAPTERS = chapter_notebooks(REPO / "notebooks")
BOOK_PAGES = sorted((REPO / "book").glob("*.md"))

INTERNAL_WORDS = ("original guide", "seed guide", "resumed by", "resumed_by", "shipped before", "target met",
                  "target not met", "verdict issue", "internal document")
"""Project bookkeeping that must not reach a reader, in any cell of a chapter or any page of the book (matched
case-insensitively): references to the documents the book was written from, runs continued after an interruption
(the appendix lists those, from the data), the book's own history, and targets graded against internal documents."""

SOLUTION_TAGS = {"solution", "hide-cell"}
"""An exercise's solution: a code cell with both tags (``hide-cell``: MyST-NB collapses input and output behind one
toggle in Jupyter Book 1; ``solution``: what this test counts)."""
APPENDIX_LINK = "../book/reproducing.md"
PROVENANCE_PRINT = re.compile(r"""provenance["']?\]?\s*\[\s*["'](?:command|machine|date)["']|\["provenance"\]\["""
                              r"""\s*["'](?:command|machine|date)""")
# A number as prose would type it: not part of a name (Llama-3.1, SmolLM2-135M, SHA-256), a chapter or layer 0.
TYPED_NUMBER = re.compile(r"(?<![\w.\-/])\d[\d,]*(?:\.\d+)?(?![\w\-/])")
NOT_PROSE = re.compile(r"`[^`]*`|\$[^$]*\$|\]\([^)]*\)|\b[Cc]hapters? \d\d(?:[–-]\d\d)?|\b[Ll]ayer 0\b")


def cells(path: Path) -> list[nbformat.NotebookNode]:
    return nbformat.read(path, as_version=4).cells


def heading_index(nb_cells: list, title: str) -> int:
    found = [i for i, c in enumerate(nb_cells) if c.cell_type == "markdown" and c.source.startswith(title)]
    assert len(found) == 1, f"expected one markdown cell starting with {title!r}, found {len(found)}"
    return found[0]


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_opens_with_what_the_reader_will_learn(path: Path) -> None:
    first = cells(path)[0]
    assert first.cell_type == "markdown" and first.source.startswith(f"# {path.stem[:2]} — "), path.name
    assert "**What you will learn**" in first.source, f"{path.name}: no 'What you will learn' in its first cell"
    after = first.source.split("**What you will learn**", 1)[1].split("[![Open In Colab]", 1)[0]
    bullets = [line for line in after.splitlines() if line.startswith("- ")]
    assert 2 <= len(bullets) <= 3, f"{path.name}: 'What you will learn' has {len(bullets)} items, want 2 or 3"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_ends_with_a_rendered_summary_and_exercises(path: Path) -> None:
    nb_cells = cells(path)
    summary, exercises = heading_index(nb_cells, "## Summary"), heading_index(nb_cells, "## Exercises")
    assert summary < exercises, f"{path.name}: Exercises come before the Summary"
    between = nb_cells[summary + 1:exercises]
    rendered = [c for c in between if c.cell_type == "code" and "Markdown(" in c.source]
    assert rendered, f"{path.name}: the Summary has no code cell that renders its numbers with Markdown(...)"
    assert all("remove-input" in c.metadata.get("tags", []) for c in rendered), f"{path.name}: show the numbers only"
    for c in [nb_cells[summary], *(c for c in between if c.cell_type == "markdown")]:
        prose = NOT_PROSE.sub(" ", c.source.removeprefix("## Summary"))
        typed = TYPED_NUMBER.findall(prose)
        assert not typed, f"{path.name}: the Summary's prose types numbers {typed}; render them from data or code"

    solutions = [c for c in nb_cells[exercises:] if c.cell_type == "code"
                 and SOLUTION_TAGS <= set(c.metadata.get("tags", []))]
    questions = [c for c in nb_cells[exercises:] if c.cell_type == "markdown" and c.source.startswith("**Exercise ")]
    assert 2 <= len(solutions) <= 4, f"{path.name}: {len(solutions)} solution cells, want 2 to 4"
    assert len(questions) == len(solutions), f"{path.name}: {len(questions)} exercises, {len(solutions)} solutions"
    for c in solutions:
        assert re.search(r"\bassert\b|assert_\w+\(", c.source), f"{path.name}: a solution checks nothing:\n{c.source}"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_links_the_appendix_once_and_prints_no_provenance(path: Path) -> None:
    nb_cells = cells(path)
    links = sum(c.source.count(APPENDIX_LINK) for c in nb_cells if c.cell_type == "markdown")
    assert links == 1, f"{path.name}: {links} links to {APPENDIX_LINK}, want exactly one"
    for c in nb_cells:
        if c.cell_type == "code":
            assert not PROVENANCE_PRINT.search(c.source), f"{path.name}: a cell shows provenance:\n{c.source}"


@pytest.mark.parametrize("path", [*CHAPTERS, *BOOK_PAGES, REPO / "README.md"], ids=lambda p: p.name)
def test_no_internal_words(path: Path) -> None:
    text = (path.read_text() if path.suffix != ".ipynb"
            else "\n".join(c.source for c in cells(path))).lower()
    found = [w for w in INTERNAL_WORDS if w in text]
    assert not found, f"{path.relative_to(REPO)} holds internal words {found}"


def test_checks_catch_what_they_name() -> None:
    assert PROVENANCE_PRINT.search('print(doc["provenance"]["machine"])')
    assert PROVENANCE_PRINT.search('prov = x["provenance"]\nprint(provenance["command"])')
    assert not PROVENANCE_PRINT.search('doc["provenance"].get("load_average")')
    prose = NOT_PROSE.sub(" ", "Llama-3.1-8B and SmolLM2-135M, SHA-256, chapter 07, layer 0, `k = 128`, $K=5$, [a](02_x.ipynb)")
    assert not TYPED_NUMBER.findall(prose), TYPED_NUMBER.findall(prose)
    assert TYPED_NUMBER.findall("peaked at 1,237 MiB, 4.1× faster, 95 %") == ["1,237", "4.1", "95"]


def test_book_lists_the_appendix_pages() -> None:
    toc = (REPO / "book" / "_toc.yml").read_text()
    for page in ("book/glossary", "book/reproducing", "book/perplexity_table"):
        assert re.search(rf"^\s*- file: {page}\s*$", toc, re.M), f"book/_toc.yml does not list {page}"
        assert (REPO / f"{page}.md").is_file()
