"""Shared plotting helpers: one visual style, one function per book figure, tables, atomic figure files.

Notebooks call `set_style()` once, then one function per figure (``rope_wavelengths``, ``kv_cache_bars``,
``speedup_vs_context``, ...) that draws it from the shipped JSON in ``data/`` or from arrays the chapter computed and
returns the `Figure`; `save_figure(fig, "NN_name")` writes it (atomically) to ``$KASCADE_FIGURES_DIR`` when that is
set (see `figures_dir`; otherwise nothing is written) and the notebook still shows it inline. The style is sized
for the book's content column: figures are at most ``BOOK_WIDTH_IN`` inches wide at 100 dpi (~700 px), so they are
shown at their natural size and 10-12 pt text stays 10-12 pt on the page. `table` turns rows into a styled HTML
table (no index column, fixed number formats, blanks for missing cells).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.colors import LogNorm
from matplotlib.lines import Line2D
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch
from matplotlib.ticker import FixedLocator, NullLocator, PercentFormatter

from .files import atomic_path

FIGURES_ENV = "KASCADE_FIGURES_DIR"
"""Environment variable naming the folder chapter figures go to (``kascade-lite figures --out ROOT`` sets it)."""
BOOK_WIDTH_IN = 7.0  # inches at figure.dpi 100: ~700 px, the width of the book's content column
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def set_style() -> None:
    """Seaborn ``whitegrid`` with font sizes for ~700 px wide figures (the book's column, and a Colab cell)."""
    sns.set_theme(style="whitegrid", context="notebook", palette="colorblind")
    matplotlib.rcParams.update({
        "figure.figsize": (BOOK_WIDTH_IN, 4.0),
        "figure.dpi": 100,
        "savefig.dpi": 150,
        "savefig.bbox": "tight",
        "font.size": 11,
        "axes.titlesize": 12,
        "axes.labelsize": 11,
        "legend.fontsize": 10,
        "legend.title_fontsize": 10,
        "xtick.labelsize": 10,
        "ytick.labelsize": 10,
        "figure.titlesize": 13,
    })


def figures_dir() -> Path | None:
    """Where chapter figures go: ``$KASCADE_FIGURES_DIR`` if set, else None (the figure is only shown).

    Only a caller that means to write figures sets it: ``kascade-lite figures --out ROOT`` (``ROOT/book/figures``,
    the committed full-size figures with ``--out .``) and ``book/build.py`` (its own output folder, so building the
    book never modifies a tracked file). Never a default inside the checkout or the package's own location: a
    chapter opened in Jupyter, run on Colab or in the tests writes nothing."""
    return Path(os.environ[FIGURES_ENV]) if os.environ.get(FIGURES_ENV) else None


def save_figure(fig: plt.Figure, name: str, directory: str | Path | None = None) -> Path | None:
    """Write ``fig`` to ``<directory or figures_dir()>/<name>.png`` atomically and return the path; return None
    (writing nothing) when there is no figure folder (see `figures_dir`).

    ``name`` is a bare file stem such as ``"01_rope_wavelengths"`` (letters, digits, ``_ . -``; no folders).
    """
    if not _NAME.match(name) or name.endswith(".png"):
        raise ValueError(f"save_figure: name must be a bare file stem like '01_rope_wavelengths', got {name!r}")
    folder = Path(directory) if directory is not None else figures_dir()
    if folder is None:
        return None
    path = folder / f"{name}.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


# --------------------------------------------------------------------------------------------------------------------
# Tables


def _format_cell(value: Any, fmt: str | Callable[[Any], str] | None) -> str:
    """One table cell as text: ``fmt`` (a format spec such as ``"{:.2f}"`` or a callable) or a default that prints
    ints with thousands separators, floats with 3 significant digits, booleans as yes/no and missing values blank."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    if callable(fmt):
        return fmt(value)
    if fmt is not None:
        return fmt.format(value)
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.3g}" if abs(value) < 1e6 else f"{float(value):,.0f}"
    return str(value)


def table(rows: Sequence[Mapping[str, Any]] | pd.DataFrame, columns: Sequence[str] | Mapping[str, str] | None = None,
          formats: Mapping[str, str | Callable[[Any], str]] | None = None, *, caption: str | None = None):
    """Rows as an HTML table for the book: a pandas ``Styler`` without the 0..N index column.

    ``rows``: a list of dicts (or a DataFrame; its index is dropped, ``reset_index()`` first to keep it).
    ``columns``: the keys to show, in order, or ``{key: header}`` to rename them (default: every key of the first
    row). ``formats``: ``{key or header: "{:.2f}" | callable}``; other cells get `_format_cell`'s defaults (3
    significant digits, thousands separators, yes/no, "–" for a missing value), so no float noise or ``NaN``
    reaches the page. Cells are formatted to strings here, so the table looks the same in any notebook front end.
    """
    frame = rows.reset_index(drop=True) if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    if columns is None:
        columns = list(frame.columns)
    headers = dict(columns) if isinstance(columns, Mapping) else {c: c for c in columns}
    missing = [c for c in headers if c not in frame.columns]
    if missing:
        raise KeyError(f"table: no column {missing} in rows with columns {list(frame.columns)}")
    formats = dict(formats or {})
    cells = {header: [_format_cell(v, formats.get(key, formats.get(header))) for v in frame[key]]
             for key, header in headers.items()}
    styler = pd.DataFrame(cells, columns=list(headers.values())).style.hide(axis="index")
    styler = styler.set_table_attributes('class="kascade-table"')
    numeric = [h for k, h in headers.items() if pd.api.types.is_numeric_dtype(frame[k])
               and not pd.api.types.is_bool_dtype(frame[k])]
    if numeric:
        styler = styler.set_properties(subset=numeric, **{"text-align": "right"})
    if caption:
        styler = styler.set_caption(caption)
    return styler


# --------------------------------------------------------------------------------------------------------------------
# Chapter 01: RoPE


def rope_toeplitz(scores: np.ndarray) -> plt.Figure:
    """Scores ``<RoPE(q, m), RoPE(k, n)>`` over a grid of positions (``[m, n]``): constant along diagonals."""
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    im = ax.imshow(np.asarray(scores), cmap="RdBu_r")
    ax.set(xlabel="key position n", ylabel="query position m", title="⟨RoPE(q, m), RoPE(k, n)⟩")
    ax.grid(False)
    fig.colorbar(im, ax=ax)
    return fig


def rope_wavelengths(wavelengths_by_theta: Mapping[float, np.ndarray], context: int = 8192) -> plt.Figure:
    """Wavelength of each dimension pair (log scale) for several RoPE bases θ, with a line at ``context`` tokens."""
    fig, ax = plt.subplots()
    for theta, wl in wavelengths_by_theta.items():
        ax.semilogy(np.arange(len(wl)), wl, label=f"θ = {theta:,.0f}")
    ax.axhline(context, color="gray", ls="--", lw=1)
    ax.annotate(f"{context} tokens", (0, context), xytext=(4, 4), textcoords="offset points", color="gray")
    ax.set(xlabel="dimension pair i", ylabel="wavelength 2π/ω_i (tokens)",
           title=f"RoPE wavelengths, head_dim = {2 * len(next(iter(wavelengths_by_theta.values())))}")
    ax.legend(loc="lower right")
    return fig


def rope_scaling(base: np.ndarray, scaled: np.ndarray, band: tuple[float, float]) -> plt.Figure:
    """Wavelengths before and after Llama-3.1 scaling; ``band`` = (high, low) wavelength bounds of interpolation."""
    fig, ax = plt.subplots()
    pairs = np.arange(len(base))
    ax.semilogy(pairs, base, label="unscaled (θ = 500 000)")
    ax.semilogy(pairs, scaled, "--", label="Llama-3.1 scaled (factor 8)")
    ax.axhspan(*band, color="orange", alpha=0.15, label=f"interpolated band ({band[0]:.0f} – {band[1]:.0f} tokens)")
    ax.set(xlabel="dimension pair i", ylabel="wavelength (tokens)", title="Llama-3.1 RoPE scaling")
    ax.legend(loc="upper left")
    return fig


# --------------------------------------------------------------------------------------------------------------------
# Chapter 02: GQA


def gqa_masks(masks: Mapping[str, np.ndarray]) -> plt.Figure:
    """Causal masks side by side (``{title: [q, kv] bool}``), one tick per query and key slot."""
    masks = {t: np.asarray(m) for t, m in masks.items()}
    fig, axes = plt.subplots(1, len(masks), figsize=(BOOK_WIDTH_IN, 2.9), squeeze=False,
                             gridspec_kw={"width_ratios": [m.shape[1] for m in masks.values()]})
    for ax, (title, mask) in zip(axes[0], masks.items()):
        ax.imshow(mask, cmap="Blues", vmin=0, vmax=1.3, aspect="equal")
        ax.set_title(title, fontsize=9.5)
        ax.set_xlabel("key slot j", fontsize=10)
        ax.set_xticks(range(mask.shape[1]), [str(j) if j % 2 == 0 else "" for j in range(mask.shape[1])],
                      fontsize=8.5)
        ax.set_yticks(range(mask.shape[0]), range(mask.shape[0]), fontsize=8.5)
        ax.grid(False)
    axes[0][0].set_ylabel("query i", fontsize=10)
    fig.tight_layout()
    return fig


def kv_cache_bars(contexts: Sequence[int], grouped_gib: Sequence[float], expanded_gib: Sequence[float],
                  card_gib: float, card_label: str = "80 GB accelerator") -> plt.Figure:
    """KV-cache size per context length, grouped vs expanded heads, against one accelerator's memory."""
    fig, ax = plt.subplots()
    xs = np.arange(len(contexts))
    ax.bar(xs - 0.2, grouped_gib, width=0.4, label="GQA (8 KV heads)")
    ax.bar(xs + 0.2, expanded_gib, width=0.4, label="expanded to 32 heads")
    ax.axhline(card_gib, color="gray", ls="--", lw=1)
    # the label sits above its line, clear of it and of the bars (which stop below the top of the axes)
    ax.annotate(f"{card_label} ({card_gib:.1f} GiB)", (0, card_gib), xycoords=("axes fraction", "data"),
                xytext=(4, 3), textcoords="offset points", color="gray", va="bottom")
    ax.set_xticks(xs, [f"{c // 1024}k" for c in contexts])
    ax.set(xlabel="context length", ylabel="KV cache (GiB, batch 1, bf16)", title="Llama-3.1-8B KV cache")
    ax.set_ylim(0, card_gib * 1.2)
    ax.legend(loc="upper left", bbox_to_anchor=(0, 0.8))
    return fig


