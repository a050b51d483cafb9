r"""Calibration: how sparse is attention, and how similar are the Top-k sets of different layers?

One dense forward pass per calibration sequence, with an attention hook (`CalibrationHook`) that computes exact
attention *and* records, per layer and KV head, what a Kascade anchor would see:

* the post-softmax attention ``p: [batch, kv_heads, group, q_len, kv_len]`` **pooled** over the ``group`` query
  heads that share a KV head and over the ``tile_size`` queries of a query tile:
  ``P[h, t, j] = sum_{g, i in tile t} p[h, g, i, j]``;
* the pooled mass on the tile's **own** keys (keys ``t*T .. t*T+T-1``; under causality a query tile always reads
  them, so Kascade always keeps them) and the pooled mass on the keys **before** the tile, among which a Top-k is
  chosen: ``k_prev = max(min_keys, ceil(budget * seq_len)) - tile_size`` keys (the tile's own keys count against
  the budget, as in the reference implementation);
* the coverage of the *unpooled* attention: for each query row (every 8th query by default), the share of its mass
  held by its top ``ceil(f * (i + 1))`` keys (``i + 1`` = keys it may read), for ``f`` in `COVERAGE_FRACTIONS`.

From the recorded tiles of every layer we then compute the cross-layer similarity (Kascade §3.2)

.. math:: \mathrm{sim}[a, b, h_b, h_a] = \min_t \frac{\sum_{j \in I^{a,h_a}_t} P^{b,h_b}[t, j] + O^{b,h_b}_t}
          {\sum_{j \in I^{b,h_b}_t} P^{b,h_b}[t, j] + O^{b,h_b}_t}

— the share of layer ``b``'s attention mass that anchor ``a``'s Top-k set ``I^a`` captures, relative to the best
possible set of the same size (``b``'s own Top-k), with ``O`` the own-tile mass; ``min`` over the query tiles of a
sequence, mean over sequences; defined for ``a <= b`` (zero below the diagonal). Layer importance is
``1 - cos(x, x + attn_out)`` with ``x`` the block input, mean over tokens and sequences.

Memory is bounded: one sequence at a time; the per-sequence statistics are small arrays accumulated as running sums.
Given a ``partial`` path, `calibrate` saves those sums (float64) and the number of sequences done there, atomically,
every ``save_every`` sequences; a rerun with the same model, sequences and settings continues from them and gives
bit-identical results. The partial file is deleted once the calibration finishes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file
from .progress import tqdm

from .attention import attention_probs, weighted_values
from .files import atomic_path, provenance, write_json_atomic
from .kascade import topk_count
from .model import Llama

COVERAGE_FRACTIONS: tuple[float, ...] = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5)
"""Shares of keys at which coverage (share of attention mass in the top keys) is measured."""

ARRAY_NAMES = ("similarity", "importance", "coverage", "coverage_fractions", "tile_coverage")


def topk_keys(seq_len: int, tile_size: int, budget: float, min_keys: int = 0) -> int:
    """Keys chosen by Top-k among those *before* a query tile, by the inference rule `kascade.topk_count`:
    ``keys_kept(seq_len)`` keys in all, the ``tile_size`` own keys among them, at most ``seq_len - tile_size``."""
    if not 0 < budget <= 1:
        raise ValueError(f"budget={budget} must be a fraction in (0, 1]")
    if tile_size <= 0 or seq_len % tile_size:
        raise ValueError(f"seq_len={seq_len} must be a positive multiple of tile_size={tile_size}")
    return int(min(topk_count(seq_len, tile_size, budget=float(budget), min_keys=min_keys), seq_len - tile_size))


# ------------------------------------------------------------------------------------------------ the hook
def pool_tiles(p: jax.Array, tile_size: int) -> tuple[jax.Array, jax.Array]:
    """Pool ``p: [batch, kv_heads, group, q_len, kv_len]`` over the group and over query tiles.

    Returns ``(prev [batch, kv_heads, tiles, kv_len], own [batch, kv_heads, tiles])``: the pooled mass on keys before
    each tile (zero elsewhere) and the pooled mass on the tile's own keys. Assumes the queries start at position 0."""
    b, h, _, q_len, kv_len = p.shape
    tiles = q_len // tile_size
    pooled = p.sum(axis=2).reshape(b, h, tiles, tile_size, kv_len).sum(axis=3)  # [b, h, tiles, kv_len]
    key_tile = jnp.arange(kv_len) // tile_size                                    # tile of each key
    tile = jnp.arange(tiles)[:, None]
    prev = jnp.where(key_tile[None, :] < tile, pooled, 0.0)
    own = jnp.where(key_tile[None, :] == tile, pooled, 0.0).sum(-1)
    return prev, own


