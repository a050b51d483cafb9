"""Head budgets from calibration (`kascade_lite.head_budgets`): the need of a row against a written-out count, and
the calibrated schedule on the tiny model: its shape, positive multipliers that inherit through the head map, and
the same K/V read per decode step as the fixed budget."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kascade_lite import head_budgets as HB
from kascade_lite.models import smollm2_or_tiny
from kascade_lite.schedule import Schedule
from kascade_lite.tradeoff import kv_read_share


def test_row_need_is_the_written_out_count(rng) -> None:
    """The fewest keys before the query, in the source's order, that with the own key hold ``mass`` of the target."""
    rows, length, mass = np.array([5, 9, 15]), 16, 0.8
    target = rng.random((2, 3, length)) ** 4
    source = rng.random((2, 3, length))
    target[..., :] *= np.arange(length) <= rows[:, None]                # nothing past the query
    target /= target.sum(-1, keepdims=True)
    got = np.asarray(HB.row_needs(jnp.asarray(target), jnp.asarray(source), jnp.asarray(rows), mass))
    for b, r in np.ndindex(2, 3):
        i = rows[r]
        order = np.argsort(-source[b, r, :i])
        held, n = target[b, r, i], 0
        while held < mass * target[b, r].sum() - 1e-7:
            held += target[b, r, order[n]]
            n += 1
        assert got[b, r] == pytest.approx((n + 1) / (i + 1))


def test_calibrated_head_budgets_on_the_tiny_model() -> None:
    model = smollm2_or_tiny(True, num_layers=6)
    plain = Schedule.from_anchors("t", 6, 3, [3], head_map=[[0, 1, 2], [2, 2, 0], [0, 0, 0], [0, 1, 2], [1, 1, 1],
                                                          [2, 0, 1]], tile_size=16, budget=0.1, min_keys=16)
    seqs = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (2, 256))
    sched = HB.head_budget_schedule(model, seqs, plain, context=256, start=64, stride=32, dataset="random")
    hb = np.asarray(sched.head_budgets)
    assert hb.shape == (6, 3) and (hb > 0).all() and (hb <= 1 / plain.budget).all()
    assert hb[1].tolist() == [hb[0, 2], hb[0, 2], hb[0, 0]]                  # reuse rows inherit
    assert hb[0, 1] == 1.0                                                    # a set no layer head reads
    kw = dict(budget=0.1, cfg=model.cfg, tile=16, min_keys=16)
    fixed, ours = (kv_read_share("kascade", 256, schedule=s, **kw) for s in (plain, sched))
    assert fixed - 1 / 256 <= ours <= fixed              # one more key in every head of every layer would pass it
    rule = dict(sched.meta)["head_budget_rule"]
    assert rule["kv_read_share"] == ours and rule["fixed_kv_read_share"] == fixed and rule["dataset"] == "random"
    assert np.asarray(rule["needs"]).shape == (6, 3)
    with pytest.raises(ValueError, match="already has head budgets"):
        HB.head_budget_schedule(model, seqs, sched)