# --------------------------------------------------------------------------------------------------------------------
# Chapter 03: conversion


def convert_rss(bench: Mapping[str, Any]) -> plt.Figure:
    """Resident memory over time while converting the 8B checkpoint, from ``data/bench_convert.json``."""
    big = next(r for r in bench["runs"] if r["name"].startswith("llama-3.1-8b"))
    t, rss = np.asarray(big["rss_timeline_mb"], dtype=float).T
    fig, ax = plt.subplots(figsize=(BOOK_WIDTH_IN, 3.6))
    ax.plot(t, rss / 1024, label=f"converting {big['source_bytes'] / 1e9:.1f} GB")
    target = bench["target_peak_rss_mb"]
    ax.axhline(target / 1024, color="C3", ls="--", label=f"target: {target} MB")
    ax.axhline(big["source_bytes"] / 2**30, color="C7", ls=":", label="the whole checkpoint in memory")
    ax.set(xlabel="seconds", ylabel="resident memory (GiB)", title="Streaming conversion: resident memory")
    ax.legend(loc="center right")
    return fig


# --------------------------------------------------------------------------------------------------------------------
# Chapter 05: sparsity


def attention_heatmaps(maps: np.ndarray, layers: Sequence[int]) -> plt.Figure:
    """One post-softmax attention map per layer (``maps: [len(layers), q, kv]``, e.g. from `analysis.attention_maps`)
    on a log colour scale."""
    maps = np.asarray(maps)
    n = maps.shape[-1]
    fig, axes = plt.subplots(1, len(layers), figsize=(BOOK_WIDTH_IN, 3.3), squeeze=False,
                             layout="constrained")
    ticks = np.arange(0, n + 1, max(n // 4, 1))
    for ax, layer, m in zip(axes[0], layers, maps):
        im = ax.imshow(np.where(m > 0, m, np.nan), norm=LogNorm(vmin=1e-4, vmax=1), cmap="rocket_r",
                       interpolation="nearest")
        ax.set(title=f"layer {layer}, query head 0", xlabel="key position", xticks=ticks, yticks=ticks)
        ax.grid(False)
    axes[0][0].set_ylabel("query position")
    fig.colorbar(im, ax=axes[0].tolist(), label="weight", shrink=0.9)
    return fig


def coverage_curves(fractions: np.ndarray, per_layer: np.ndarray) -> plt.Figure:
    """Coverage (% of attention mass) against % of keys kept, one line per layer plus the mean."""
    fractions, per_layer = np.asarray(fractions), np.asarray(per_layer)
    fig, ax = plt.subplots(figsize=(BOOK_WIDTH_IN, 4.2))
    colors = plt.cm.viridis(np.linspace(0, 1, len(per_layer)))
    for layer, curve in enumerate(per_layer):
        ax.plot(100 * fractions, 100 * curve, color=colors[layer], marker=".", lw=1.2)
    ax.plot(100 * fractions, 100 * per_layer.mean(0), color="black", lw=2.5, ls="--", label="mean over layers")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(100 * fractions))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{100 * f:g}" for f in fractions])
    ax.set(xlabel="% of keys kept (top by weight)", ylabel="% of attention mass",
           title="Coverage per layer (layer 0 purple … last yellow)")
    ax.axhline(95, color="grey", lw=0.8)
    ax.legend(loc="lower right")
    return fig


def coverage_heatmaps(per_row: np.ndarray, pooled: np.ndarray, fraction: float, k_prev: int) -> plt.Figure:
    """Per layer and KV head: per-row coverage at ``fraction`` of the keys, next to Kascade's pooled tile set."""
    layers, heads = np.asarray(per_row).shape
    fig, axes = plt.subplots(1, 2, figsize=(BOOK_WIDTH_IN, max(4.0, 0.24 * layers + 1.2)), layout="constrained")
    heat = dict(annot=True, fmt=".0f", cmap="mako", vmin=0, vmax=100, annot_kws=dict(fontsize=9), cbar=False,
                yticklabels=[str(i) if i % 2 == 0 else "" for i in range(layers)])
    sns.heatmap(100 * np.asarray(per_row), ax=axes[0], **heat)
    axes[0].set(title=f"per query row:\ntop {fraction:.0%} of keys", xlabel="KV head", ylabel="layer")
    sns.heatmap(100 * np.asarray(pooled), ax=axes[1], **heat)
    axes[1].set(title=f"Kascade's pooled set:\nown tile + {k_prev} keys", xlabel="KV head", ylabel="")
    fig.colorbar(axes[1].collections[0], ax=axes.tolist(), label="% of attention mass", shrink=0.6)
    for ax in axes:
        ax.tick_params(axis="y", labelrotation=0)
    return fig


# --------------------------------------------------------------------------------------------------------------------
# Chapter 08: speedups

DENSE_BASELINES = ("dense", "flash", "xla")
COUNTER_EXAMPLES = ("dense_seq", "reuse_masked")  # not baselines: what the layout costs, what a mask saves
GRANULARITY_STYLE = {"position": "o-", "tile": "s--"}


def _context_label(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens >= 1024 else str(tokens)


def _context_axis(ax: plt.Axes, contexts: list[int]) -> None:
    """A speedup-vs-context axis: log2 x with one labelled tick per measured context, and the 1x line."""
    ax.axhline(1, color="gray", lw=1)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(contexts))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([_context_label(c) for c in contexts])
    ax.set(xlabel="context (tokens)")


def speedup_vs_context(att: Mapping[str, Any]) -> plt.Figure:
    """Whole-model attention speed-up over the fastest dense baseline against context, decode and prefill, one line
    per Kascade setting (key positions solid, key tiles dashed; one colour per budget), from
    ``data/bench_attention_cpu.json`` (``speedup.vs_best[setting].whole_model``)."""
    fig, axes = plt.subplots(1, 2, figsize=(BOOK_WIDTH_IN, 3.8), sharey=True)
    for ax, phase in zip(axes, ("decode", "prefill")):
        rows = sorted((r for r in att["results"] if r["phase"] == phase), key=lambda r: r["context"])
        contexts = [r["context"] for r in rows]
        settings = list(rows[0]["speedup"]["vs_best"])
        budgets = list(dict.fromkeys(k.split("@")[1] for k in settings))
        for key in settings:
            g, b = key.split("@")
            ax.plot(contexts, [r["speedup"]["vs_best"][key]["whole_model"] for r in rows], GRANULARITY_STYLE[g],
                    color=f"C{budgets.index(b)}", label=f"{g}s, {float(b):.0%}", ms=5)
        _context_axis(ax, contexts)
        ax.set(title=phase)
    axes[0].set_ylabel("whole-model attention speed-up (×)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False, bbox_to_anchor=(0.5, -0.01))
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    return fig


def anchor_vs_reuse(att: Mapping[str, Any]) -> plt.Figure:
    """Median time per layer of every candidate at the largest decode and prefill context, dense baselines in grey,
    Kascade in blue, the counter-examples (sequence-major dense, masked reuse) in orange, from
    ``data/bench_attention_cpu.json``."""
    fig, axes = plt.subplots(2, 1, figsize=(BOOK_WIDTH_IN, 7.0))
    for ax, phase in zip(axes, ("decode", "prefill")):
        r = max((x for x in att["results"] if x["phase"] == phase), key=lambda x: x["context"])
        names = list(r["times"])
        ms = [r["times"][n]["median_s"] * 1e3 for n in names]
        colors = ["tab:gray" if n in DENSE_BASELINES else "tab:orange" if n in COUNTER_EXAMPLES else "tab:blue"
                  for n in names]
        ax.barh(names, ms, color=colors)
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize="small")
        ax.set(xlabel="median time per layer (ms)", title=f"{phase}, {_context_label(r['context'])} tokens")
    fig.tight_layout()
    return fig


def decode_vs_ceiling(e2e: Mapping[str, Any]) -> plt.Figure:
    """End-to-end decode speed-up of each Kascade setting over dense against context (key positions solid, key tiles
    dashed, one colour per budget), with each budget's bytes-moved ceiling (key positions) dotted, from
    ``data/bench_e2e_cpu.json``."""
    rows = sorted((r for r in e2e["results"] if r["phase"] == "decode"), key=lambda r: r["context"])
    contexts = [r["context"] for r in rows]
    settings = list(rows[0]["settings"])
    budgets = list(dict.fromkeys(rows[0]["settings"][n]["budget"] for n in settings))
    fig, ax = plt.subplots(figsize=(BOOK_WIDTH_IN * 0.75, 3.6))
    for name in settings:
        g, b = rows[0]["settings"][name]["granularity"], rows[0]["settings"][name]["budget"]
        c = f"C{budgets.index(b)}"
        ax.plot(contexts, [r["speedup"][name] for r in rows], GRANULARITY_STYLE[g], color=c, ms=4,
                label=f"{g}s, {b:.0%}")
        if g == "position":
            ax.plot(contexts, [r["ceiling"][name] for r in rows], ":", color=c, lw=1)
    ax.plot([], [], "k:", lw=1, label="bytes-moved ceiling")
    _context_axis(ax, contexts)
    ax.set(ylabel="decode speed-up vs dense (×)")
    ax.legend(frameon=False, fontsize="small", ncol=2)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------------------------------
# The front page: what Kascade does to a model's layers

LAYER_COLOURS = {"dense": "#3b3b3b", "anchor": "#f28e2b", "reuse": "#dbe9f6"}  # also chapter 06's schedule diagram


def kascade_layers(layer_types: Sequence[str], anchor_of: Sequence[int], title: str | None = None) -> plt.Figure:
    """A schedule as a row of layers: layer 0 dense (it also picks Top-k keys), anchor layers (exact scores, pooled
    Top-k), reuse layers (attend only to the keys their anchor picked), with an arc from each anchor to every layer
    that reuses its selection. ``layer_types``: ``"dense" | "anchor" | "reuse"`` per layer; ``anchor_of``: the layer
    whose selection each layer uses (itself unless it reuses), both as in `kascade_lite.schedule.Schedule`."""
    if len(layer_types) != len(anchor_of) or not layer_types:
        raise ValueError(f"need one anchor_of entry per layer, got {len(layer_types)} layer types and "
                         f"{len(anchor_of)} anchor_of entries")
    unknown = sorted(set(layer_types) - set(LAYER_COLOURS))
    if unknown:
        raise ValueError(f"unknown layer types {unknown}; expected {sorted(LAYER_COLOURS)}")
    n = len(layer_types)
    reach = max([layer - src for layer, src in enumerate(anchor_of)] + [1])
    fig, ax = plt.subplots(figsize=(BOOK_WIDTH_IN, 2.7))
    for layer, kind in enumerate(layer_types):
        ax.add_patch(FancyBboxPatch((layer - 0.4, 0), 0.8, 1, boxstyle="round,pad=0.02,rounding_size=0.12",
                                    facecolor=LAYER_COLOURS[kind], edgecolor="#555555", lw=0.6))
        if kind != "reuse":
            ax.text(layer, 0.5, str(layer), ha="center", va="center", fontsize=7,
                    color="white" if kind == "dense" else "black")
    for layer, (kind, src) in enumerate(zip(layer_types, anchor_of)):
        if kind == "reuse":  # arc3 with rad > 0 bends below a left-to-right chord
            ax.add_patch(FancyArrowPatch((src, -0.05), (layer, -0.05), connectionstyle="arc3,rad=0.45",
                                         arrowstyle="-|>", mutation_scale=6, lw=0.7,
                                         color=LAYER_COLOURS["anchor"] if src else "#777777"))
    handles = [Patch(facecolor=LAYER_COLOURS["dense"], edgecolor="#555555",
                     label="dense (layer 0): full attention, also picks Top-k keys for the layers after it"),
               Patch(facecolor=LAYER_COLOURS["anchor"], edgecolor="#555555",
                     label="anchor: exact scores, then Top-k keys per KV head (and query tile)"),
               Patch(facecolor=LAYER_COLOURS["reuse"], edgecolor="#555555",
                     label="reuse: attends only to the keys its anchor picked (arrow from the anchor)")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.0, -0.22), frameon=False, fontsize=9)
    ax.set(xlim=(-0.8, n - 0.2), ylim=(-0.12 * reach - 0.25, 1.1))
    ticks = list(range(0, n, 5 if n > 12 else 1))
    ax.set_xticks(ticks, [f"layer {i}" if i == 0 else str(i) for i in ticks])
    ax.set_yticks([])
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    ax.grid(False)
    if title:
        ax.set_title(title, fontsize=10, loc="left")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------------------------------