def topk_mask(prev: jax.Array, k: int) -> jax.Array:
    """Float 0/1 mask ``[..., kv_len]`` of the ``k`` largest entries of ``prev`` along the last axis."""
    if k == 0:
        return jnp.zeros_like(prev)
    _, idx = jax.lax.top_k(prev, k)                                                # [..., k]
    return jnp.put_along_axis(jnp.zeros_like(prev), idx, 1.0, axis=-1, inplace=False)


def query_coverage(p: jax.Array, fractions: tuple[float, ...], stride: int = 1, q_offset: int = 0) -> jax.Array:
    """Share of a query row's mass in its top ``ceil(f * (i + 1))`` keys, mean over batch, group and queries.

    p: ``[batch, kv_heads, group, q_len, kv_len]``, query row ``r`` at position ``i = q_offset + r`` (it may read
    ``i + 1`` keys). Only every ``stride``-th query (rows ``stride - 1, 2 * stride - 1, ...``) is measured: sorting
    every row dominates the cost otherwise. Returns ``[kv_heads, len(fractions)]``."""
    rows = jnp.arange(stride - 1, p.shape[3], stride)
    cum = jnp.cumsum(-jnp.sort(-p[:, :, :, rows], axis=-1), axis=-1)             # descending, cumulative
    visible = q_offset + rows[:, None] + 1                                       # keys row r may read
    k = jnp.ceil(jnp.asarray(fractions)[None, :] * visible).astype(jnp.int32)    # [rows, F]
    cov = jnp.take_along_axis(cum, jnp.broadcast_to(k - 1, cum.shape[:3] + k.shape), axis=-1)
    return cov.mean(axis=(0, 2, 3))


@dataclass(frozen=True)
class CalibrationHook:
    """Dense attention that also records what an anchor would see (a hashable `model.AttentionFn`).

    ``carry`` grows by one dict per layer: ``prev [b, h, tiles, kv_len]``, ``own [b, h, tiles]``,
    ``mask [b, h, tiles, kv_len]`` (the Top-``k_prev`` keys before each tile) and ``coverage [h, F]``."""

    tile_size: int = 32
    k_prev: int = 20
    fractions: tuple[float, ...] = COVERAGE_FRACTIONS
    coverage_stride: int = 8

    def __call__(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array, *, q_offset: jax.Array,
                 kv_len: jax.Array, carry: Any) -> tuple[jax.Array, Any]:
        p = attention_probs(q, k, causal=True, q_offset=q_offset, kv_len=kv_len)
        out = weighted_values(p, v, q.dtype)  # exact attention from the probabilities already at hand
        prev, own = pool_tiles(p, self.tile_size)
        stats = dict(prev=prev, own=own, mask=topk_mask(prev, self.k_prev),
                     coverage=query_coverage(p, self.fractions, self.coverage_stride))
        return out, (carry or ()) + (stats,)


