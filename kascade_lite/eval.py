r"""Evaluation: perplexity on token windows, and the ``kascade-lite eval`` run (`run_eval`: dense vs Kascade under
each schedule, into ``eval_<model>.json``).

Perplexity of a window of tokens :math:`x_1..x_T` is :math:`\exp\big(-\frac{1}{T-1}\sum_{t=2}^{T}
\log p(x_t \mid x_{<t})\big)`; over a corpus cut into windows we average the negative log-likelihood (NLL) over every
predicted token of every window, then exponentiate. The ``attention`` argument is the per-layer attention function of
`kascade_lite.model.forward`, so the same code measures dense and sparse attention.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .data import wikitext_windows
from .files import provenance, shipped_dir, write_json_atomic
from .methods import Setting, attention
from .model import AttentionFn, Llama, dense_attention
from .models import SMOLLM2, ModelSpec, load_spec, spec_tokenizer
from .progress import tqdm
from .schedule import Schedule


@functools.partial(jax.jit, static_argnames=("graphdef", "attention"))
def _window_nll(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, attention: AttentionFn) -> jax.Array:
    """Mean NLL ``[batch]`` (float32) of predicting ``tokens[:, 1:]`` from ``tokens: [batch, seq]``, for a model split
    by ``nnx.split`` (the jit style of `model.forward_split`; the logits never leave the program)."""
    logits, _, _ = nnx.merge(graphdef, state)(tokens, attention=attention)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    target = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]  # [batch, seq - 1]
    return -jnp.mean(target, axis=-1)


def nll_per_window(model: Llama, windows: np.ndarray, *, attention: AttentionFn = dense_attention,
                   batch_size: int = 4, progress: bool = True) -> np.ndarray:
    """Mean token NLL (nats) of each window: ``windows: [n, seq]`` int -> ``[n]`` float64.

    Windows are independent sequences (no cache is carried across them); batches are padded to ``batch_size`` so
    the jitted forward compiles once.
    """
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[1] < 2 or windows.shape[0] == 0:
        raise ValueError(f"windows must be [n>0, seq>=2] token ids, got shape {windows.shape}")
    if not np.issubdtype(windows.dtype, np.integer):
        raise ValueError(f"windows must hold integer token ids, got dtype {windows.dtype}")
    if windows.min() < 0 or windows.max() >= model.cfg.vocab_size:
        raise ValueError(f"token ids must lie in [0, {model.cfg.vocab_size}), got [{windows.min()}, {windows.max()}]")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    graphdef, state = nnx.split(model)
    out = []
    for start in tqdm(range(0, len(windows), batch_size), desc="nll", unit="batch", disable=not progress):
        batch = windows[start:start + batch_size]
        pad = batch_size - len(batch)
        padded = np.concatenate([batch, np.repeat(batch[:1], pad, axis=0)]) if pad else batch
        nll = _window_nll(graphdef, state, jnp.asarray(padded, jnp.int32), attention)
        out.append(np.asarray(nll, np.float64)[:len(batch)])
    return np.concatenate(out)


def perplexity(model: Llama, windows: np.ndarray, *, attention: AttentionFn = dense_attention, batch_size: int = 4,
               progress: bool = True) -> float:
    """``exp`` of the mean token NLL over all predicted tokens of ``windows: [n, seq]`` (equal-length windows, so
    the mean of the per-window means is the mean over tokens)."""
    nll = nll_per_window(model, windows, attention=attention, batch_size=batch_size, progress=progress)
    return float(np.exp(nll.mean()))


@dataclass(frozen=True)
class EvalSettings:
    """Perplexity windows and which schedules (name suffixes such as ``dp_k5``; empty = all) to evaluate. The
    smoke windows (256 tokens) are longer than the schedules' key floor, so Kascade really drops keys."""

    windows: int = 16
    seq_len: int = 512
    batch_size: int = 4
    schedules: tuple[str, ...] = ()

    @classmethod
    def smoke(cls) -> "EvalSettings":
        return cls(windows=2, seq_len=256, batch_size=2, schedules=("dp_k4",))


def find_schedules(schedule_dir: Path, model: str, names: Sequence[str] = ()) -> dict[str, Path]:
    """``{suffix: path}`` of ``<model>_<suffix>.json`` in ``schedule_dir`` (only ``names`` if given)."""
    found = {p.stem.removeprefix(f"{model}_"): p for p in sorted(schedule_dir.glob(f"{model}_*.json"))}
    if not found:
        raise FileNotFoundError(f"no schedules {schedule_dir}/{model}_*.json: run `kascade-lite schedule` first")
    missing = sorted(set(names) - set(found))
    if missing:
        raise ValueError(f"schedules {missing} not in {schedule_dir} (have {sorted(found)})")
    return {n: found[n] for n in names} if names else found


def run_eval(spec: ModelSpec, root: Path, settings: EvalSettings, *, smoke: bool, cache: str | None = None,
             command: str = "kascade-lite eval") -> list[Path]:
    """WikiText-2 (raw, test) perplexity, dense and with Kascade under each schedule (``ROOT/data/schedules``, or
    the shipped ones for SmolLM2 when ROOT has none), into ``ROOT/data/eval_<model>.json`` (per-window NLL
    included). Returns the written path."""
    schedule_dir = root / "data" / "schedules"
    if not any(schedule_dir.glob(f"{spec.name}_*.json")) and spec.name == SMOLLM2:
        schedule_dir = shipped_dir() / "schedules"
    paths = find_schedules(schedule_dir, spec.name, settings.schedules)
    model = load_spec(spec, cache)
    windows = wikitext_windows("test", settings.seq_len, settings.windows, tokenizer=spec_tokenizer(spec))
    policies = {"dense": dense_attention}
    policies |= {f"kascade_{n}": attention("kascade", Setting(Schedule.load(p))) for n, p in paths.items()}
    rows = []
    for name, fn in tqdm(policies.items(), desc=f"eval {spec.name}", unit="policy"):
        nll = nll_per_window(model, windows, attention=fn, batch_size=settings.batch_size, progress=False)
        rows.append({"policy": name, "ppl": float(np.exp(nll.mean())),
                     "nll_per_window": [round(float(x), 6) for x in nll]})
    dense = rows[0]["ppl"]
    for row in rows:
        row["delta_vs_dense_pct"] = round(100 * (row["ppl"] / dense - 1), 4)
    out = root / "data" / f"eval_{spec.name}.json"
    write_json_atomic(out, {"model": spec.name, "dataset": "wikitext-2-raw-v1 test",
                            "settings": {"windows": settings.windows, "seq_len": settings.seq_len,
                                         "batch_size": settings.batch_size, "schedules": sorted(paths),
                                         "schedule_dir": str(schedule_dir)},
                            "results": rows, "provenance": provenance(command, smoke=smoke)})
    return [out]
