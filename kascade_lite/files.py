"""Small file utilities shared by every writer and reader of results: atomic writes (nothing is ever left
half-written), checksums, provenance, `results_file` / `load_results`, which find the shipped results, and how long
runs resume: `ResultsLog` (a results file that grows one finished unit at a time, each row keyed by its settings)
and stamps (`write_stamp` / `stamp_is_current`: a finished step's settings, input fingerprints and output checksums,
so that a pipeline skips what is up to date). Conversion and calibration resume on the same principle inside their
own files (a manifest of checksums, partial sums saved every few windows).

Results files are JSON with a ``"provenance"`` object (`provenance`) that records, among the command and machine,
``"smoke": true|false``. Shipped results (the repository's ``data/``, installed as the package data
``kascade_lite.shipped``, so they are there without a checkout, e.g. on Colab) are found with `results_file`:
``$KASCADE_RESULTS_DIR`` first (``kascade-lite figures --out ROOT`` sets it to ``ROOT/data``), then the shipped copy.
Smoke results are refused unless ``KASCADE_SMOKE=1``: the book never shows a smoke run as a measurement.
`provenance_records` lists what made every results file (the book's "Reproducing the numbers" page).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the final file ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` and rename the result onto ``path``."""
    with atomic_path(path) as tmp:
        write(tmp)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """``json.dump`` (indented, trailing newline) to ``path`` atomically."""
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def provenance(command: str, *, smoke: bool) -> dict[str, Any]:
    """What made a results file: the command, whether it ran at smoke sizes, the machine (CPU model, cores, JAX
    backend/devices), date and versions."""
    import datetime
    import platform

    import jax

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    devices = jax.devices()
    versions = {"python": platform.python_version(), "jax": jax.__version__}
    for mod in ("jaxlib", "flax", "numpy", "transformers", "torch"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return {
        "command": command,
        "smoke": bool(smoke),
        "machine": f"{cpu}, {os.cpu_count()} cores, jax backend {jax.default_backend()} "
                   f"({devices[0].device_kind} x{len(devices)})",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions,
    }


class ResultsLog:
    """A results file that grows one finished unit at a time, so a long run stopped anywhere keeps what it measured
    and a rerun with ``resume`` does only the rest: the one resume mechanism of the package's long runs.

    The document is ``{"provenance", "settings", "results": [rows], "skipped": [...]}`` (``fields`` replaces the
    last two, e.g. ``{"variants": {}}``); every `add` (or `save`) rewrites it atomically with the elapsed seconds.
    A row is keyed by its settings: `done` finds the earlier row whose fields include the given ones. ``resume``
    keeps an earlier file's rows if its ``settings`` equal these (but for the ``free`` keys, mappings that are
    merged, e.g. more cases or methods, and the ``grow`` keys, mappings that may gain entries but whose shared
    entries must be unchanged, e.g. schedule files written since) and records this run's provenance in its
    ``resumed_by`` list. ``redo``
    (with ``resume``): methods whose earlier rows are dropped and measured again, e.g. after a fix of that method
    (their descriptions in ``settings["methods"]`` may change), with ``why`` in the notes.
    ``time_budget`` seconds (0: none) after the start, `out_of_time` turns True."""

    def __init__(self, path: str | os.PathLike, command: str, settings: dict[str, Any], *, smoke: bool,
                 time_budget: float = 0, resume: bool = False, free: tuple[str, ...] = (),
                 grow: tuple[str, ...] = (), fields: dict[str, Any] | None = None, redo: tuple[str, ...] = (),
                 why: str | None = None):
        self.path, self.start, self.time_budget = Path(path), time.monotonic(), time_budget
        self.doc: dict[str, Any] = {"provenance": provenance(command, smoke=smoke), "settings": settings,
                                    **({"results": [], "skipped": []} if fields is None else fields)}
        if redo and not (resume and self.path.is_file()):
            raise ValueError(f"{self.path}: redo replaces rows of an earlier run; there is none to resume")
        if resume and self.path.is_file():
            old = json.loads(self.path.read_text())
            new = json.loads(json.dumps(settings))
            for key in grow:
                before = old.get("settings", {}).get(key, {})
                changed = sorted(n for n in set(before) & set(new[key]) if before[n] != new[key][n])
                if changed:
                    raise ValueError(f"{self.path}: --resume found the {key} {changed} changed since the run that "
                                     f"wrote it")

            def fixed(d: dict[str, Any]) -> dict[str, Any]:
                kept = {k: v for k, v in d.items() if k not in free + grow}
                if isinstance(kept.get("methods"), dict):
                    kept["methods"] = {m: t for m, t in kept["methods"].items() if m not in redo}
                return kept

            if fixed(old.get("settings", {})) != fixed(new):
                raise ValueError(f"{self.path}: --resume needs the same settings as the run that wrote it")
            for key in free + grow:
                old["settings"][key] = {**old["settings"].get(key, {}), **new[key]}
            if isinstance(new.get("methods"), dict):
                old["settings"]["methods"].update({m: new["methods"][m] for m in redo if m in new["methods"]})
            old["resumed_by"] = old.get("resumed_by", []) + [self.doc["provenance"]]
            old["skipped"] = []
            self.doc = old
            for name in redo:
                self.doc["results"] = [r for r in self.doc["results"] if r.get("method") != name]
                self.note(f"{name}: earlier rows dropped and measured again ({why or 'no reason given'})")

    def done(self, key: dict[str, Any]) -> dict[str, Any] | None:
        """The earlier row whose fields include ``key``, if any."""
        return next((r for r in self.doc["results"] if all(r.get(k) == v for k, v in key.items())), None)

    def note(self, text: str | None) -> None:
        """Record a remark about the run (e.g. a configuration the machine could not hold in memory)."""
        if text:
            self.doc.setdefault("notes", []).append(text)
            self.save()

    def out_of_time(self) -> bool:
        return self.time_budget > 0 and time.monotonic() - self.start > self.time_budget

    def add(self, row: dict[str, Any], key: str = "results") -> None:
        """Append ``row`` to the list ``key`` (``"results"`` or ``"skipped"``), save, and print it."""
        self.doc[key].append(row)
        self.save()
        print({k: v for k, v in row.items() if k != "cases"}, flush=True)

    def save(self) -> None:
        """Rewrite the file (atomically) with the elapsed time of this run."""
        self.doc["elapsed_s"] = round(time.monotonic() - self.start, 1)
        write_json_atomic(self.path, self.doc)


BIG_FILE = 64 << 20
"""Files above this size are fingerprinted by size and modification time instead of SHA-256."""


def fingerprint(path: Path) -> str:
    """SHA-256 of a file (size + mtime for files over `BIG_FILE`); a folder: its top-level files' fingerprints;
    ``"missing"`` if there is nothing."""
    if path.is_dir():
        parts = [f"{p.name}:{fingerprint(p)}" for p in sorted(path.iterdir())
                 if p.is_file() and not p.name.startswith(".")]
        return "dir:" + hashlib.sha256("\n".join(parts).encode()).hexdigest()
    if not path.is_file():
        return "missing"
    stat = path.stat()
    if stat.st_size > BIG_FILE:
        return f"size:{stat.st_size},mtime:{stat.st_mtime_ns}"
    return sha256_file(path)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return str(path.resolve())


def stamp_inputs(settings: dict[str, Any], files: list[Path], root: Path) -> dict[str, Any]:
    """What decides whether a step is up to date: its settings and its input files' fingerprints (paths relative to
    ``root``), as JSON values, so that they compare equal to a stamp read back (tuples become lists)."""
    return json.loads(json.dumps({"settings": settings,
                                  "files": {_relative(p, root): fingerprint(p) for p in files}}))


def stamp_is_current(path: Path, inputs: dict[str, Any], root: Path) -> bool:
    """True if the stamp at ``path`` records these inputs and every output it lists still has its checksum."""
    try:
        stamp = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("inputs") == inputs and bool(stamp.get("outputs")) and all(
        fingerprint(root / rel if not Path(rel).is_absolute() else Path(rel)) == digest
        for rel, digest in stamp["outputs"].items())


def write_stamp(path: Path, step: str, inputs: dict[str, Any], outputs: list[Path], seconds: float,
                root: Path) -> None:
    """Record that ``step`` ran on ``inputs`` (`stamp_inputs`) in ``seconds`` and wrote ``outputs``."""
    write_json_atomic(path, {"step": step, "inputs": inputs, "seconds": round(seconds, 1),
                             "outputs": {_relative(p, root): fingerprint(p) for p in outputs}})


RESULTS_ENV = "KASCADE_RESULTS_DIR"
"""Environment variable naming a results folder searched before the shipped results."""


class SmokeResultsError(ValueError):
    """A chapter asked for a measurement and found a smoke-size run."""


def record_provenance(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The ``provenance`` object of a results document (top level, or under ``meta`` for a schedule)."""
    prov = doc.get("provenance", (doc.get("meta") or {}).get("provenance"))
    return prov if isinstance(prov, dict) else None


def is_smoke(doc: dict[str, Any]) -> bool:
    """True if the results document says it was a smoke run (files without the flag are not)."""
    prov = record_provenance(doc)
    return bool(prov and prov.get("smoke"))


def shipped_dir() -> Path:
    """The results shipped with the package (``kascade_lite.shipped``: the repository's ``data/``)."""
    from importlib.resources import files

    try:
        return Path(str(files("kascade_lite.shipped")))
    except ModuleNotFoundError as e:
        raise FileNotFoundError("the shipped results (package kascade_lite.shipped) are not installed: reinstall "
                                "the package (`pip install -e .` in a checkout)") from e


def results_file(name: str, *, allow_smoke: bool | None = None) -> Path:
    """Path of results file ``name`` (e.g. ``"coverage.json"``, ``"calibration/smollm2-135m.safetensors"``):
    from ``$KASCADE_RESULTS_DIR`` if it holds it, else the shipped copy.

    Raises ``FileNotFoundError`` naming the places searched, and `SmokeResultsError` if the file (or, for a
    non-JSON file, the ``.json`` beside it) records a smoke run, unless ``allow_smoke`` (default: ``KASCADE_SMOKE=1``,
    a smoke run of the chapter, which shows nothing as a measurement)."""
    from .data import smoke

    places = [Path(d) for d in (os.environ.get(RESULTS_ENV),) if d] + [shipped_dir()]
    path = next((d / name for d in places if (d / name).is_file()), None)
    if path is None:
        raise FileNotFoundError(f"results file {name!r} not found in {', '.join(map(str, places))}")
    allow = smoke() if allow_smoke is None else allow_smoke
    record = path if path.suffix == ".json" else path.with_suffix(".json")
    if not allow and record.is_file() and is_smoke(json.loads(record.read_text())):
        raise SmokeResultsError(f"{record} holds a smoke-size run (provenance smoke: true), not a measurement: "
                                f"rerun it at full size, or set KASCADE_SMOKE=1 to run the chapter at smoke size")
    return path


def load_results(name: str, *, allow_smoke: bool | None = None) -> dict[str, Any]:
    """The JSON results file ``name`` found by `results_file` (smoke runs refused the same way)."""
    path = results_file(name, allow_smoke=allow_smoke)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read results JSON ({e})") from e


def provenance_records(folder: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """One row per JSON results file under ``folder`` (default: the shipped results, `shipped_dir`), sorted by path:
    ``{"file", "command", "machine", "date", "smoke", "continued"}``, where ``continued`` lists the runs that
    continued a run cut short (the file's ``"resumed_by"`` entries, each ``{"command", "machine", "date"}``, in
    order). Files without a provenance object get ``None`` in its fields. Raises ``ValueError`` naming a file that
    is not valid JSON."""
    root = Path(folder) if folder is not None else shipped_dir()
    rows = []
    for path in sorted(root.rglob("*.json")):
        if any(part.startswith(".") for part in path.relative_to(root).parts):  # .stamps/ and the like
            continue
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read results JSON ({e})") from e
        prov = record_provenance(doc) or {}
        rows.append({"file": path.relative_to(root).as_posix(), "command": prov.get("command"),
                     "machine": prov.get("machine"), "date": prov.get("date"),
                     "smoke": prov.get("smoke") if prov else None,
                     "continued": [{k: later.get(k) for k in ("command", "machine", "date")}
                                   for later in doc.get("resumed_by", [])]})
    return rows