# Chapters 06 and 07: schedules and accuracy


def objective_sweep(candidates: Mapping[str, Mapping[str, Any]], dense_correct: int, n_cases: int) -> plt.Figure:
    """Held-out perplexity increase and decode-only needles found against the number of anchors, one line per DP
    objective (``candidates``: ``schedule_selection.json``'s rows; the previously shipped schedule is left out)."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(BOOK_WIDTH_IN, 2.9))
    for objective, marker in (("similarity", "o"), ("importance", "s")):
        rows = sorted((r["num_anchors"], r) for name, r in candidates.items()
                      if r.get("objective") == objective and r.get("method") == "dp" and not name.startswith("shipped"))
        ax1.plot([k for k, _ in rows], [100 * r["ppl_delta"] for _, r in rows], marker=marker, label=objective)
        ax2.plot([k for k, _ in rows], [r["decode_only_correct"] for _, r in rows], marker=marker, label=objective)
    ax2.axhline(dense_correct, color="k", lw=1, ls="--", label="dense")
    ax1.set(xlabel="anchors K", ylabel="held-out ppl increase (%)")
    ax2.set(xlabel="anchors K", ylabel=f"needles found (of {n_cases})", ylim=(-0.5, n_cases + 0.5))
    ax2.legend(fontsize=9, loc="lower right")
    fig.tight_layout()
    return fig


SPACING_STYLE = {"even": ("o-", "evenly spaced"), "dp": ("s-", "DP, similarity"), "dpimp": ("^-", "DP, importance")}


def anchor_spacing(rows: Mapping[str, Mapping[str, Any]], haystacks: Sequence[str]) -> plt.Figure:
    """Evenly spaced anchors against both DP objectives (``rows``: ``schedule_spacing.json``'s, named
    ``kascade+<family>_k<K>``): held-out perplexity increase against K (left) and, per haystack of ``haystacks``, the
    recall of dense's needles with its Wilson interval at the K that ran needles (right; filled: first haystack)."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(BOOK_WIDTH_IN, 3.0))
    for j, (family, (style, label)) in enumerate(SPACING_STYLE.items()):
        mine = sorted((int(n.rsplit("_k", 1)[1]), r) for n, r in rows.items() if n.startswith(f"kascade+{family}_k"))
        ppl = [(k, r["ppl_delta_pct"]) for k, r in mine if r.get("ppl_delta_pct") is not None]
        line, = ax1.plot(*zip(*ppl), style, label=label)
        for h, hay in enumerate(haystacks):
            cells = [(k, r["needles"][hay]) for k, r in mine if hay in r.get("needles", {})]
            cells = [(k, c) for k, c in cells if c["recall"] is not None]
            if not cells:
                continue
            xs = [k + 0.11 * (2 * j + h - 2.5) for k, _ in cells]        # families side by side, haystacks paired
            ys = [c["recall"] for _, c in cells]
            err = np.clip([[y - c["recall_ci95"][0] for y, (_, c) in zip(ys, cells)],
                           [c["recall_ci95"][1] - y for y, (_, c) in zip(ys, cells)]], 0, None)
            ax2.errorbar(xs, ys, yerr=err, fmt=style[0], color=line.get_color(), capsize=2, lw=1,
                         mfc=line.get_color() if h == 0 else "white", label=label if h == 0 else None)
    ax1.set(xlabel="anchors K (layer 0 counted)", ylabel="held-out ppl increase (%)")
    ax1.legend(fontsize=8)
    needle_ks = sorted({int(n.rsplit("_k", 1)[1]) for n, r in rows.items() if r.get("needles")})
    ax2.set(xlabel="anchors K", ylabel="recall of dense's needles", ylim=(-0.05, 1.05), xticks=needle_ks)
    ax2.set_title("filled: " + HAYSTACK_LABELS.get(haystacks[0], haystacks[0]) + "; open: "
                  + HAYSTACK_LABELS.get(haystacks[-1], haystacks[-1]), fontsize=8)
    fig.tight_layout()
    return fig


