"""Build the whole book with ``KASCADE_SMOKE=1`` (executing every chapter notebook once), then render each chapter
in headless Chromium: one screenshot per chapter in ``book/_build/screenshots/NN_name.png``; fail on a notebook that
did not execute, a missing page, a Python traceback on a page, or an image that does not load."""

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
HTML = REPO / "book" / "_build" / "html"
SCREENSHOTS = REPO / "book" / "_build" / "screenshots"
CHROMIUM = Path("/usr/bin/chromium")
CHAPTERS = ["01_rope", "02_gqa", "03_weight_conversion", "04_the_model", "05_attention_sparsity",
            "06_calibration", "07_kascade_attention", "08_speedups", "09_scaling_out"]  # docs/CONTRIBUTING.md
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

pytestmark = pytest.mark.slow


def existing_chapters() -> list[str]:
    return [name for name in CHAPTERS if (REPO / "notebooks" / f"{name}.ipynb").is_file()]


@dataclass
class Build:
    """Result of the one smoke build: the HTML folder, book/build.py's exit code and output, failed notebooks."""

    html: Path
    returncode: int
    output: str
    failed: dict[str, str]  # chapter name -> its execution error log (ANSI colours removed)


@pytest.fixture(scope="session")
def built_book() -> Build:
    """Run ``book/build.py`` once with smoke sizes (this executes every chapter notebook)."""
    env = {**os.environ, "KASCADE_SMOKE": "1", "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    proc = subprocess.run([sys.executable, str(REPO / "book" / "build.py")], cwd=REPO, env=env,
                          capture_output=True, text=True)
    failed = {p.name.removesuffix(".err.log"): ANSI.sub("", p.read_text(errors="replace"))
              for p in sorted((HTML / "reports").rglob("*.err.log"))}
    output = f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    if not (HTML / "index.html").is_file():
        pytest.fail(f"the book did not build (exit {proc.returncode}):\n{output}")
    return Build(HTML, proc.returncode, output, failed)


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

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOTS / f"{chapter}.png"
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