# ------------------------------------------------------------------------------------------------ per-sequence stats
def cross_layer_similarity(prev: jax.Array, own: jax.Array, mask: jax.Array) -> jax.Array:
    """Similarity ``[layers_a, layers_b, heads_b, heads_a]`` summed over the batch (min over tiles per sequence).

    prev, mask: ``[layers, batch, heads, tiles, kv_len]``; own: ``[layers, batch, heads, tiles]``. Zero for a > b."""
    captured = jnp.einsum("bzhtn,azgtn->abzhgt", prev, mask)                      # b's mass on a's Top-k
    best = (prev * mask).sum(-1) + own                                              # b's own Top-k + own tile
    ratio = (captured + own[None, :, :, :, None, :]) / jnp.maximum(best, 1e-30)[None, :, :, :, None, :]
    sim = ratio.min(axis=-1).sum(axis=2)                                            # min over tiles, sum batch
    layers = prev.shape[0]
    upper = jnp.arange(layers)[:, None] <= jnp.arange(layers)[None, :]
    return jnp.where(upper[:, :, None, None], sim, 0.0)


def layer_importance(residual: list[jax.Array], attn_out: list[jax.Array]) -> jax.Array:
    """``1 - cos(x, x + attn_out)`` per layer, mean over tokens, summed over the batch: ``[layers]``.

    residual, attn_out: per layer ``[batch, seq, hidden]``."""
    x = jnp.stack(residual).astype(jnp.float32)
    y = x + jnp.stack(attn_out).astype(jnp.float32)
    cos = (x * y).sum(-1) / jnp.maximum(jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(y, axis=-1), 1e-30)
    return (1.0 - cos).mean(axis=2).sum(axis=1)


def sequence_stats(model: Llama, tokens: jax.Array, hook: CalibrationHook) -> dict[str, jax.Array]:
    """Statistics of ``tokens: [batch, seq]`` (sums over the batch, so they can be accumulated):
    ``similarity [L, L, H, H]``, ``importance [L]``, ``coverage [L, H, F]``, ``tile_coverage [L, H]``."""
    return _sequence_stats(*nnx.split(model), tokens, hook)


@functools.partial(jax.jit, static_argnames=("graphdef", "hook"))
def _sequence_stats(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array,
                    hook: CalibrationHook) -> dict[str, jax.Array]:
    """`sequence_stats` on a model split by ``nnx.split`` (the jit style of `model.forward_split`)."""
    _, _, aux = nnx.merge(graphdef, state)(tokens, attention=hook, carry=(), collect=True)
    layers = aux["carry"]
    prev, own, mask = (jnp.stack([s[name] for s in layers]) for name in ("prev", "own", "mask"))
    kept = ((prev * mask).sum(-1) + own) / (prev.sum(-1) + own)                     # [L, batch, H, tiles]
    return dict(
        similarity=cross_layer_similarity(prev, own, mask),
        importance=layer_importance(aux["residual"], aux["attn_out"]),
        coverage=jnp.stack([s["coverage"] for s in layers]) * tokens.shape[0],
        tile_coverage=kept.mean(axis=-1).sum(axis=1),
    )


