"""tradeoff.py: the K/V read rule against a brute-force count of real selections, paired statistics, the builder on
synthetic files (two haystacks, a stale and a fresh rerun), and the shipped data/tradeoff.json rebuilt."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest

from kascade_lite import tradeoff as T
from kascade_lite.baselines import (QuestAttention, SinkWindowAttention, TidalDecode, omnikv, oracle_topk,
                                    quest_selection, sink_window_selection)
from kascade_lite.config import SMOLLM2_135M
from kascade_lite.cost import attention_cost
from kascade_lite.files import load_results, results_file
from kascade_lite.kascade import KascadeAttention, Selection, keys_read, select
from kascade_lite.schedule import Schedule
from kascade_lite.tasks import mcnemar_p, wilson_interval

CFG = SMOLLM2_135M
GREEDY = Schedule.load(results_file("schedules/smollm2-135m_greedy.json"))


# ------------------------------------------------------------------------------------------------ K/V read rule
def test_layer_reads_follow_the_cost_model() -> None:
    hk, d, b, n, k = CFG.num_kv_heads, CFG.head_dim, 4, 4096, 410
    unit = hk * d * b
    for kind in ("dense", "anchor", "reuse"):
        cost = attention_cost("decode", kind, n, k, q_heads=CFG.num_heads, kv_heads=hk, head_dim=d)
        assert T.layer_reads(kind, 1, n, k, group=3) * unit == cost["bytes"], kind


def gathered_keys(sel: Selection, cached: int) -> int:
    """Keys one KV head gathers from a decode step's selection: the kept positions in the cache, over every set,
    plus the query's own key (read once). Every KV head must gather the same count."""
    pos, ok = (np.asarray(x) for x in sel.positions())
    per_head = (ok & (pos < cached))[0].reshape(pos.shape[1], -1).sum(axis=1)
    assert len(set(per_head.tolist())) == 1, per_head
    return int(per_head[0]) + 1


