r"""Per-(layer, KV head) budgets from calibration (our variant): diffuse heads get more keys, peaked heads fewer, at
the same K/V read per decode step as the fixed budget, stored with the schedule (`schedule.Schedule.head_budgets`).

**What a head needs.** A dense forward over calibration sequences records, at decode-like rows (every ``stride``-th
query from position ``start``), every layer's attention pooled over the ``G`` query heads of each KV head,
:math:`P^{l,h}_i(j) = \frac{1}{G}\sum_g p^{l,h,g}_{i,j}` (`PooledRows`). Layer ``l``'s KV head ``h`` reads the set
that its source selects: anchor :math:`a = \mathrm{anchor\_of}[l]`, head :math:`h' = \mathrm{head\_map}[l][h]`
(an anchor is its own source). Taking the keys before the query in the order of the source's pooled attention
:math:`P^{a,h'}_i`, the fewest :math:`n^{l,h}_i` of them that, with the query's own key, hold the share ``p`` of
:math:`P^{l,h}_i` give the *need* :math:`r^{l,h}_i = (n^{l,h}_i + 1) / (i + 1)`: the share of the context that
head must read (`row_needs`).

**Multipliers.** The need of a set :math:`(a, h')` is the mean of :math:`r^{l,h}_i` over the rows, the sequences
and the layers ``l`` (not the dense layer 0, which reads every key) whose head ``h`` reads it; its multiplier is
:math:`m_{a,h'} = c\, \bar r_{a,h'} / \mathrm{mean}(\bar r)` (the mean weighted by how many layer heads read each
set), at most :math:`1/\beta` (all keys). ``c`` is the largest scale whose K/V read per decode step at ``context``
tokens (`tradeoff.kv_read_share`, floor and clip included) is at most the fixed budget's under the same schedule
(`scale_to_read`). A set no layer head reads keeps the multiplier 1; a reuse row repeats what it inherits.

`head_budget_schedule` makes the schedule; `run_head_budgets` (``benchmarks/head_budgets.py``) writes
``<model>_<schedule>_hb.json``.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .attention import NEG_INF, gqa_attention, grouped_scores
from .calibrate import check_sequences
from .config import LlamaConfig
from .files import provenance
from .model import Llama
from .progress import tqdm
from .schedule import Schedule
from .tradeoff import kv_read_share

MASS = 0.9
"""Share of a head's pooled attention its keys must hold (the need's ``p``)."""
ROW_START, ROW_STRIDE = 512, 64
"""Decode-like rows: every 64th query from position 512."""


@dataclass(frozen=True)
class PooledRows:
    """Exact dense attention that also records, per layer, the group-pooled attention of the query rows ``rows``
    (a hashable `model.AttentionFn` for a forward from position 0): ``carry`` grows by one ``[batch, kv_heads,
    rows, kv_len]`` float32 array per layer (the mean over the group of each row's softmax)."""

    rows: tuple[int, ...]

    def __call__(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array, *, q_offset: jax.Array,
                 kv_len: jax.Array, carry: Any) -> tuple[jax.Array, Any]:
        out = gqa_attention(q, k, v, causal=True, q_offset=q_offset, kv_len=kv_len)
        rows = jnp.asarray(self.rows)
        s = grouped_scores(q[:, rows], k)                                   # [b, h, g, R, L]
        visible = jnp.arange(k.shape[2])[None, :] <= rows[:, None]           # [R, L]
        p = jax.nn.softmax(jnp.where(visible, s, NEG_INF), axis=-1)
        return out, (carry or ()) + (p.mean(axis=2),)


def row_needs(target: jax.Array, source: jax.Array, rows: jax.Array, mass: float) -> jax.Array:
    """Need of each row: ``target, source: [..., R, L]`` pooled attention of the reading head and of its source set's
    head at query positions ``rows: [R]`` -> ``[..., R]``, ``(n + 1) / (rows + 1)`` with ``n`` the fewest keys
    before the query, in the source's descending order, that with the query's own key hold ``mass`` of the target's
    attention."""
    length = target.shape[-1]
    before = jnp.arange(length)[None, :] < rows[:, None]                  # [R, L]
    order = jnp.argsort(-jnp.where(before, source, -1.0), axis=-1)      # eligible keys first, by source score
    ranked = jnp.take_along_axis(jnp.where(before, target, 0.0), order, axis=-1)
    own = jnp.take_along_axis(target, jnp.broadcast_to(rows[:, None], (*target.shape[:-1], 1)), axis=-1)[..., 0]
    above = jnp.cumsum(ranked, axis=-1) - ranked                        # mass of the ranks above each rank
    short = own[..., None] + above < mass * target.sum(axis=-1)[..., None]
    n = jnp.sum(short & before, axis=-1)                                # rank r < i: one of the i eligible keys
    return (n + 1) / (rows + 1)


@functools.partial(jax.jit, static_argnames=("graphdef", "hook", "source", "mass"))
def _sequence_needs(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, hook: PooledRows,
                    source: tuple[tuple[int, ...], ...], mass: float) -> jax.Array:
    """``[layers, kv_heads]`` mean need over the rows and the batch of ``tokens``; ``source[l][h]`` is the flat
    index ``layer * kv_heads + head`` of the set layer ``l``'s KV head ``h`` reads."""
    _, _, carry = nnx.merge(graphdef, state)(tokens, attention=hook, carry=(), last_only=True)
    pooled = jnp.stack(carry)                                           # [L, b, H, R, N]
    L, b, H, R, N = pooled.shape
    flat = jnp.moveaxis(pooled, 1, 2).reshape(L * H, b, R, N)
    src = flat[jnp.asarray(source).reshape(-1)]
    return row_needs(flat, src, jnp.asarray(hook.rows), mass).mean(axis=(1, 2)).reshape(L, H)


def head_needs(model: Llama, sequences: np.ndarray, schedule: Schedule, *, mass: float = MASS,
               start: int = ROW_START, stride: int = ROW_STRIDE, progress: bool = False) -> np.ndarray:
    """``[layers, kv_heads]``: the need of every layer's KV head (see the module docstring), the mean over the
    decode-like rows ``start, start + stride, ...`` of each of ``sequences: [num, seq_len]`` token ids."""
    seqs = check_sequences(model, sequences)
    if (schedule.num_layers, schedule.num_kv_heads) != (model.cfg.num_layers, model.cfg.num_kv_heads):
        raise ValueError(f"schedule for {schedule.num_layers} layers x {schedule.num_kv_heads} KV heads, model has "
                         f"{model.cfg.num_layers} x {model.cfg.num_kv_heads}")
    if not 0 < mass <= 1 or stride < 1 or not 0 <= start < seqs.shape[1]:
        raise ValueError(f"need 0 < mass <= 1, stride >= 1 and 0 <= start < seq_len={seqs.shape[1]}; got "
                         f"mass={mass}, stride={stride}, start={start}")
    H = schedule.num_kv_heads
    source = tuple(tuple(schedule.anchor_of[layer] * H + schedule.head_map[layer][h] for h in range(H))
                   for layer in range(schedule.num_layers))
    hook = PooledRows(tuple(range(start, seqs.shape[1], stride)))
    graphdef, state = nnx.split(model)
    total = np.zeros((schedule.num_layers, H))
    for row in tqdm(seqs, desc="head needs", unit="seq", disable=not progress):
        total += np.asarray(_sequence_needs(graphdef, state, jnp.asarray(row[None, :]), hook, source, float(mass)))
    return total / len(seqs)


def set_needs(needs: np.ndarray, schedule: Schedule) -> tuple[np.ndarray, np.ndarray]:
    """``(need, readers)``, each ``[layers, kv_heads]``: per set (anchor or dense layer, KV head) the mean need of
    the layer heads that read it (every layer but the dense ones), and how many read it (0: no one; need 0)."""
    need, readers = np.zeros_like(needs, dtype=np.float64), np.zeros(needs.shape, np.int64)
    for layer, kind in enumerate(schedule.layer_types):
        if kind == "dense":
            continue
        for h, src in enumerate(schedule.head_map[layer]):
            need[schedule.anchor_of[layer], src] += needs[layer, h]
            readers[schedule.anchor_of[layer], src] += 1
    return np.divide(need, readers, out=np.zeros_like(need), where=readers > 0), readers


def with_multipliers(schedule: Schedule, sets: np.ndarray, **meta: Any) -> Schedule:
    """``schedule`` with head budgets ``sets: [layers, kv_heads]`` (used on its anchor and dense rows; each reuse
    row inherits through the head map) and ``meta`` merged into its meta."""
    rows = [tuple(float(sets[a][h]) for h in (range(schedule.num_kv_heads) if kind != "reuse" else row))
            for kind, a, row in zip(schedule.layer_types, schedule.anchor_of, schedule.head_map)]
    return dataclasses.replace(schedule, head_budgets=tuple(rows), meta=tuple(sorted({**dict(schedule.meta),
                                                                                          **meta}.items())))


def scale_to_read(schedule: Schedule, shape: np.ndarray, readers: np.ndarray, cfg: LlamaConfig, *,
                  budget: float, context: int, iterations: int = 50) -> np.ndarray:
    """Multipliers ``min(1 / budget, c * shape)`` for the read sets (1 elsewhere), with the largest ``c`` whose K/V
    read per decode step at ``context`` (`tradeoff.kv_read_share`) is at most the fixed ``budget``'s under
    ``schedule``: a bisection on ``c``. ``shape``: ``[layers, kv_heads]`` positive where ``readers > 0``."""
    def read(c: float) -> float:
        sets = np.where(readers > 0, np.minimum(1.0 / budget, c * shape), 1.0)
        return kv_read_share("kascade", context, budget=budget, schedule=with_multipliers(schedule, sets), cfg=cfg,
                             tile=schedule.tile_size, min_keys=schedule.min_keys)

    target = kv_read_share("kascade", context, budget=budget, schedule=schedule, cfg=cfg, tile=schedule.tile_size,
                           min_keys=schedule.min_keys)
    lo, hi = 0.0, 1.0 / (budget * float(shape[readers > 0].min()))       # at hi every read set holds all keys
    for _ in range(iterations):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if read(mid) <= target else (lo, mid)
    return np.where(readers > 0, np.minimum(1.0 / budget, lo * shape), 1.0)


def head_budget_schedule(model: Llama, sequences: np.ndarray, schedule: Schedule, *, mass: float = MASS,
                         context: int = 2048, start: int = ROW_START, stride: int = ROW_STRIDE,
                         progress: bool = False, **meta: Any) -> Schedule:
    """``schedule`` with head budgets from calibration ``sequences`` (the module docstring's rule) at its own
    budget: multipliers proportional to each set's need, averaging the fixed budget's K/V read at ``context``.
    ``meta`` (e.g. provenance, dataset) goes into the schedule's meta with the rule's settings."""
    if schedule.head_budgets is not None:
        raise ValueError(f"schedule {schedule.method!r} already has head budgets")
    needs = head_needs(model, sequences, schedule, mass=mass, start=start, stride=stride, progress=progress)
    need, readers = set_needs(needs, schedule)
    shape = need / np.average(need[readers > 0], weights=readers[readers > 0])
    sets = scale_to_read(schedule, shape, readers, model.cfg, budget=schedule.budget, context=context)
    hb = with_multipliers(schedule, sets)
    info = dict(mass=mass, context=context, rows=f"every {stride}th query from position {start}",
                sequences=int(len(sequences)), needs=[[round(float(x), 5) for x in row] for row in needs],
                kv_read_share=kv_read_share("kascade", context, budget=schedule.budget, schedule=hb, cfg=model.cfg,
                                            tile=schedule.tile_size, min_keys=schedule.min_keys),
                fixed_kv_read_share=kv_read_share("kascade", context, budget=schedule.budget, schedule=schedule,
                                                  cfg=model.cfg, tile=schedule.tile_size,
                                                  min_keys=schedule.min_keys))
    return with_multipliers(schedule, sets, head_budget_rule=dict(info, **meta))


def run_head_budgets(out_dir: Path, command: str, *, smoke: bool, schedules: tuple[str, ...] = ("greedy",),
                     schedule_dir: Path | None = None, mass: float = MASS, seq_len: int = 2048, num_wiki: int = 16,
                     num_prompts: int = 16) -> list[Path]:
    """For each of ``schedules`` (names of ``<model>_<name>.json`` in ``schedule_dir``, default the shipped ones)
    write ``<model>_<name>_hb.json`` into ``out_dir``: head budgets from the schedule choice's calibration set
    (`selection.calibration_set`: the first ``num_wiki`` WikiText-2 validation windows of ``seq_len`` and
    ``num_prompts`` retrieval prompts of the calibration seed). Smoke: a tiny random model of 6 layers, two
    256-token sequences, rows from 64. Returns the paths."""
    from .accuracy import MODEL, kascade_schedules
    from .data import load_tokenizer
    from .models import smollm2_or_tiny
    from .selection import CALIBRATION_SEED, calibration_set

    model = smollm2_or_tiny(smoke, num_layers=6)
    found = kascade_schedules(model, schedule_dir)
    missing = [n for n in schedules if n not in found]
    if smoke and missing:                                               # the smoke model has no calibrated schedule
        found.update({n: next(iter(found.values())) for n in missing})
    elif missing:
        raise FileNotFoundError(f"no schedules {missing} for {MODEL} in {schedule_dir or 'the shipped schedules'}")
    tok = load_tokenizer()
    if smoke:
        seq_len, num_wiki, num_prompts, start, stride = 256, 1, 1, 64, 32
    else:
        start, stride = ROW_START, ROW_STRIDE
    seqs = calibration_set(seq_len, num_wiki, num_prompts, tok)
    dataset = (f"wikitext-2-v1 validation first {num_wiki} x {seq_len} + {num_prompts} retrieval prompts (seed "
               f"{CALIBRATION_SEED})")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in schedules:
        sched = head_budget_schedule(model, seqs, found[name], mass=mass, context=seq_len, start=start,
                                     stride=stride, progress=not smoke, dataset=dataset, from_schedule=name)
        meta = dict(dict(sched.meta), provenance=provenance(command, smoke=smoke))
        path = out_dir / f"{MODEL}_{name}_hb.json"
        dataclasses.replace(sched, meta=tuple(sorted(meta.items()))).save(path)
        paths.append(path)
    return paths
