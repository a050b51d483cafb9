"""Build the whole book with ``KASCADE_SMOKE=1`` into a temporary folder from the chapter notebooks executed once, as
on Colab, by ``conftest.ColabRuns`` (``book/build.py <folder> --executed <folder>``, chapters not executed again;
the book ``make book`` built in ``book/_build/html`` is left alone), then render each chapter in headless Chromium:
one screenshot per chapter in ``<folder>/_build/screenshots/NN_name.png`` (the folder is printed;
``KASCADE_BOOK_TEST_DIR`` picks it and keeps it). Fail on a notebook that did not execute, a cell that wrote to
stderr, a missing page, a Python traceback on a page, an image that does not load, or console noise on a page
(progress bars, warnings, raw ``PosixPath`` reprs, stderr boxes)."""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHAPTERS = ["01_rope", "02_gqa", "03_weight_conversion", "04_the_model", "05_attention_sparsity",
            "06_calibration", "07_kascade_attention", "08_speedups", "09_scaling_out",
            "10_verdict"]  # docs/CONTRIBUTING.md
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--virtual-time-budget=15000"]
# Injected into a copy of each page: after load, list the local images the browser could not decode.
IMAGE_PROBE = """<script>
window.addEventListener("load", () => {
  const broken = [...document.images].filter(i => i.src.startsWith("file:") && !(i.complete && i.naturalWidth > 0));
  const out = document.createElement("pre");
  out.id = "kascade-image-probe";
  out.textContent = JSON.stringify({total: document.images.length, broken: broken.map(i => i.getAttribute("src"))});
  document.body.appendChild(out);
});
</script>"""
ANSI = re.compile(r"\x1b\[[0-9;]*m")
TRACEBACK = re.compile(r"Traceback \(most recent call last\)|class=\"[^\"]*\btraceback\b")
# Console noise that must never reach a page: what each pattern catches.
NOISE = {
    "a tqdm progress bar": re.compile(r"\d+%\|"),
    "a progress rate (it/s])": re.compile(r"(?:it|s)/(?:s|it)\]"),
    "TqdmWarning": re.compile(r"TqdmWarning"),
    "an absl log line": re.compile(r"WARNING:absl|I\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \w+\.(?:cc|py):\d+\]"),
    "a Python warning": re.compile(r"\b(?:User|Deprecation|Future|Runtime)Warning\b"),
    "a raw PosixPath repr": re.compile(r"PosixPath\("),
    "a stderr output box": re.compile(r"class=\"[^\"]*\boutput stderr\b"),
    "an empty output box": re.compile(r"<div class=\"output [^\"]*\"><div class=\"highlight\"><pre><span></span></pre>"),
}

pytestmark = pytest.mark.book


def existing_chapters() -> list[str]:
    return [name for name in CHAPTERS if (REPO / "notebooks" / f"{name}.ipynb").is_file()]


@dataclass
class Build:
    """Result of the one smoke build: the HTML folder, book/build.py's exit code and output, failed notebooks."""

    html: Path
    screenshots: Path
    returncode: int
    output: str
    failed: dict[str, str]  # chapter name -> its execution error (ANSI colours removed)


@pytest.fixture(scope="session")
def built_book(colab_runs, tmp_path_factory: pytest.TempPathFactory) -> Build:
    """Run ``book/build.py <temporary folder> --executed <folder>`` once, from the chapters executed at smoke size
    by `colab_runs` (conftest.py; the only execution of each chapter in the test run, shared with
    tests/test_notebooks.py)."""
    chosen = os.environ.get("KASCADE_BOOK_TEST_DIR")
    out = Path(chosen) if chosen else tmp_path_factory.mktemp("book")
    html, screenshots = out / "_build" / "html", out / "_build" / "screenshots"
    runs = {name: colab_runs.run(REPO / "notebooks" / f"{name}.ipynb") for name in existing_chapters()}
    failed = {name: ANSI.sub("", run.error) for name, run in runs.items() if run.error}
    print(f"test book: {html} (screenshots in {screenshots})")
    env = {**os.environ, "KASCADE_SMOKE": "1", "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    proc = subprocess.run([sys.executable, str(REPO / "book" / "build.py"), str(out), "--executed",
                           str(colab_runs.executed)], cwd=REPO, env=env, capture_output=True, text=True)
    output = f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    if not (html / "index.html").is_file():
        pytest.fail(f"the book did not build (exit {proc.returncode}):\n{output}")
    return Build(html, screenshots, proc.returncode, output, failed)


def test_book_builds_and_every_notebook_executes(built_book: Build) -> None:
    assert not built_book.failed, f"notebooks failed to execute: {sorted(built_book.failed)}"
    assert built_book.returncode == 0, f"book/build.py exited with {built_book.returncode}:\n{built_book.output}"