def retrieval_accuracy(rows: Sequence[Mapping[str, Any]], methods: Sequence[str]) -> plt.Figure:
    """Needle-retrieval accuracy per prompt length, one bar per method with its 95 % Wilson interval. ``rows``:
    ``accuracy_retrieval.json``'s results (``length``, ``method``, ``n_cases``, ``n_correct``)."""
    from .tasks import wilson_interval

    rows = [r for r in rows if r["n_cases"] > 0 and r["method"] in methods]
    lengths = sorted({r["length"] for r in rows})
    fig, ax = plt.subplots(figsize=(BOOK_WIDTH_IN, 3.6))
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        mine = {r["length"]: r for r in rows if r["method"] == method}
        xs = [i + (j - (len(methods) - 1) / 2) * width for i, n in enumerate(lengths) if n in mine]
        acc = [mine[n]["n_correct"] / mine[n]["n_cases"] for n in lengths if n in mine]
        ci = [wilson_interval(mine[n]["n_correct"], mine[n]["n_cases"]) for n in lengths if n in mine]
        err = np.clip([[a - lo for a, (lo, _) in zip(acc, ci)], [hi - a for a, (_, hi) in zip(acc, ci)]], 0, None)
        ax.bar(xs, acc, width, yerr=err, capsize=2, label=method)
    ax.set(xticks=range(len(lengths)), xticklabels=[_context_label(n) for n in lengths], ylim=(0, 1.05),
           xlabel="prompt length (tokens)", ylabel="exact-match accuracy")
    ax.legend(fontsize=9, ncol=min(4, len(methods)), loc="upper center", bbox_to_anchor=(0.5, -0.22))
    fig.tight_layout()
    return fig