# ------------------------------------------------------------------------------------------------ results
@dataclass(frozen=True, eq=False)
class Calibration:
    """Averaged calibration statistics of one model (L layers, H KV heads, F coverage fractions).

    similarity ``[L, L, H, H]`` (``[a, b, h_b, h_a]``, zero for a > b), importance ``[L]``, coverage ``[L, H, F]``,
    coverage_fractions ``[F]``, tile_coverage ``[L, H]`` (share of pooled tile mass kept by the tile's own Top-k
    set). ``settings`` holds model, sequences, seq_len, tile_size, budget, min_keys, k_prev, dataset."""

    similarity: np.ndarray
    importance: np.ndarray
    coverage: np.ndarray
    coverage_fractions: np.ndarray
    tile_coverage: np.ndarray
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def num_layers(self) -> int:
        return int(self.importance.shape[0])

    @property
    def num_kv_heads(self) -> int:
        return int(self.tile_coverage.shape[1])

    def validate(self, source: str = "calibration") -> None:
        """Raise ``ValueError`` naming the array whose shape disagrees with the others."""
        for name, ndim in (("importance", 1), ("tile_coverage", 2), ("coverage_fractions", 1)):
            if np.ndim(getattr(self, name)) != ndim:
                raise ValueError(f"{source}: array {name!r} must have {ndim} dimension(s), "
                                 f"got shape {np.shape(getattr(self, name))}")
        L, H, F = self.importance.shape[0], self.tile_coverage.shape[-1], self.coverage_fractions.shape[0]
        expected = dict(similarity=(L, L, H, H), importance=(L,), coverage=(L, H, F), coverage_fractions=(F,),
                        tile_coverage=(L, H))
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"{source}: array {name!r} has shape {tuple(getattr(self, name).shape)}, "
                                 f"expected {shape} (layers={L}, kv_heads={H}, fractions={F})")

    def layer_similarity(self) -> np.ndarray:
        """``[L, L]``: for anchor a and layer b, the mean over b's heads of the best-matching anchor head's
        similarity (head-aware reuse with remapping)."""
        return self.similarity.max(axis=-1).mean(axis=-1)

    def head_map(self, anchor: int, layer: int) -> list[int]:
        """For each KV head of ``layer``, the head of ``anchor`` whose Top-k captures most of its mass."""
        return [int(h) for h in self.similarity[anchor, layer].argmax(axis=-1)]

    def summary(self) -> dict[str, Any]:
        """Headline numbers: mean coverage per fraction, per-layer coverage, the adjacent-layer and all-pairs
        similarity distribution (a < b, head-remapped), and importance."""
        sim = self.layer_similarity()
        a, b = np.triu_indices(self.num_layers, k=1)
        pairs, adjacent = sim[a, b], np.diag(sim, k=1)
        quantiles = lambda x: {q: float(np.quantile(x, float(q))) for q in ("0.0", "0.1", "0.5", "0.9", "1.0")}
        return {
            "coverage_mean": {f"{f:g}": float(c) for f, c in zip(self.coverage_fractions,
                                                                    self.coverage.mean(axis=(0, 1)))},
            "coverage_per_layer": {f"{f:g}": [round(float(c), 4) for c in self.coverage[:, :, i].mean(-1)]
                                   for i, f in enumerate(self.coverage_fractions)},
            "tile_coverage_mean": float(self.tile_coverage.mean()),
            "similarity_adjacent": [round(float(s), 4) for s in adjacent],
            "similarity_adjacent_quantiles": quantiles(adjacent),
            "similarity_pairs_quantiles": quantiles(pairs),
            "similarity_pairs_share_0.6_to_0.9": float(np.mean((pairs >= 0.6) & (pairs <= 0.9))),
            "importance": [round(float(x), 5) for x in self.importance],
        }

    # -------------------------------------------------------------------------------------------- files
    def save(self, stem: str | Path, *, command: str, smoke: bool) -> tuple[Path, Path]:
        """Write ``<stem>.safetensors`` (the arrays) and ``<stem>.json`` (settings, summary, provenance; ``smoke``:
        a smoke-size run, which the book refuses to show)."""
        stem = Path(stem)
        arrays = {name: np.ascontiguousarray(getattr(self, name), dtype=np.float32) for name in ARRAY_NAMES}
        tensors_path, json_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
        with atomic_path(tensors_path) as tmp:
            save_file(arrays, str(tmp), metadata={"settings": json.dumps(self.settings, sort_keys=True)})
        write_json_atomic(json_path, {"settings": self.settings, "arrays": tensors_path.name,
                                      "summary": self.summary(), "provenance": provenance(command, smoke=smoke)})
        return tensors_path, json_path

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        """Read ``<stem>.safetensors`` (and settings from ``<stem>.json`` beside it); shapes are validated."""
        path = Path(path)
        tensors_path = path.with_suffix(".safetensors")
        try:
            arrays = load_file(str(tensors_path))
        except Exception as e:  # OSError, or safetensors' own error for a corrupt file
            raise ValueError(f"{tensors_path}: cannot read calibration arrays ({e})") from e
        missing = sorted(set(ARRAY_NAMES) - set(arrays))
        if missing:
            raise ValueError(f"{tensors_path}: missing arrays {missing}")
        json_path = path.with_suffix(".json")
        settings = json.loads(json_path.read_text())["settings"] if json_path.is_file() else {}
        cal = cls.__new__(cls)
        object.__setattr__(cal, "settings", settings)
        for name in ARRAY_NAMES:
            object.__setattr__(cal, name, arrays[name])
        cal.validate(str(tensors_path))
        return cal


