"""The module order that README.md's layout section and docs/CONTRIBUTING.md state is the package's: every module is
listed (or named as a helper), and no module imports one listed after it, at the top or inside a function."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "kascade_lite"
HELPERS = {"__init__", "files", "progress", "notebooks"}  # usable from anywhere; not part of the order


def stated_order(text: str) -> list[str]:
    """The ``a → b → ...`` chain of module names (``.py`` suffixes dropped), across line breaks."""
    chain = re.search(r"config(?:\.py)?(?:\s*→\s*\w+(?:\.py)?)+", text)
    assert chain, "no 'config → rope → ...' line"
    return [m.removesuffix(".py") for m in re.split(r"\s*→\s*", chain.group(0))]


def package_imports(path: Path) -> set[str]:
    """Modules of kascade_lite that ``path`` imports anywhere (``from .x import``, ``from . import x``,
    ``kascade_lite.x``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(a.name for a in node.names)
            elif node.module and node.module.startswith("kascade_lite."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("kascade_lite."))
    return found


def test_stated_order_is_the_import_order() -> None:
    order = stated_order((REPO / "README.md").read_text())
    assert stated_order((REPO / "docs" / "CONTRIBUTING.md").read_text()) == order
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert set(order) | HELPERS == modules, "README's module order and kascade_lite/ disagree"
    rank = {m: i for i, m in enumerate(order)}
    for module in order:
        later = sorted(m for m in package_imports(PACKAGE / f"{module}.py") if rank.get(m, -1) > rank[module])
        assert not later, f"{module}.py imports {later}, listed after it"
