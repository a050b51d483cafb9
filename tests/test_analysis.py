"""The chapters' diagnostics on a tiny random Llama: attention maps are the dense model's probabilities,
`reuse_survival` keeps all the mass at full budget, never more than a layer's own Top-k, and measures the needle's
mass from those same maps, and `quest_needle_ranks` ranks pages as a brute-force loop over Quest's bound does."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kascade_lite.analysis import (POOLINGS, attention_maps, coverage_at_context, pooling_coverage,
                                   quest_needle_ranks, reuse_survival)
from kascade_lite.baselines import QuestAttention
from kascade_lite.calibrate import query_coverage
from kascade_lite.config import LlamaConfig
from kascade_lite.model import KVCache, Llama, decode, dense_attention, forward
from kascade_lite.schedule import Schedule

CFG = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                  head_dim=8)
SEQ = 64
TOKENS = np.random.default_rng(1).integers(0, CFG.vocab_size, SEQ)  # one sequence: [SEQ] token ids


@pytest.fixture(scope="module")
def model() -> Llama:
    return Llama(CFG)


def test_attention_maps_are_the_dense_probabilities(model: Llama) -> None:
    maps = attention_maps(model, TOKENS, (2, 0))
    assert maps.shape == (2, CFG.num_kv_heads, CFG.group_size, SEQ, SEQ)
    np.testing.assert_allclose(maps.sum(-1), 1.0, rtol=1e-5)
    assert np.all(np.triu(maps[0, 0, 0], k=1) == 0)                          # causal
    assert not np.allclose(maps[0], maps[1])                                  # layer 2 first, as asked


def test_reuse_survival(model: Llama) -> None:
    L, H = model.cfg.num_layers, model.cfg.num_kv_heads
    prompt, span = TOKENS[:40], (10, 14)
    sched = Schedule.from_anchors("t", L, H, [2], head_map=[list(range(H))] * (L - 1) + [list(range(H))[::-1]])
    full = reuse_survival(model, prompt, {"s": sched}, span, budget=1.0, min_keys=0)
    np.testing.assert_allclose(full["survival"]["s"], 1.0, atol=1e-6)  # every key kept: nothing lost
    np.testing.assert_allclose(full["own"], 1.0, atol=1e-6)
    part = reuse_survival(model, prompt, {"s": sched}, span, budget=4, min_keys=0)  # 3 keys + the query itself
    kept = part["survival"]["s"]
    assert (kept <= part["own"] + 1e-9).all() and (part["own"] < 1).all()
    for layer, kind in enumerate(sched.layer_types):  # an anchor (and layer 0) reads its own Top-k
        if kind != "reuse":
            np.testing.assert_allclose(kept[layer], part["own"][layer])
    probs = attention_maps(model, prompt, tuple(range(L)))[:, :, :, -1]                 # [L, H, G, length]
    np.testing.assert_allclose(part["needle"], probs[..., 10:14].sum(-1).mean(-1), atol=1e-5)


def test_pooling_coverage_at_equal_keys(model: Llama) -> None:
    p = attention_maps(model, TOKENS, (1,))[0]                                # [kv_heads, group, SEQ, SEQ]
    cov, keys = pooling_coverage(p, tile_size=8, k_prev=5)
    assert set(cov) == set(POOLINGS) and all(c.shape == (CFG.num_kv_heads,) for c in cov.values())
    start = np.arange(SEQ) // 8 * 8
    np.testing.assert_array_equal(keys, np.arange(SEQ) - start + 1 + np.minimum(5, start))
    oracle = cov[POOLINGS[0]]
    for name in POOLINGS[1:]:                                                 # a row's own Top-k is the best set
        assert np.all(cov[name] <= oracle + 1e-12) and np.all(cov[name] > 0)
    everything, _ = pooling_coverage(p, tile_size=8, k_prev=SEQ)            # every earlier key: all the mass
    for c in everything.values():
        np.testing.assert_allclose(c, 1.0, rtol=1e-5)
    single, _ = pooling_coverage(p[:, :1], tile_size=1, k_prev=5)           # nothing to pool: all the same
    for c in single.values():
        np.testing.assert_allclose(c, single[POOLINGS[0]])
    with pytest.raises(ValueError, match="multiple of tile_size"):
        pooling_coverage(p, tile_size=7, k_prev=5)


def test_coverage_at_context_is_the_last_rows_coverage(model: Llama) -> None:
    fractions, n = (0.05, 0.25), 16
    got = coverage_at_context(model, TOKENS[None], n_queries=n, fractions=fractions)
    maps = attention_maps(model, TOKENS, tuple(range(CFG.num_layers)))      # [L, H, G, SEQ, SEQ]
    want = np.stack([np.asarray(query_coverage(m[None, :, :, SEQ - n:], fractions, q_offset=SEQ - n)) for m in maps])
    assert got.shape == (CFG.num_layers, CFG.num_kv_heads, len(fractions))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    full = np.stack([np.asarray(query_coverage(m[None], fractions, stride=SEQ)) for m in maps])  # the last row only
    last = coverage_at_context(model, TOKENS[None], n_queries=1, fractions=fractions)
    np.testing.assert_allclose(last, full, rtol=1e-5)


def test_mass_curves_rank_the_pooled_decode_attention() -> None:
    """`mass_curves` against attention computed here: the last token's probabilities from `attention_maps` (one
    dense forward), pooled over each group, sorted; `keys_for_mass` is the first crossing."""
    from kascade_lite.analysis import attention_maps, keys_for_mass, mass_curves
    from kascade_lite.models import smollm2_or_tiny

    model = smollm2_or_tiny(True, num_layers=4)
    tokens = np.random.default_rng(3).integers(0, model.cfg.vocab_size, 40)
    curves = mass_curves(model, tokens, (2, 1))
    maps = attention_maps(model, tokens, (2, 1))                            # [layers, kv, group, seq, seq]
    pooled = maps[:, :, :, -1, :].sum(axis=2)
    want = np.cumsum(-np.sort(-pooled, axis=-1), axis=-1)
    np.testing.assert_allclose(curves, want / want[..., -1:], atol=1e-5)
    need = keys_for_mass(curves, 0.9)
    for idx in np.ndindex(*need.shape):
        assert curves[idx][need[idx] - 1] >= 0.9 - 1e-9 and (need[idx] == 1 or curves[idx][need[idx] - 2] < 0.9)


@dataclass(frozen=True)
class RecordQK:
    """Quest's attention that also keeps each layer's query ``[1, 1, heads, d]`` and key cache ``[1, kv_heads, n,
    d]``."""

    quest: QuestAttention

    def __call__(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array, *, q_offset: jax.Array,
                 kv_len: jax.Array, carry: Any) -> tuple[jax.Array, Any]:
        out, carry = self.quest(layer, q, k, v, q_offset=q_offset, kv_len=kv_len, carry=carry)
        return out, (carry or ()) + ((q, k),)


def brute_force_page_ranks(q: np.ndarray, k: np.ndarray, needle_pages: list[int], n_pages: int, page: int
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Loops over query heads and pages: Quest's bound (per channel the larger of q·min and q·max, summed) and the
    exact max q·k of each page, and the best rank of a needle page under each. q: ``[heads, d]``, k: ``[kv_heads,
    n, d]`` -> bound, exact ``[heads, n_pages]``, ranks ``[heads]``."""
    heads, d = q.shape
    group = heads // k.shape[0]
    bound, exact = np.zeros((heads, n_pages)), np.zeros((heads, n_pages))
    for j in range(heads):
        for p in range(n_pages):
            keys = k[j // group, p * page:(p + 1) * page]
            bound[j, p] = sum(max(q[j, c] * keys[:, c].min(), q[j, c] * keys[:, c].max()) for c in range(d)) / d ** 0.5
            exact[j, p] = max(float(q[j] @ key) for key in keys) / d ** 0.5

    def rank(s: np.ndarray) -> np.ndarray:
        return np.array([min(1 + sum(s[j, p] > s[j, n] for p in range(n_pages)) for n in needle_pages)
                         for j in range(heads)])

    return bound, exact, rank(bound), rank(exact)


def test_quest_needle_ranks_match_a_brute_force_oracle(model: Llama) -> None:
    prompt, span, page = TOKENS[:50], (21, 27), 4                      # the span covers pages 5 and 6 of 12
    got = quest_needle_ranks(model, prompt, span, steps=3, budget=16, min_keys=0, page_size=page, dense_layers=(0,))
    assert got["layers"].tolist() == [1, 2, 3] and got["needle_pages"].tolist() == [5, 6]
    assert got["n_candidates"].tolist() == [12, 12, 13]                # the third query (position 52) opens page 13
    assert got["n_top"].tolist() == [3, 3, 3]                          # 16 keys: 4 pages, the query's own one of them
    quest = QuestAttention(budget=16, min_keys=0, page_size=page, dense_layers=(0,))
    cache = KVCache.empty(model.cfg, 1, 53, model.dtype)
    logits, cache, _ = forward(model, jnp.asarray(prompt[None], jnp.int32), cache, dense_attention, last_only=True)
    answer = decode(model, logits, cache.copy(), 3)[0]                 # dense's greedy answer, fed to Quest
    np.testing.assert_array_equal(got["answer"], answer)
    for step, token in enumerate(answer):
        _, cache, recorded = forward(model, jnp.full((1, 1), token, jnp.int32), cache, RecordQK(quest))
        n_pages = got["n_candidates"][step]
        for i, layer in enumerate(got["layers"]):
            q, k = (np.asarray(x[0], np.float64) for x in recorded[layer])
            bound, exact, bound_rank, exact_rank = brute_force_page_ranks(q[0], k, [5, 6], n_pages, page)
            np.testing.assert_allclose(got["bound"][step, i, :, :n_pages], bound, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(got["exact"][step, i, :, :n_pages], exact, rtol=1e-4, atol=1e-5)
            assert np.isnan(got["bound"][step, i, :, n_pages:]).all()
            np.testing.assert_array_equal(got["bound_rank"][step, i], bound_rank)
            np.testing.assert_array_equal(got["exact_rank"][step, i], exact_rank)
            scores = np.einsum("hgd,hnd->hgn", q[0].reshape(k.shape[0], -1, k.shape[2]), k[:, :51 + step])
            probs = np.exp(scores / k.shape[2] ** 0.5 - (scores / k.shape[2] ** 0.5).max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            np.testing.assert_allclose(got["needle_mass"][step, i], probs[..., 21:27].sum(-1).reshape(-1), atol=1e-5)
    assert (got["kept_mass"] <= got["topk_mass"] + 1e-6).all() and (got["kept_mass"] < 1).all()  # Top-k: the most mass
    finite = ~np.isnan(got["bound"])
    assert (got["exact"][finite] <= got["bound"][finite] + 1e-5).all()  # the bound bounds
    np.testing.assert_array_equal(got["kept"], got["bound_rank"] <= got["n_top"][:, None, None])  # its Top pages
    assert got["kept"].any() and not got["kept"].all()


def test_quest_needle_ranks_keeps_every_page_at_full_budget(model: Llama) -> None:
    got = quest_needle_ranks(model, TOKENS[:50], (21, 27), steps=3, budget=1.0, min_keys=0, page_size=4)
    assert got["n_top"].tolist() == got["n_candidates"].tolist() == [12, 12, 13] and got["kept"].all()
    np.testing.assert_allclose(got["kept_mass"], 1.0, rtol=1e-5)        # every key read: Quest is dense attention
    np.testing.assert_allclose(got["topk_mass"], 1.0, rtol=1e-5)
    np.testing.assert_array_equal(got["predicted"][:-1], got["answer"][1:])
    with pytest.raises(ValueError, match="query's page"):
        quest_needle_ranks(model, TOKENS[:50], (45, 50), page_size=4)  # page 12 holds the decode query