def check_sequences(model: Llama, sequences: Iterable[np.ndarray] | np.ndarray) -> np.ndarray:
    """``sequences`` as ``[num, seq_len]`` int32 token ids, or ``ValueError`` naming what is wrong: not 2-D, empty,
    ids outside ``[0, vocab_size)`` (JAX would silently clamp them), or longer than ``max_position_embeddings``."""
    seqs = np.asarray(sequences)
    if seqs.ndim != 2 or seqs.shape[0] == 0 or seqs.shape[1] == 0:
        raise ValueError(f"sequences must be [num, seq_len] token ids with num, seq_len > 0, got shape {seqs.shape}")
    if not np.issubdtype(seqs.dtype, np.integer):
        raise ValueError(f"sequences must be integer token ids, got dtype {seqs.dtype}")
    vocab, max_pos = model.cfg.vocab_size, model.cfg.max_position_embeddings
    if seqs.min() < 0 or seqs.max() >= vocab:
        raise ValueError(f"sequences hold token ids in [{seqs.min()}, {seqs.max()}], outside the model's vocabulary "
                         f"[0, {vocab})")
    if seqs.shape[1] > max_pos:
        raise ValueError(f"seq_len={seqs.shape[1]} exceeds the model's max_position_embeddings={max_pos}")
    return seqs.astype(np.int32)


def _fingerprint(model: Llama, seqs: np.ndarray, hook: CalibrationHook, settings: dict[str, Any]) -> str:
    """What a partial calibration must match to be resumed: model config and name, settings, the token ids."""
    h = hashlib.sha256(json.dumps([model.cfg.to_dict(), settings, list(hook.fractions), hook.k_prev],
                                  sort_keys=True).encode())
    h.update(np.ascontiguousarray(seqs).tobytes())
    return h.hexdigest()


def _load_partial(path: Path | None, fingerprint: str) -> tuple[dict[str, np.ndarray], int]:
    """Running sums and sequences done from a partial file of the same run; nothing if absent or of another run."""
    if path is None or not path.is_file():
        return {}, 0
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            if meta.get("fingerprint") != fingerprint:
                return {}, 0
            return {name: f.get_tensor(name) for name in f.keys()}, int(meta["done"])
    except Exception as e:  # a damaged partial file is not worth failing for: say so and start afresh
        print(f"calibrate: ignoring unreadable partial file {path} ({e})", file=sys.stderr)
        return {}, 0


def _save_partial(path: Path, sums: dict[str, np.ndarray], done: int, fingerprint: str) -> None:
    with atomic_path(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in sums.items()}, str(tmp),
                  metadata={"fingerprint": fingerprint, "done": str(done)})


def calibrate(model: Llama, sequences: Iterable[np.ndarray] | np.ndarray, *, tile_size: int = 32,
              budget: float = 0.1, min_keys: int = 0, fractions: tuple[float, ...] = COVERAGE_FRACTIONS,
              model_name: str = "model", dataset: str = "", progress: bool = True,
              partial: str | Path | None = None, save_every: int = 10, coverage_stride: int = 8) -> Calibration:
    """Run the calibration pass over ``sequences: [num, seq_len]`` token ids, one sequence at a time.

    ``seq_len`` must be a multiple of ``tile_size``. Coverage is measured on every ``coverage_stride``-th query (the
    row sort dominates the cost at long sequences). Returns the statistics averaged over sequences. With
    ``partial`` (a ``.safetensors`` path) the running sums are saved there every ``save_every`` sequences and an
    interrupted run of the same model, sequences and settings resumes from them (see the module docstring)."""
    seqs = check_sequences(model, sequences)
    num, seq_len = seqs.shape
    if save_every < 1:
        raise ValueError(f"save_every={save_every} must be >= 1")
    hook = CalibrationHook(tile_size=tile_size, k_prev=topk_keys(seq_len, tile_size, budget, min_keys),
                           fractions=tuple(float(f) for f in fractions), coverage_stride=coverage_stride)
    settings = dict(model=model_name, num_sequences=int(num), seq_len=int(seq_len), tile_size=tile_size,
                    budget=budget, min_keys=min_keys, k_prev=hook.k_prev, dataset=dataset)
    if coverage_stride != 8:
        settings["coverage_stride"] = coverage_stride
    partial = Path(partial) if partial is not None else None
    fingerprint = _fingerprint(model, seqs, hook, settings)
    sums, done = _load_partial(partial, fingerprint)
    for row in tqdm(seqs[done:], desc=f"calibrating {model_name}", unit="seq", disable=not progress,
                    initial=done, total=num):
        stats = sequence_stats(model, jnp.asarray(row[None, :]), hook)
        for name, value in stats.items():
            sums[name] = sums.get(name, 0.0) + np.asarray(value, dtype=np.float64)
        done += 1
        if partial is not None and done % save_every == 0 and done < num:
            _save_partial(partial, sums, done, fingerprint)
    mean = {name: (value / num).astype(np.float32) for name, value in sums.items()}
    if partial is not None:
        partial.unlink(missing_ok=True)
    return Calibration(coverage_fractions=np.asarray(fractions, np.float32), settings=settings, **mean)