def chromium(*args: str) -> subprocess.CompletedProcess:
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: run `make setup` (installs Debian's chromium)")
    with tempfile.TemporaryDirectory(prefix="kascade-chromium-") as profile:
        return subprocess.run([str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=120)


def local_image_files(page: Path) -> list[Path]:
    """Files behind the page's ``<img src>`` that are not remote (the Colab badge is)."""
    srcs = re.findall(r"<img\b[^>]*\bsrc=\"([^\"]+)\"", page.read_text())
    return [(page.parent / html.unescape(s).split("#")[0]).resolve() for s in srcs
            if not s.startswith(("http://", "https://", "data:"))]


def assert_valid_image(path: Path) -> None:
    assert path.is_file(), f"image {path} is missing"
    if path.suffix == ".svg":
        ElementTree.parse(path)  # raises on a truncated or invalid SVG
    else:
        from PIL import Image

        with Image.open(path) as im:
            im.verify()


def test_every_notebook_is_a_known_chapter() -> None:
    """Chapter files follow docs/CONTRIBUTING.md, so the TOC glob orders them and no stray notebook sneaks in."""
    stray = sorted(p.name for p in (REPO / "notebooks").glob("*.ipynb") if p.stem not in CHAPTERS)
    assert not stray, f"notebooks/ holds files that are not chapters of docs/CONTRIBUTING.md: {stray}"
    assert existing_chapters(), "no chapter notebooks found in notebooks/"


def test_shipped_figures_are_the_ones_the_chapters_draw() -> None:
    """book/figures holds exactly the figures that some chapter saves (``save_figure(fig, "NN_name")`` or the chapter's
    ``save`` wrapper): no orphan left by a renamed figure, none missing that a full-size run would write."""
    saved = re.compile(r'"(\d\d_[a-z0-9_]+)"\)')  # a figure name closing a save call
    drawn = set()
    for name in existing_chapters():
        cells = json.loads((REPO / "notebooks" / f"{name}.ipynb").read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        drawn |= {n for n in saved.findall(code) if n[:2] == name[:2]}
    shipped = {p.stem for p in (REPO / "book" / "figures").glob("*.png")}
    assert not shipped - drawn, f"book/figures holds figures no chapter draws: {sorted(shipped - drawn)}"
    assert not drawn - shipped, f"chapters draw figures missing from book/figures: {sorted(drawn - shipped)}"


@pytest.mark.parametrize("chapter", existing_chapters())
def test_chapter_page_renders(built_book: Build, chapter: str) -> None:
    if chapter in built_book.failed:
        pytest.fail(f"notebooks/{chapter}.ipynb failed to execute:\n{built_book.failed[chapter][-4000:]}")
    page = built_book.html / "notebooks" / f"{chapter}.html"
    assert page.is_file(), f"chapter page {page} was not built"
    text = page.read_text()
    assert not TRACEBACK.search(text), f"{page} shows a Python traceback"
    for image in local_image_files(page):
        assert_valid_image(image)

    built_book.screenshots.mkdir(parents=True, exist_ok=True)
    shot = built_book.screenshots / f"{chapter}.png"
    shot.unlink(missing_ok=True)
    chromium("--window-size=1280,8000", f"--screenshot={shot}", page.as_uri())
    assert shot.is_file() and shot.stat().st_size > 10_000, f"no screenshot of {page}"

    probe_page = page.with_name(f".probe_{chapter}.html")
    try:
        probe_page.write_text(text.replace("</body>", IMAGE_PROBE + "</body>"))
        dom = chromium("--dump-dom", probe_page.as_uri()).stdout
    finally:
        probe_page.unlink(missing_ok=True)
    found = re.search(r'<pre id="kascade-image-probe"[^>]*>(.*?)</pre>', dom, re.S)
    assert found, f"Chromium did not finish loading {page}"
    probe = json.loads(html.unescape(found.group(1)))
    assert not probe["broken"], f"{page}: images failed to load in Chromium: {probe['broken']}"



def page_noise(text: str) -> list[str]:
    """What console noise (`NOISE`) a page shows, each with a little context."""
    found = []
    for what, pattern in NOISE.items():
        for m in list(pattern.finditer(text))[:2]:
            context = re.sub(r"<[^>]+>", "", text[max(0, m.start() - 80):m.end() + 80]).replace("\n", " ")
            found.append(f"{what}: ...{html.unescape(context)}...")
    return found


def test_noise_patterns_catch_what_they_name() -> None:
    samples = ["calibrating smollm2-135m:  50%|█████     | 1/2 [00:05<00:05,  5.92s/seq]", "12.3it/s]",
               "TqdmWarning: IProgress not found", "WARNING:absl:No GPU/TPU found",
               "/x.py:3: UserWarning: careful", "PosixPath('/work/book/figures/08_x.png')",
               '<div class="output stderr highlight-myst-ansi notranslate">']
    for sample in samples:
        assert page_noise(sample), sample
    assert not page_noise("<p>10 % of the keys | 95 % of the mass; 3.2 tokens/s</p>")


@pytest.mark.parametrize("chapter", existing_chapters())
def test_chapter_page_has_no_console_noise(built_book: Build, chapter: str) -> None:
    """No progress bars, warnings, raw reprs or stderr boxes on a rendered page: they belong to the package to
    silence at their source (see kascade_lite/progress.py), not to the reader."""
    page = built_book.html / "notebooks" / f"{chapter}.html"
    if not page.is_file():
        pytest.skip(f"{page} was not built (see test_chapter_page_renders)")
    noise = page_noise(page.read_text())
    assert not noise, f"{page} shows console noise:\n  " + "\n  ".join(noise)


def test_build_script_finds_stderr_warnings() -> None:
    """book/build.py fails the build on myst-nb's ``stderr was found`` warnings (stderr_output: remove-warn)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("book_build", REPO / "book" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    log = ("\x1b[91m/work/x/notebooks/05_attention_sparsity.ipynb:10005: WARNING: stderr was found in the cell "
           "outputs of cell 12 [mystnb.stderr]\x1b[39;49;00m\nreading sources... [ 60%] notebooks/06_calibration\n")
    assert build.stderr_cells(log) == [
        "notebooks/05_attention_sparsity.ipynb: stderr was found in the cell outputs of cell 12"]
    assert build.stderr_cells("/work/x/notebooks/01_rope.ipynb: Executed notebook in 15.05 seconds [mystnb]") == []
    assert build.html_dir(Path("/tmp/b")) == Path("/tmp/b/_build/html")
    assert build.figures_dir(Path("/tmp/b")) == Path("/tmp/b/_build/figures")  # never the committed book/figures


def test_build_from_executed_notebooks_fails_on_stderr_and_missing_chapters(tmp_path: Path) -> None:
    """``book/build.py --executed`` (chapters not executed again) still fails on a cell's stderr output (myst-nb warns
    when it renders the saved outputs) and on a chapter with no executed notebook; it executes no chapter."""
    import nbformat

    executed, first = tmp_path / "executed", REPO / "notebooks" / f"{existing_chapters()[0]}.ipynb"
    executed.mkdir()
    nb = nbformat.read(first, as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "code")
    cell.outputs = [nbformat.v4.new_output("stream", name="stderr", text="a warning\n")]
    nbformat.write(nb, executed / first.name)
    proc = subprocess.run([sys.executable, str(REPO / "book" / "build.py"), str(tmp_path), "--executed",
                           str(executed)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    cell_number = nb.cells.index(cell) + 1
    assert f"notebooks/{first.name}: stderr was found in the cell outputs of cell {cell_number}" in proc.stderr
    assert all(name in proc.stderr for name in existing_chapters()[1:]), proc.stderr
    assert not (tmp_path / "_build" / "figures").exists() and (tmp_path / "_build" / "html" / "index.html").is_file()


@pytest.mark.parametrize("page", ["book/intro", "book/glossary", "book/reproducing", "book/perplexity_table"])
def test_book_page_renders(built_book: Build, page: str) -> None:
    """The front page and the appendix pages: built, no traceback, no console noise, every local image loads; the
    executed pages render what they compute from data/ (the headline results, every results file's provenance)."""
    path = built_book.html / f"{page}.html"
    assert path.is_file(), f"{path} was not built:\n{built_book.output}"
    text = path.read_text()
    assert not TRACEBACK.search(text), f"{path} shows a Python traceback"
    noise = page_noise(text)
    assert not noise, f"{path} shows console noise:\n  " + "\n  ".join(noise)
    for image in local_image_files(path):
        assert_valid_image(image)
    if page == "book/intro":
        assert "Needle retrieval" in text and "Decode speed" in text and len(local_image_files(path)) >= 2
    if page == "book/reproducing":
        from kascade_lite.files import provenance_records

        missing = [r["file"] for r in provenance_records() if f"data/{r['file']}" not in html.unescape(text)]
        assert not missing, f"{path} does not list {missing}"
    if page == "book/perplexity_table":
        from kascade_lite.files import load_results

        rows = load_results("accuracy_ppl.json")["results"]
        assert text.count("<tr") >= len(rows) + 1, f"{path} does not show all {len(rows)} rows"
        assert all(r["method"] in text for r in rows)