def brute_force_share(method: str, context: int, budget: float, granularity: str, min_keys: int) -> float:
    """K/V read share of one decode step counted from the policies' own layer plans and real selections on random
    queries and keys: full layers read 2L, selecting layers L plus 2x what they gather, the others 2x what the
    selection they reuse gathers; Quest's layers the min/max of every page before the query's page plus 2x its
    pages."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, 1, CFG.num_heads, CFG.head_dim)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, CFG.num_kv_heads, context, CFG.head_dim)), jnp.float32)
    own, pos = k[:, :, -1:], context - 1        # a decode step: the cache buffer has a slot for the new key
    n, group = CFG.num_layers, CFG.num_heads // CFG.num_kv_heads

    def picked(pool: str, unit: int) -> int:
        return gathered_keys(select(q, k, pos, context, q_tile=1, unit=unit, pool=pool, budget=budget,
                                    min_keys=min_keys, own_key=own), pos)

    def scheduled(policy: KascadeAttention) -> float:
        unit = policy.q_tile if policy.granularity == "tile" else 1
        g = picked(policy.pool, unit)
        reads = {"dense": 2 * context, "anchor": 2 * context if policy.anchor_dense else context + 2 * g,
                 "reuse": 2 * g}
        return sum(reads[t] for t in policy.schedule.layer_types)

    opts = dict(budget=budget, min_keys=min_keys, granularity=granularity)
    if method == "dense":
        total = 2 * context * n
    elif method in ("kascade", "kascade_decode"):
        total = scheduled(KascadeAttention(GREEDY, **opts))
    elif method == "omnikv":
        total = scheduled(omnikv(GREEDY, **opts))
    elif method == "oracle_decode":
        total = scheduled(oracle_topk(n, CFG.num_kv_heads, budget=budget, min_keys=min_keys))
    elif method == "pooled_decode":
        every = Schedule.from_anchors("m", n, CFG.num_kv_heads, list(range(1, n)), budget=budget, min_keys=min_keys)
        total = scheduled(KascadeAttention(every, **opts))
    elif method == "tidal":
        total = scheduled(TidalDecode(n, CFG.num_kv_heads, budget=budget, min_keys=min_keys).decode_attention())
    elif method == "sink_window":
        sel = sink_window_selection(1, context, pos, context, batch=1, kv_heads=CFG.num_kv_heads, budget=budget,
                                    min_keys=min_keys)
        dense = SinkWindowAttention().dense_layers
        total = sum(2 * context if i in dense else 2 * gathered_keys(sel, pos) for i in range(n))
    elif method == "quest":
        qa = QuestAttention(budget=budget, min_keys=min_keys)
        sel = quest_selection(q, k, pos, context, page_size=qa.page_size, budget=budget, min_keys=min_keys)
        own_page_start = pos // qa.page_size * qa.page_size
        metadata = 2 * len({p // qa.page_size for p in range(own_page_start)})  # min and max of each earlier page
        total = sum(2 * context if i in qa.dense_layers else metadata + 2 * gathered_keys(sel, pos)
                    for i in range(n))
    else:
        raise AssertionError(method)
    return total / (2 * context * n)


POSITIONS = ("dense", "kascade", "omnikv", "oracle_decode", "pooled_decode", "tidal", "sink_window", "quest")
CASES = ([(m, "position", n, b) for m in POSITIONS for n, b in ((321, 0.15), (300, 0.3))]
         + [(m, "tile", 321, 0.15) for m in ("kascade_decode", "pooled_decode")])  # a cache of whole 32-key tiles


@pytest.mark.parametrize("method,granularity,context,budget", CASES)
def test_kv_read_share_matches_a_brute_force_count(method: str, granularity: str, context: int,
                                                   budget: float) -> None:
    want = brute_force_share(method, context, budget, granularity, min_keys=16)
    got = T.kv_read_share(method, context, budget=budget, granularity=granularity,
                          schedule=GREEDY if T.uses_schedule(method) else None, min_keys=16)
    assert got == pytest.approx(want, rel=1e-12)
    assert 0 < got <= 1 or method in ("oracle_decode", "tidal", "quest")


def test_kv_read_share_orders_the_methods() -> None:
    share = lambda m, **kw: T.kv_read_share(m, 8192, budget=0.1, schedule=GREEDY if T.uses_schedule(m) else None,
                                           **kw)  # noqa: E731
    assert share("dense") == 1.0
    assert share("kascade") == share("kascade_decode") == share("kascade_sw") < share("omnikv") < 1
    assert share("kascade", granularity="tile") >= share("kascade")
    assert share("oracle_decode") > share("pooled_decode") > share("kascade")  # per-head sets gather more
    with pytest.raises(ValueError, match="no K/V read rule"):
        share("bogus")
    with pytest.raises(ValueError, match="runs a schedule"):
        T.kv_read_share("kascade", 8192, budget=0.1)


# ------------------------------------------------------------------------------------------------ paired statistics
def cases(correct: list[bool], start: int = 0, answer: str = "a") -> list[dict[str, Any]]:
    return [dict(index=start + i, answer=f"{answer}{start + i}", correct=c) for i, c in enumerate(correct)]


def test_paired_recall_counts_the_needles_dense_found() -> None:
    dense = cases([True, True, True, False, True, True])
    method = cases([True, False, True, True, False])                       # case 5: not answered by the method
    s = T.paired_recall(method, dense)
    assert (s["n_cases"], s["n_correct"], s["n_dense_correct"], s["n_both"]) == (5, 3, 4, 2)
    assert (s["only_method"], s["only_dense"]) == (1, 2)
    assert s["recall"] == 0.5 and s["accuracy"] == 0.6
    assert s["recall_ci95"] == list(wilson_interval(2, 4)) and s["mcnemar_p"] == mcnemar_p(1, 2) == 1.0
    with pytest.raises(ValueError, match="no dense result"):
        T.paired_recall(cases([True], start=9), dense)
    with pytest.raises(ValueError, match="not dense's cases"):
        T.paired_recall(cases([True], answer="b"), dense)


# ------------------------------------------------------------------------------------------------ the builder
def retrieval_file(date: str, rows: dict[tuple[str, int], list[bool]], haystack: str | None = None
                   ) -> dict[str, Any]:
    settings: dict[str, Any] = dict(budget=0.1, main_schedule="greedy", schedule=GREEDY.to_dict())
    if haystack:
        settings["haystack"] = haystack
    results = [dict(length=n, method=m, n_cases=len(c), cases=cases(c, answer=haystack or "noise"))
               for (m, n), c in rows.items()]
    return dict(provenance=dict(command="test", smoke=False, date=date), settings=settings, results=results)


def ppl_file(date: str, deltas: dict[tuple[str, int], float]) -> dict[str, Any]:
    results = [dict(seq_len=n, method=m, schedule="greedy" if m.startswith("kascade") else None,
                    granularity="position", budget=1.0 if m == "dense" else 0.1, min_keys=0 if n == 512 else 128,
                    delta_vs_dense_pct=d) for (m, n), d in deltas.items()]
    return dict(provenance=dict(command="test", smoke=False, date=date), settings={}, results=results)


def write(folder: Path, name: str, doc: dict[str, Any]) -> None:
    (folder / name).write_text(json.dumps(doc))


def test_builder_pairs_each_haystack_and_drops_stale_rows(tmp_path: Path) -> None:
    old, new = "2026-12-01T00:00:00+00:00", "2026-12-07T00:00:00+00:00"
    all_right = [True] * 20
    write(tmp_path, "accuracy_retrieval.json", retrieval_file(old, {
        **{("dense", n): all_right for n in (2048, 4096, 8192)},
        **{("kascade@0.5", n): all_right for n in (2048, 4096, 8192)},
        ("kascade", 2048): [True] * 10 + [False] * 10, ("quest", 2048): [False] * 20}))
    write(tmp_path, "accuracy_retrieval_natural.json", retrieval_file(new, {
        ("dense", 2048): [True] * 19 + [False], ("kascade", 2048): [True] * 18 + [False, True]},
        haystack="wikitext-test"))
    write(tmp_path, "accuracy_ppl.json", ppl_file(old, {("dense", 2048): 0.0, ("kascade", 2048): 16.0,
                                                        ("kascade", 512): 6.0, ("quest", 2048): 19.0}))
    doc = T.build_tradeoff(tmp_path, command="test")
    rows = {(r["method"], r["budget"]): r for r in doc["rows"]}
    assert doc["haystacks"] == ["noise", "wikitext-test"]
    kascade = rows["kascade", 0.1]
    assert kascade["retrieval"]["noise"]["2048"]["recall"] == 0.5
    natural = kascade["retrieval"]["wikitext-test"]["2048"]
    assert (natural["n_dense_correct"], natural["n_both"], natural["only_method"]) == (19, 18, 1)
    assert natural["recall"] == 18 / 19 and natural["source"] == "accuracy_retrieval_natural.json"
    assert kascade["ppl_delta_pct"] == {"512": 6.0, "2048": 16.0} and kascade["target"]["meets"] is False
    assert kascade["kv_read_share"] == T.kv_read_share("kascade", 2048, budget=0.1, schedule=GREEDY)
    quest = rows["quest", 0.1]
    assert quest["stale"] and "rerun" in quest["stale_reason"]
    # kascade@0.5 finds every noise needle, but the natural haystack was not measured and neither was perplexity
    assert rows["kascade", 0.5]["target"]["meets"] is None and doc["recommended"] is None
    assert rows["dense", 1.0]["kv_read_share"] == 1.0

    # the reruns land: a fresh Quest file wins over the stale one, and the flag goes away
    write(tmp_path, "accuracy_retrieval_quest.json", retrieval_file(new, {
        ("dense", 2048): all_right, ("quest", 2048): [True] * 19 + [False]}))
    write(tmp_path, "accuracy_ppl_quest.json", ppl_file(new, {("dense", 2048): 0.0, ("quest", 2048): 1.0}))
    quest = {(r["method"], r["budget"]): r for r in T.build_tradeoff(tmp_path, command="test")["rows"]}["quest", 0.1]
    assert not quest["stale"] and quest["retrieval"]["noise"]["2048"]["recall"] == 0.95
    assert quest["ppl_delta_pct"]["2048"] == 1.0 and quest["ppl_sources"] == ["accuracy_ppl_quest.json"]


def test_a_resumed_run_that_redoes_a_method_dates_its_rows(tmp_path: Path) -> None:
    old, new = "2026-12-01T00:00:00+00:00", "2026-12-07T00:00:00+00:00"
    doc = ppl_file(old, {("dense", 2048): 0.0, ("quest", 2048): 1.0})
    doc["resumed_by"] = [dict(date=new, command="python benchmarks/bench_accuracy.py ppl --resume --redo quest")]
    write(tmp_path, "accuracy_ppl.json", doc)
    rows = {r["method"]: r for r in T.build_tradeoff(tmp_path, command="test")["rows"]}
    assert not rows["quest"]["stale"]
    doc["resumed_by"][0]["command"] = "python benchmarks/bench_accuracy.py ppl --resume --redo sink_window"
    write(tmp_path, "accuracy_ppl.json", doc)
    assert {r["method"]: r for r in T.build_tradeoff(tmp_path, command="test")["rows"]}["quest"]["stale"]


def test_target_check_and_recommend() -> None:
    def row(recall: float | None, delta: float | None, share: float, stale: bool = False) -> dict[str, Any]:
        cells = {str(n): {"recall": recall} for n in T.TARGET.lengths}
        r = dict(method="kascade", budget=share, schedule="greedy", granularity="position", kv_read_share=share,
                 retrieval={"noise": cells}, ppl_delta_pct={"2048": delta}, stale=stale)
        r["target"] = T.target_check(r)
        return r

    assert row(0.96, 1.0, 0.3)["target"]["meets"] is True
    assert row(0.96, 2.5, 0.3)["target"]["meets"] is False
    assert row(0.90, None, 0.3)["target"]["meets"] is False
    assert row(0.96, None, 0.3)["target"]["meets"] is None
    rows = [row(0.96, 1.0, 0.5), row(0.99, 0.5, 0.4), row(0.99, 0.1, 0.2, stale=True), row(0.5, 0.1, 0.1)]
    assert T.recommend(rows)["kv_read_share"] == 0.4
    full = {"provenance": {"smoke": False}}
    refresh = {**full, "chosen": "kascade_decode+greedy_t90@0.2"}
    assert T.recommended_plan(refresh, "chosen") == ("greedy_t90", 0.2, None)
    assert T.recommended_plan({**full, "chosen": "kascade_decode@0.3"}, "chosen") == ("chosen", 0.3, None)
    assert T.recommended_plan(None, "chosen")[:2] == ("chosen", 0.1)
    assert T.recommended_plan({"provenance": {"smoke": True}, "chosen": "kascade@0.3"}, "chosen") == \
        ("chosen", 0.1, "the held-out choice of a budget rule is a smoke run")
    assert T.recommended_plan({**full, "chosen": "pooled_decode@0.1"}, "chosen") == \
        ("chosen", 0.1, "the held-out choice, pooled_decode@0.1, is not Kascade at a fixed budget")
    assert T.recommended_plan({**full, "chosen": None}, "chosen")[:2] == ("chosen", 0.1)


def test_shipped_tradeoff_is_rebuilt_from_the_shipped_results() -> None:
    shipped = load_results("tradeoff.json")
    folder = results_file("tradeoff.json").parent                 # the shipped data/ (or $KASCADE_RESULTS_DIR)
    rebuilt = json.loads(json.dumps(T.build_tradeoff(folder, command=shipped["provenance"]["command"])))
    for key in ("command", "smoke"):
        assert rebuilt["provenance"][key] == shipped["provenance"][key]
    assert {k: v for k, v in rebuilt.items() if k != "provenance"} == \
        {k: v for k, v in shipped.items() if k != "provenance"}
    assert all(r["stale_reason"] for r in shipped["rows"] if r["stale"])
    methods = {r["method"] for r in shipped["rows"]}
    assert {"dense", "kascade", "kascade_decode", "quest", "tidal", "oracle_decode"} <= methods


def test_step_bytes_split_weights_and_kv() -> None:
    from kascade_lite.config import LLAMA_3_1_8B
    from kascade_lite.cost import step_weight_bytes

    one = T.step_bytes(LLAMA_3_1_8B, 32_768, batch=1, schedule=GREEDY, budget=0.1)
    many = T.step_bytes(LLAMA_3_1_8B, 32_768, batch=16, schedule=GREEDY, budget=0.1)
    assert one["weights"] == many["weights"] == step_weight_bytes(LLAMA_3_1_8B, 2)
    assert one["kv_dense"] == 32 * 2 * 32_768 * 8 * 128 * 2 and many["kv_dense"] == 16 * one["kv_dense"]
    assert 0 < one["saved"] < many["saved"] < 1            # the K/V saving grows with the batch
    assert one["kv_kascade"] / one["kv_dense"] == pytest.approx(many["kv_kascade"] / many["kv_dense"])


def test_same_cases_restricts_to_the_common_cases() -> None:
    doc = dict(results=[dict(length=2048, method="dense", cases=cases([True, True, True, True])),
                        dict(length=2048, method="a", cases=cases([True, False, True])),
                        dict(length=2048, method="b", cases=cases([False, True], start=1))])
    got = T.same_cases(doc, 2048, ["a", "b"])
    assert got["a"]["n_cases"] == got["b"]["n_cases"] == 2                 # cases 1 and 2 only
    assert (got["a"]["n_both"], got["b"]["n_both"]) == (1, 1)
    with pytest.raises(ValueError, match="no results"):
        T.same_cases(doc, 4096, ["a"])


@pytest.mark.parametrize("granularity", ["position", pytest.param("tile", marks=pytest.mark.slow)])
def test_measured_read_share_of_a_fixed_budget_is_the_rule(granularity: str) -> None:
    """One real decode step of Kascade on a tiny model: the keys its selections kept give `kv_read_share`'s number;
    the adaptive variant (``mass``) reads no more than its cap and no less than its floor."""
    from kascade_lite.model import KVCache, forward
    from kascade_lite.models import smollm2_or_tiny

    model = smollm2_or_tiny(True, num_layers=6)
    sched = Schedule.from_anchors("test", 6, model.cfg.num_kv_heads, [2, 4], head_map=[[0, 1, 2], [2, 2, 0]] * 3,
                                  tile_size=16, budget=0.2, min_keys=16)
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, model.cfg.vocab_size, (1, 300)), jnp.int32)
    cache = KVCache.empty(model.cfg, 1, 320, model.dtype)
    logits, cache, _ = forward(model, prompt, cache, last_only=True)
    token = jnp.argmax(logits[:, -1], axis=-1)[:, None].astype(jnp.int32)
    shares = {}
    for name, att in (("fixed", KascadeAttention(sched, granularity=granularity)),
                      ("floor", KascadeAttention(sched, granularity=granularity, budget=16)),
                      ("mass", KascadeAttention(sched, granularity=granularity, mass=0.5))):
        _, _, carry = forward(model, token, cache.copy(), att)
        shares[name] = T.selection_read_share(carry, sched, 301)
    rule = T.kv_read_share("kascade", 301, budget=0.2, granularity=granularity, schedule=sched, cfg=model.cfg,
                           tile=16, min_keys=16)
    assert shares["fixed"] == pytest.approx(rule, rel=1e-9)
    assert shares["floor"] <= shares["mass"] <= shares["fixed"]


def test_measured_read_share_of_head_budgets_is_the_rule() -> None:
    """One real decode step of Kascade under a schedule with head budgets: the keys its selections kept (each anchor
    KV head its own count, reuse layers through a head map that is not a permutation) give `kv_read_share`'s
    number, and the rule's per-layer reads are the mean over the heads' counts."""
    from kascade_lite.model import KVCache, forward
    from kascade_lite.models import smollm2_or_tiny

    model = smollm2_or_tiny(True, num_layers=6)
    plain = Schedule.from_anchors("test", 6, model.cfg.num_kv_heads, [2, 4], head_map=[[0, 1, 2], [2, 2, 0]] * 3,
                                  tile_size=16, budget=0.2, min_keys=16)
    sets = {0: (0.5, 1.0, 2.5), 2: (0.25, 1.5, 1.0), 4: (3.0, 0.75, 1.0)}
    rows = tuple(sets[a] if t != "reuse" else tuple(sets[a][h] for h in hm)
                 for t, a, hm in zip(plain.layer_types, plain.anchor_of, plain.head_map))
    sched = dataclasses.replace(plain, head_budgets=rows)
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, model.cfg.vocab_size, (1, 300)), jnp.int32)
    cache = KVCache.empty(model.cfg, 1, 320, model.dtype)
    logits, cache, _ = forward(model, prompt, cache, last_only=True)
    token = jnp.argmax(logits[:, -1], axis=-1)[:, None].astype(jnp.int32)
    _, _, carry = forward(model, token, cache.copy(), KascadeAttention(sched))
    kw = dict(budget=0.2, schedule=sched, cfg=model.cfg, tile=16, min_keys=16)
    rule = T.kv_read_share("kascade", 301, **kw)
    assert T.selection_read_share(carry, sched, 301) == pytest.approx(rule, rel=1e-9)
    assert rule != T.kv_read_share("kascade", 301, **dict(kw, schedule=plain))
    reads = T.decode_reads("kascade", 301, **kw)
    keys = [keys_read(301, phase="decode", granularity="position", tile=16, budget=min(1.0, 0.2 * m), min_keys=16)
            for m in rows[1]]                                                  # layer 1 reuses [2.5, 2.5, 0.5]
    assert reads[1] == pytest.approx(np.mean([2 * k for k in keys]))