# ------------------------------------------------------------------------------------------------ a calibration run
@dataclass(frozen=True)
class CalibrationSettings:
    """Sizes of a calibration run: the book's (`full`, the defaults) or `smoke` (seconds).

    The smoke size is chosen so that the budget really drops keys: 256-token windows with 16-token tiles give
    ``k_prev = ceil(0.1 * 256) - 16 = 10`` keys chosen by Top-k (128-token windows of 32 would give 0)."""

    num_sequences: int = 100
    seq_len: int = 512
    tile_size: int = 32
    budget: float = 0.1
    min_keys: int = 0

    @classmethod
    def smoke(cls) -> "CalibrationSettings":
        return cls(num_sequences=2, seq_len=256, tile_size=16)


def run_calibration(model: Llama, root: str | Path, settings: CalibrationSettings, *, model_name: str,
                    tokenizer=None, smoke: bool, command: str, coverage: bool = False) -> list[Path]:
    """Calibrate ``model`` on WikiText-2 validation windows (resuming an interrupted run) and write
    ``ROOT/data/calibration/<model_name>.{safetensors,json}`` and, with ``coverage``, ``ROOT/data/coverage.json``
    (chapter 05). ``tokenizer``: the model's (default SmolLM2's). Returns the written paths."""
    from .data import wikitext_windows

    data = Path(root) / "data"
    windows = wikitext_windows("validation", settings.seq_len, settings.num_sequences, tokenizer=tokenizer)
    cal = calibrate(model, windows, tile_size=settings.tile_size, budget=settings.budget,
                    min_keys=settings.min_keys, model_name=model_name,
                    dataset=f"wikitext-2-v1 validation, {settings.num_sequences} x {settings.seq_len} tokens",
                    partial=partial_path(data / "calibration", model_name))
    paths = list(cal.save(data / "calibration" / model_name, command=command, smoke=smoke))
    if coverage:
        write_coverage_json(cal, data / "coverage.json", command, smoke=smoke)
        paths.append(data / "coverage.json")
    return paths


def partial_path(out_dir: str | Path, model_name: str) -> Path:
    """Where an unfinished calibration of ``model_name`` keeps its running sums: ``<out_dir>/<model>.partial.safetensors``."""
    return Path(out_dir) / f"{model_name}.partial.safetensors"


def write_coverage_json(cal: Calibration, path: str | Path, command: str, *, smoke: bool) -> None:
    """``data/coverage.json``: per-layer coverage (mean over KV heads) at each key fraction, with provenance."""
    write_json_atomic(path, {
        "model": cal.settings.get("model"), "settings": cal.settings,
        "fractions": [float(f) for f in cal.coverage_fractions],
        "coverage_per_layer": [[round(float(c), 5) for c in row] for row in cal.coverage.mean(axis=1)],
        "coverage_mean": cal.summary()["coverage_mean"], "provenance": provenance(command, smoke=smoke)})