def ppl_deltas(rows: Sequence[Mapping[str, Any]], target_pct: float = 2.0) -> plt.Figure:
    """Perplexity increase over dense (%) per method, one bar per window length, with the target as a dashed line.
    ``rows``: dicts with ``method``, ``seq_len`` and ``delta_vs_dense_pct``."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lengths = sorted({r["seq_len"] for r in rows})
    fig, ax = plt.subplots(figsize=(BOOK_WIDTH_IN, 0.5 * len(methods) + 1.4))
    height = 0.8 / len(lengths)
    for j, n in enumerate(lengths):
        value = {r["method"]: r["delta_vs_dense_pct"] for r in rows if r["seq_len"] == n}
        ys = [i + (j - (len(lengths) - 1) / 2) * height for i, m in enumerate(methods) if m in value]
        ax.barh(ys, [value[m] for m in methods if m in value], height, label=f"{n} tokens")
    ax.axvline(target_pct, color="k", ls="--", lw=1, label=f"{target_pct:g} % target")
    ax.set(yticks=range(len(methods)), yticklabels=methods, xlabel="perplexity increase over dense (%)")
    ax.invert_yaxis()
    ax.legend(fontsize=9, loc="lower right")
    fig.tight_layout()
    return fig


def survival_maps(needle: np.ndarray, survival: Mapping[str, np.ndarray]) -> plt.Figure:
    """Heatmaps over (KV head, layer): the dense attention mass of the answer's first query on the needle
    (``needle [L, H]``), then for each named schedule the share of each layer-head's mass its Kascade keys keep
    (``survival[name]: [L, H]``, from `analysis.reuse_survival`)."""
    panels = [("needle mass (dense)", needle, "magma")] + [(f"mass kept: {n}", s, "viridis") for n, s in survival.items()]
    fig, axes = plt.subplots(len(panels), 1, figsize=(BOOK_WIDTH_IN, 1.25 * len(panels) + 0.6), sharex=True)
    for ax, (title, values, cmap) in zip(np.atleast_1d(axes), panels):
        im = ax.imshow(np.asarray(values).T, aspect="auto", cmap=cmap, vmin=0, vmax=None if cmap == "magma" else 1,
                       interpolation="nearest")
        ax.set_title(title, fontsize=10, loc="left")
        ax.set_ylabel("KV head", fontsize=9)
        ax.set_yticks(range(values.shape[1]))
        ax.grid(False)
        fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
    np.atleast_1d(axes)[-1].set_xlabel("layer")
    fig.tight_layout()
    return fig


TRADEOFF_FAMILIES = {
    "kascade": "Kascade", "kascade_sw": "Kascade + sinks/window", "kascade_decode": "Kascade, dense prefill",
    "kascade_no_remap": "ablations, OmniKV", "all_heads_pooled": "ablations, OmniKV", "omnikv": "ablations, OmniKV",
    "oracle": "oracle, pooled oracle", "oracle_decode": "oracle, pooled oracle",
    "pooled": "oracle, pooled oracle", "pooled_decode": "oracle, pooled oracle", "quest": "baselines",
    "tidal": "baselines", "sink_window": "baselines",
    **{f"kascade_mass{p}{mode}": "ours: mass-targeted" for p in (80, 90, 95, 98) for mode in ("", "_decode")},
}
"""Colour groups of `tradeoff_frontier` by method (others: "other")."""


def mass_curves_figure(curves: np.ndarray, layers: Sequence[int], mass: float = 0.9) -> plt.Figure:
    """One panel per anchor layer: the share of a decode step's pooled attention held by the ``n`` heaviest keys,
    one line per KV head (``curves: [layers, kv_heads, seq]``, `analysis.mass_curves`), keys as a share of the
    context on a log axis; a dot where each head reaches ``mass``."""
    curves = np.asarray(curves)
    seq = curves.shape[-1]
    cols = min(3, len(layers))
    rows = -(-len(layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(BOOK_WIDTH_IN, 2.4 * rows + 0.4), sharex=True, sharey=True,
                             squeeze=False)
    x = np.arange(1, seq + 1) / seq
    colors = sns.color_palette("colorblind", curves.shape[1])
    for ax, layer, per_head in zip(axes.flat, layers, curves):
        for h, curve in enumerate(per_head):
            ax.plot(x, curve, color=colors[h], lw=1.4, label=f"KV head {h}")
            n = int((curve < mass - 1e-12).sum()) + 1
            ax.plot(n / seq, curve[n - 1], "o", color=colors[h], ms=4)
        ax.axhline(mass, color="grey", lw=0.8, ls="--")
        ax.set_title(f"layer {layer}", fontsize=10, loc="left")
        ax.set_xscale("log")
        ticks = [t for t in (0.001, 0.01, 0.1, 1.0) if t >= 1 / seq]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{100 * t:g}%" for t in ticks])
    for ax in axes.flat[len(layers):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("attention held")
    axes.flat[0].legend(fontsize=8, loc="lower right")
    fig.supxlabel("keys kept, heaviest first (share of the context)", fontsize=10)
    fig.tight_layout()
    return fig


HAYSTACK_LABELS = {"noise": "filler (RULER)", "wikitext-test": "natural-text (WikiText-2)",
                   "wikitext-valid": "natural-text (WikiText-2 validation)"}
"""How the figures name the needle task's haystacks (`tasks.HAYSTACKS`)."""


