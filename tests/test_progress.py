"""kascade_lite.progress: plain bars, shown on a terminal only, and no notebook-widget warning from tqdm.auto."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from kascade_lite.progress import progress_disabled, tqdm


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_no_bar_on_a_non_tty_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KASCADE_PROGRESS", raising=False)
    out = io.StringIO()
    assert list(tqdm(range(3), file=out, desc="x")) == [0, 1, 2]
    assert out.getvalue() == ""


def test_bar_on_a_tty_and_the_env_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KASCADE_PROGRESS", raising=False)
    tty = FakeTTY()
    list(tqdm(range(3), file=tty, desc="x"))
    assert "3/3" in tty.getvalue()
    monkeypatch.setenv("KASCADE_PROGRESS", "0")
    tty = FakeTTY()
    list(tqdm(range(3), file=tty))
    assert tty.getvalue() == ""
    monkeypatch.setenv("KASCADE_PROGRESS", "1")
    out = io.StringIO()
    list(tqdm(range(3), file=out))
    assert "3/3" in out.getvalue()
    assert progress_disabled(disable=True) is True  # progress=False always wins


KERNEL = """
import sys, types, warnings
class ZMQInteractiveShell:  # what tqdm.autonotebook looks for: a Jupyter kernel's shell
    pass
sys.modules["ipykernel.zmqshell"] = types.ModuleType("ipykernel.zmqshell")
sys.modules["IPython"] = types.SimpleNamespace(get_ipython=ZMQInteractiveShell)
sys.modules["ipywidgets"] = None  # not installed
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    {imports}
print([str(w.message) for w in caught])
"""


def kernel_warnings(imports: str) -> str:
    proc = subprocess.run([sys.executable, "-c", KERNEL.format(imports=imports)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_tqdm_auto_is_imported_quietly_inside_a_kernel() -> None:
    """Inside a Jupyter kernel without ipywidgets, ``import tqdm.auto`` (transformers does it) warns ``IProgress not
    found``; ``import kascade_lite`` imports it first with that one warning filtered."""
    assert "IProgress not found" in kernel_warnings("import tqdm.auto")  # the premise: a bare import warns
    quiet = kernel_warnings("import kascade_lite, tqdm.auto")
    assert "IProgress" not in quiet and quiet.strip() == "[]", quiet
