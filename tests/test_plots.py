"""kascade_lite.plots: every book figure draws from the shipped JSON in data/ (or from arrays like the chapter's),
and `table` renders rows without index, NaN or float noise."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from kascade_lite import plots  # noqa: E402
from kascade_lite.files import load_results  # noqa: E402



@pytest.fixture(autouse=True)
def style_and_close():
    plots.set_style()
    yield
    plt.close("all")


def fits_the_book(fig: plt.Figure) -> None:
    width, _ = fig.get_size_inches()
    assert width <= plots.BOOK_WIDTH_IN + 1e-9, f"figure is {width} in wide, more than the book's column"
    fig.canvas.draw()  # layout and text rendering work


def test_set_style_font_sizes() -> None:
    rc = matplotlib.rcParams
    assert rc["figure.figsize"][0] == plots.BOOK_WIDTH_IN and rc["figure.dpi"] == 100
    assert 10 <= rc["xtick.labelsize"] <= 12 and 10 <= rc["axes.labelsize"] <= 12


def test_rope_figures() -> None:
    scores = np.add.outer(np.arange(8), -np.arange(8)).astype(float)
    fig = plots.rope_toeplitz(scores)
    assert len(fig.axes) == 2 and fig.axes[0].images  # the map and its colour bar
    fits_the_book(fig)
    wl = {10_000.0: np.geomspace(6, 6e4, 64), 500_000.0: np.geomspace(6, 3e6, 64)}
    fig = plots.rope_wavelengths(wl)
    ax = fig.axes[0]
    assert len(ax.get_lines()) == 3 and ax.get_yscale() == "log"  # two bases and the context line
    assert ax.get_legend() is not None and "128" in ax.get_title()
    fits_the_book(fig)
    fig = plots.rope_scaling(wl[500_000.0], wl[500_000.0] * 2, (2048.0, 8192.0))
    assert len(fig.axes[0].get_lines()) == 2 and len(fig.axes[0].patches) == 1
    fits_the_book(fig)


def test_gqa_figures() -> None:
    masks = {"a": np.tril(np.ones((8, 8), bool)), "b": np.ones((1, 12), bool), "c": np.ones((3, 12), bool)}
    fig = plots.gqa_masks(masks)
    assert len(fig.axes) == 3 and [len(ax.get_xticks()) for ax in fig.axes] == [8, 12, 12]
    fits_the_book(fig)
    fig = plots.kv_cache_bars([8192, 32768, 131072], [1.0, 4.0, 16.0], [4.0, 16.0, 64.0], 74.5)
    ax = fig.axes[0]
    assert len(ax.patches) == 6 and len(ax.get_lines()) == 1
    label = next(t for t in ax.texts if "80 GB" in t.get_text())
    fig.canvas.draw()
    line_y = ax.transData.transform((0, 74.5))[1]
    box = label.get_window_extent()
    assert box.y0 >= line_y, "the accelerator label must sit above its line, not on it"
    fits_the_book(fig)


def test_convert_rss_from_the_shipped_json() -> None:
    bench = load_results("bench_convert.json")
    fig = plots.convert_rss(bench)
    ax = fig.axes[0]
    assert len(ax.get_lines()) == 3  # the timeline, the target, the whole checkpoint
    big = next(r for r in bench["runs"] if r["name"].startswith("llama-3.1-8b"))
    assert len(ax.get_lines()[0].get_xdata()) == len(big["rss_timeline_mb"])
    fits_the_book(fig)


def test_sparsity_figures_from_the_shipped_calibration() -> None:
    from kascade_lite.calibrate import Calibration
    from kascade_lite.files import results_file

    cal = Calibration.load(results_file("calibration/smollm2-135m.safetensors"))
    fig = plots.coverage_curves(cal.coverage_fractions, cal.coverage.mean(axis=1))
    ax = fig.axes[0]
    assert len(ax.get_lines()) == cal.num_layers + 2  # one per layer, the mean, the 95 % line
    assert [t.get_text() for t in ax.get_xticklabels()] == [f"{100 * f:g}" for f in cal.coverage_fractions]
    fits_the_book(fig)
    i10 = int(np.argmin(np.abs(cal.coverage_fractions - 0.1)))
    fig = plots.coverage_heatmaps(cal.coverage[:, :, i10], cal.tile_coverage, 0.1, cal.settings["k_prev"])
    assert len(fig.axes) == 3  # two heatmaps and one colour bar
    assert len(fig.axes[0].texts) == cal.coverage.shape[0] * cal.coverage.shape[1]
    fits_the_book(fig)
    maps = np.tril(np.random.default_rng(0).random((2, 64, 64)))
    fig = plots.attention_heatmaps(maps / maps.sum(-1, keepdims=True), (0, 15))
    assert len(fig.axes) == 3 and "layer 15" in fig.axes[1].get_title()
    fits_the_book(fig)


def test_speedup_figures_from_the_shipped_json() -> None:
    att = load_results("bench_attention_cpu.json")
    fig = plots.speedup_vs_context(att)
    decode, prefill = fig.axes
    settings = att["results"][0]["speedup"]["vs_best"]
    assert len(decode.get_lines()) == len(settings) + 1  # one line per setting and the 1x line
    contexts = sorted(r["context"] for r in att["results"] if r["phase"] == "decode")
    assert [t.get_text() for t in decode.get_xticklabels()] == [plots._context_label(c) for c in contexts]
    assert not decode.xaxis.get_minorticklabels() or all(not t.get_text() for t in decode.xaxis.get_minorticklabels())
    assert decode.get_legend() is None and fig.legends  # one legend for the figure, below the plots
    fits_the_book(fig)
    fig = plots.anchor_vs_reuse(att)
    assert len(fig.axes) == 2 and all(ax.patches for ax in fig.axes)
    fits_the_book(fig)


def test_table_hides_the_index_and_formats_cells() -> None:
    rows = [{"name": "a", "ms": 54.700001, "n": 12345, "ok": True, "gap": None},
            {"name": "b", "ms": 1.0 / 3, "n": 7, "ok": False, "gap": float("nan")}]
    html = plots.table(rows, {"name": "method", "ms": "time (ms)", "n": "count", "ok": "met", "gap": "gap"},
                       {"ms": "{:.1f}"}).to_html()
    assert "54.7<" in html and "54.700001" not in html and "0.3<" in html
    assert "12,345" in html and "yes" in html and "no" in html
    assert "nan" not in html.lower() and "None" not in html and "–" in html
    assert "time (ms)" in html and "<th class=\"blank" not in html and 'class="kascade-table"' in html
    default = plots.table(rows, ["name", "ms"]).to_html()
    assert "54.7<" in default and "0.333<" in default
    with pytest.raises(KeyError, match="nope"):
        plots.table(rows, ["nope"])


def test_accuracy_figures_draw_from_result_rows() -> None:
    rows = [dict(length=n, method=m, n_cases=10, n_correct=c) for n, m, c in
            ((2048, "dense", 10), (2048, "kascade", 6), (4096, "dense", 9), (4096, "kascade", 0))]
    fig = plots.retrieval_accuracy(rows, ["dense", "kascade"])
    bars = fig.axes[0].patches
    assert [round(b.get_height(), 2) for b in bars] == [1.0, 0.9, 0.6, 0.0]
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["2k", "4k"]
    fits_the_book(fig)
    ppl = [dict(method=m, seq_len=n, delta_vs_dense_pct=d) for m, n, d in
           (("kascade", 512, 3.0), ("kascade", 2048, 5.0), ("quest", 512, 40.0))]
    fig = plots.ppl_deltas(ppl)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["kascade", "quest"]
    assert sorted(round(b.get_width(), 1) for b in fig.axes[0].patches) == [3.0, 5.0, 40.0]
    fits_the_book(fig)
    cands = {f"dp_k{k}": dict(num_anchors=k, objective="similarity", method="dp", ppl_delta=0.1 / k,
                              decode_only_correct=k) for k in (2, 3, 4)}
    cands["dpimp_k3"] = dict(num_anchors=3, objective="importance", method="dp", ppl_delta=0.05, decode_only_correct=1)
    fig = plots.objective_sweep(cands, dense_correct=9, n_cases=10)
    assert [list(line.get_ydata()) for line in fig.axes[1].get_lines()[:2]] == [[2, 3, 4], [1]]
    fits_the_book(fig)


def test_anchor_spacing_draws_every_family() -> None:
    def cell(found: int) -> dict:
        return dict(recall=found / 4, recall_ci95=[max(0.0, found / 4 - 0.3), min(1.0, found / 4 + 0.2)])

    rows = {f"kascade+{fam}_k{k}": dict(ppl_delta_pct=10.0 / k + i,
                                        **({"needles": {"noise": cell(k // 2), "wikitext-valid": cell(1)}}
                                           if k == 4 else {}))
            for i, fam in enumerate(("even", "dp", "dpimp")) for k in (2, 3, 4)}
    fig = plots.anchor_spacing(rows, ["noise", "wikitext-valid"])
    assert [list(line.get_xdata()) for line in fig.axes[0].get_lines()] == [[2, 3, 4]] * 3
    assert [list(line.get_ydata()) for line in fig.axes[0].get_lines()][2] == [10.0 / 2 + 2, 10.0 / 3 + 2, 10.0 / 4 + 2]
    assert len(fig.axes[1].containers) == 6                                # 3 families x 2 haystacks, with bars
    fits_the_book(fig)


def test_survival_maps() -> None:
    needle = np.random.default_rng(0).random((30, 3))
    fig = plots.survival_maps(needle, {"a": needle / 2, "b": needle / 3})
    assert [ax.get_title(loc="left") for ax in fig.axes[:3]] == ["needle mass (dense)", "mass kept: a", "mass kept: b"]
    fits_the_book(fig)


def test_kascade_layers_draws_the_chosen_schedule() -> None:
    from kascade_lite.files import results_file
    from kascade_lite.schedule import Schedule

    chosen = load_results("schedule_selection.json")["chosen"]
    s = Schedule.load(results_file(f"schedules/smollm2-135m_{chosen}.json"))
    fig = plots.kascade_layers(s.layer_types, s.anchor_of)
    fits_the_book(fig)
    ax = fig.axes[0]
    boxes = [p for p in ax.patches if isinstance(p, matplotlib.patches.FancyBboxPatch)]
    arrows = [p for p in ax.patches if isinstance(p, matplotlib.patches.FancyArrowPatch)]
    assert len(boxes) == s.num_layers and len(arrows) == s.layer_types.count("reuse")
    assert [t.get_text() for t in ax.texts] == [str(a) for a in s.anchors]  # layer 0 and the anchors are numbered
    assert len(ax.get_legend().get_texts()) == 3
    with pytest.raises(ValueError, match="anchor_of"):
        plots.kascade_layers(["dense", "reuse"], [0])
    with pytest.raises(ValueError, match="unknown layer types"):
        plots.kascade_layers(["dense", "sparse"], [0, 0])


def test_tradeoff_frontier_from_the_shipped_table() -> None:
    doc = load_results("tradeoff.json")
    fig = plots.tradeoff_frontier(doc)
    *tops, bottom = fig.axes[:len(doc["haystacks"]) + 1]   # one recall panel per haystack, then perplexity
    assert [t.get_title(loc="left") for t in tops] == [f"needle task, {plots.HAYSTACK_LABELS.get(h, h)} haystack"
                                                       for h in doc["haystacks"]]
    for top, haystack in zip(tops, doc["haystacks"]):   # one error bar per measured (row, length)
        cells = [c for r in doc["rows"] if not r["stale"] and r["method"] != "dense"
                 for n, c in r["retrieval"].get(haystack, {}).items()
                 if c["recall"] is not None and int(n) in doc["target"]["lengths"]]
        assert len(top.containers) == len(cells) > 0
    fresh = [r for r in doc["rows"] if not r["stale"] and r["method"] != "dense"]
    ppl_points = [r for r in fresh if r["ppl_delta_pct"]["2048"] is not None]
    assert len(bottom.get_lines()) == len(ppl_points) + 1   # one point per fresh row (stale ones left out), target
    assert {round(line.get_xdata()[0], 6) for line in bottom.get_lines()[:-1]} == \
        {round(r["kv_read_share"], 6) for r in ppl_points}
    timed = [r for r in ppl_points if (r["decode_speedup"] or {}).get("8192") is not None]
    assert len(bottom.texts) == len(timed) and all(t.get_text().endswith("×") for t in bottom.texts)
    assert all(top.get_ylim() == (0, 1.05) for top in tops)
    fits_the_book(fig)