def tradeoff_frontier(doc: Mapping[str, Any], haystacks: Sequence[str] | None = None,
                      speed_context: int = 8192) -> plt.Figure:
    """Accuracy against K/V read per decode step, one point per ``data/tradeoff.json`` row (stale rows left out).
    Top, one panel per haystack (default: every haystack in ``doc``): recall of the needles dense found, one marker
    per prompt length, with Wilson 95 % intervals; bottom: perplexity change against dense at 2048 tokens (log scale)
    with the 2 % line. Points whose decode step was timed carry their measured end-to-end decode speed-up at
    ``speed_context`` tokens ("1.3×")."""
    haystacks = list(doc["haystacks"] if haystacks is None else haystacks)
    rows = [r for r in doc["rows"] if not r["stale"] and r["method"] != "dense"]
    target = doc["target"]
    families = list(dict.fromkeys([*TRADEOFF_FAMILIES.values(), "other"]))
    colour = dict(zip(families, sns.color_palette("colorblind", len(families))))
    markers = dict(zip(target["lengths"], "os^D"))
    fig, axes = plt.subplots(len(haystacks) + 1, 1, figsize=(BOOK_WIDTH_IN, 3.2 * (len(haystacks) + 1)),
                             sharex=True)
    tops, bottom = list(axes[:-1]), axes[-1]
    seen: set[str] = set()
    for r in rows:
        fam = TRADEOFF_FAMILIES.get(r["method"], "other")
        x = r["kv_read_share"]
        for top, haystack in zip(tops, haystacks):
            for n, cell in r["retrieval"].get(haystack, {}).items():
                if cell["recall"] is None or int(n) not in markers:
                    continue
                lo, hi = cell["recall_ci95"]
                err = [[max(0.0, cell["recall"] - lo)], [max(0.0, hi - cell["recall"])]]   # rounding may cross
                top.errorbar(x, cell["recall"], yerr=err, fmt=markers[int(n)],
                             color=colour[fam], ms=5, capsize=2, lw=0.8, alpha=0.85)
                seen.add(fam)
        delta = r["ppl_delta_pct"].get(str(target["ppl_length"]))
        if delta is not None:
            bottom.plot(x, max(delta, 1e-2), "o", color=colour[fam], ms=6)
            seen.add(fam)
            speed = (r["decode_speedup"] or {}).get(str(speed_context))
            if speed is not None:
                bottom.annotate(f"{speed:.2f}×", (x, max(delta, 1e-2)), textcoords="offset points", xytext=(5, 3),
                                fontsize=8)
    for top, haystack in zip(tops, haystacks):
        top.axhline(target["recall"], color="k", ls="--", lw=1)
        top.set(ylim=(0, 1.05), ylabel="recall of dense's needles")
        top.set_title(f"needle task, {HAYSTACK_LABELS.get(haystack, haystack)} haystack", fontsize=10, loc="left")
    bottom.axhline(target["ppl_within_pct"], color="k", ls="--", lw=1)
    bottom.set(yscale="log", xlabel="K/V read per decode step, share of dense",
               ylabel=f"perplexity change at {target['ppl_length']} (%)")
    bottom.set_title(f"perplexity (labels: measured decode speed-up at {_context_label(speed_context)} tokens)",
                     fontsize=10, loc="left")
    bottom.xaxis.set_major_formatter(PercentFormatter(1.0))
    handles = [Line2D([], [], ls="", marker="o", color=colour[f], label=f) for f in families
               if f in seen]
    handles += [Line2D([], [], ls="", marker=m, color="0.4", label=_context_label(n))
                for n, m in markers.items()]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=9, bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.64 / fig.get_figheight(), 1, 1))   # room for the legend (0.64 in)
    return fig
