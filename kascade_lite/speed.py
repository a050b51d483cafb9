"""The speed benchmarks of chapter 08, each path timed against this machine's measured rates (`bench.measure_machine`,
in the same run): the attention op (`run_attention`) and the model's forward step end to end (`run_e2e`), dense vs
Kascade at both granularities and several budgets. ``benchmarks/bench_attention.py`` and ``benchmarks/bench_e2e.py``
are their command lines; `make bench` runs both.

**Attention op** (``bench_attention_cpu.json``, ``bench_headline_cpu.json``): Kascade anchor / reuse layers
(`kascade.py`) vs the dense baselines, per layer, batch 1, on the model's head-major cache ``[batch, kv_heads, L,
head_dim]``, random q/k/v at the Llama-3.1-8B head shape (decode 2k-32k, prefill 2k-16k; key positions and key tiles
of 32 at budgets 10 / 30 / 50 % without a floor), plus one short setting (512 tokens, tile 16, 25 %) for the 8B and
SmolLM2 head shapes. Decode candidates: ``dense`` (two matmuls over the cache, read in place), ``flash``, ``xla``
(the dense baselines; the fastest is the reference), ``anchor_<g>@<budget>`` and ``reuse_<g>@<budget>``, and two
counter-examples: ``dense_seq`` (the dense step on a sequence-major copy: what the layout costs) and
``reuse_masked`` (a reuse layer at 10 % key tiles written as a mask over the whole cache: same selection, no
gather). Each row records every candidate's bytes (decode) or FLOPs (prefill) (`cost.attention_cost`) and achieved
rate. With ``gpu``: bfloat16, longer contexts, and ``cudnn`` (``jax.nn.dot_product_attention(implementation=
"cudnn")`` on its own ``[batch, L, heads, d]`` layout) among the dense baselines, into ``bench_attention_gpu.json``.

**End to end** (``bench_e2e_cpu.json``): SmolLM2-135M through its one forward step (`model.make_forward`), float32.
Paths: ``dense`` (the model's default; in prefill the ``[T, T]`` scores, up to 2k tokens), ``flash`` (prefill only)
and the registry's ``kascade_<granularity>@<budget>`` (`methods.speed_grid`), with the schedule the accuracy tables
use. Prefill = one forward of ``context`` WikiText-2 tokens (last position's logits only); decode = one step after
``context`` cached positions (random keys and values: what a step costs does not depend on them), the cache donated.
Each row: per path its FLOPs or bytes (`cost.model_step_cost`), achieved rate, speed-up over the fastest dense path
and, in decode, its bytes-moved ceiling and how much of it the speed-up reaches. With ``gpu``: SmolLM2's shapes with
random bfloat16 weights and token ids, into ``bench_e2e_gpu.json``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from . import bench as B
from . import kernels as K
from .attention import NEG_INF
from .baselines import flash_dense_attention
from .config import LLAMA_3_1_8B, SMOLLM2_135M, LlamaConfig
from .cost import attention_cost, model_step_cost, whole_model_time
from .data import wikitext_windows
from .files import shipped_dir
from .kascade import GRANULARITIES, KascadeAttention, Selection, attend, keys_read, select
from .methods import speed_grid
from .model import KVCache, Llama, dense_attention, make_forward
from .models import smollm2_or_tiny
from .schedule import Schedule, default_schedule

BUDGETS = (0.1, 0.3, 0.5)
TILE = 32


def print_machine(machine: dict[str, float]) -> None:
    """One line: the copy and read bandwidth and matmul rate `bench.measure_machine` measured."""
    print(f"machine: copy {machine['copy_gb_per_s']:.1f} GB/s, read {machine['read_gb_per_s']:.1f} GB/s, "
          f"matmul {machine['matmul_gflop_per_s']:.0f} GFLOP/s", flush=True)


# ------------------------------------------------------------------------------------------------ attention op
DENSE_DECODE = ("dense", "flash", "xla", "cudnn")
DENSE_PREFILL = ("flash", "xla", "cudnn")


def masked_decode(q: jax.Array, k: jax.Array, v: jax.Array, sel: Selection, kv_len: int) -> jax.Array:
    """A reuse step written as a mask: scores over the whole head-major cache ``[batch, kv_heads, L, d]``, every key
    outside ``sel``'s tiles masked, softmax, values over the whole cache. Same output as `kascade.attend` (up to
    float rounding), dense cost. q: ``[batch, 1, heads, d]`` -> ``[batch, heads, d]``."""
    b, h, length, d = k.shape
    tiles = jnp.zeros((b, h, length // sel.unit), bool)
    rows = (jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None], sel.idx[:, :, 0, 0])
    mask = jnp.repeat(tiles.at[rows].set(sel.keep[:, :, 0, 0]), sel.unit, axis=-1)
    mask = mask | (jnp.arange(length) == kv_len - 1)                    # the query's own key
    qg = q[:, 0].astype(jnp.float32).reshape(b, h, -1, d) * d ** -0.5
    s = jnp.einsum("bhgd,bhnd->bhgn", qg, k, preferred_element_type=jnp.float32)
    p = jax.nn.softmax(jnp.where(mask[:, :, None] & (jnp.arange(length) < kv_len), s, NEG_INF), axis=-1)
    return jnp.einsum("bhgn,bhnd->bhgd", p, v, preferred_element_type=jnp.float32).reshape(b, -1, d)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool,
                    kv_len: int | None = None) -> tuple[Callable[[], Any] | None, str]:
    """``(callable, "")`` timing cuDNN's fused attention on ``[batch, L, kv_heads, d]`` copies of head-major k, v, or
    ``(None, reason)`` where this backend has no cuDNN (any CPU) or the call fails."""
    if jax.default_backend() != "gpu":
        return None, f"skipped: no cuDNN on the {jax.default_backend()} backend"
    ks, vs = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    lengths = None if kv_len is None else jnp.full((q.shape[0],), kv_len, jnp.int32)
    fn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn",
                                                              key_value_seq_lengths=lengths))
    try:
        jax.block_until_ready(fn(q, ks, vs))
    except Exception as e:  # noqa: BLE001 ; an unsupported shape or dtype: record why, time the rest
        return None, f"skipped: cuDNN failed: {str(e).splitlines()[0][:200]}"
    return (lambda: fn(q, ks, vs)), ""


def op_settings(budgets: tuple[float, ...]) -> list[tuple[str, float]]:
    """``(granularity, budget)`` of every Kascade setting timed."""
    return [(g, b) for b in budgets for g in GRANULARITIES]


def sparse_pair(q: jax.Array, k: jax.Array, v: jax.Array, *, q_offset: int, t: int, unit: int, q_tile: int,
                budget: float) -> tuple[Callable, Callable]:
    """An anchor (select + attend) and a reuse (attend over the anchor's selection) step, zero-argument callables."""
    choose = lambda q, k: select(q, k, q_offset, q_offset + t, q_tile=q_tile, unit=unit, pool="group",  # noqa: E731
                                 budget=budget, min_keys=0)
    anchor = jax.jit(lambda q, k, v: attend(q, k, v, choose(q, k), q_offset, q_offset + t))
    sel = jax.jit(choose)(q, k)  # what a reuse layer receives (head map = identity: same cost)
    reuse = jax.jit(lambda q, k, v, s: attend(q, k, v, s, q_offset, q_offset + t))
    return (lambda: anchor(q, k, v)), (lambda: reuse(q, k, v, sel))


def op_decode_candidates(cfg: LlamaConfig, context: int, tile: int, budgets: tuple[float, ...],
                      dtype: Any = jnp.float32) -> tuple[dict[str, Callable], dict]:
    """Zero-argument callables for one decode step at ``context`` cached keys."""
    q, k, v = B.random_qkv(jax.random.PRNGKey(context), 1, 1, context, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                           dtype)
    ks, vs, q1, n = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), q[:, 0], context
    jit = jax.jit
    dense = jit(lambda q, k, v: K.dense_decode_attention(q, k, v, n))
    dense_s = jit(lambda q, k, v: K.dense_decode_attention(q, k, v, n, layout="seq"))
    flash = jit(lambda q, k, v: K.flash_attention(q, k, v, q_offset=n - 1, kv_len=n, block_k=min(4096, n)))
    xla = jit(lambda q, k, v: K.xla_attention(q, k, v, q_offset=n - 1, kv_len=n))
    tile_sel = jit(lambda q, k: select(q, k, n - 1, n, q_tile=1, unit=tile, pool="group", budget=budgets[0],
                                       min_keys=0))(q, k)
    masked = jit(lambda q, k, v, s: masked_decode(q, k, v, s, n))
    cands = {"dense": lambda: dense(q1, k, v), "dense_seq": lambda: dense_s(q1, ks, vs),
             "flash": lambda: flash(q, k, v), "xla": lambda: xla(q, k, v),
             "reuse_masked": lambda: masked(q, k, v, tile_sel)}
    for g, b in op_settings(budgets):
        cands[f"anchor_{g}@{b:g}"], cands[f"reuse_{g}@{b:g}"] = sparse_pair(
            q, k, v, q_offset=n - 1, t=1, unit=tile if g == "tile" else 1, q_tile=1, budget=b)
    cudnn, why = cudnn_attention(q, k, v, causal=False, kv_len=n)
    if cudnn is not None:
        cands["cudnn"] = cudnn
    return cands, {"cudnn": why} if why else {}


def op_prefill_candidates(cfg: LlamaConfig, t: int, tile: int, budgets: tuple[float, ...],
                       dtype: Any = jnp.float32) -> tuple[dict[str, Callable], dict]:
    """Zero-argument callables for a causal prefill of ``t`` tokens; dense XLA skipped when it would not fit."""
    q, k, v = B.random_qkv(jax.random.PRNGKey(t), 1, t, t, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, dtype)
    flash = jax.jit(lambda q, k, v: K.flash_attention(q, k, v))
    cands = {"flash": lambda: flash(q, k, v)}
    for g, b in op_settings(budgets):
        cands[f"anchor_{g}@{b:g}"], cands[f"reuse_{g}@{b:g}"] = sparse_pair(
            q, k, v, q_offset=0, t=t, unit=tile if g == "tile" else 1, q_tile=tile, budget=b)
    skipped = {}
    score_bytes = K.xla_attention_bytes(t, t, cfg.num_heads)
    if score_bytes <= B.MEMORY_LIMIT_BYTES:
        xla = jax.jit(lambda q, k, v: K.xla_attention(q, k, v))
        cands["xla"] = lambda: xla(q, k, v)
    else:
        skipped["xla"] = f"skipped: the [{cfg.num_heads}, {t}, {t}] float32 scores need {score_bytes / 1e9:.1f} GB"
    cudnn, why = cudnn_attention(q, k, v, causal=True)
    if cudnn is not None:
        cands["cudnn"] = cudnn
    else:
        skipped["cudnn"] = why
    return cands, skipped


def op_costs(cfg: LlamaConfig, phase: str, context: int, tile: int, budgets: tuple[float, ...], names: list[str],
          bytes_per_value: int) -> dict[str, dict[str, float]]:
    """`cost.attention_cost` of every candidate (dense baselines and counter-examples cost a dense layer)."""
    def cost(kind: str, keep: int) -> dict[str, float]:
        return attention_cost(phase, kind, context, keep, q_heads=cfg.num_heads, kv_heads=cfg.num_kv_heads,
                              head_dim=cfg.head_dim, bytes_per_value=bytes_per_value)
    out = {n: cost("dense", context) for n in names}
    for g, b in op_settings(budgets):
        keep = keys_read(context, phase=phase, granularity=g, tile=tile, budget=b, min_keys=0)
        out[f"anchor_{g}@{b:g}"], out[f"reuse_{g}@{b:g}"] = cost("anchor", keep), cost("reuse", keep)
    return {n: c for n, c in out.items() if n in names}


def op_summary(phase: str, times: dict[str, dict], cost: dict[str, dict], schedule,
              budgets: tuple[float, ...]) -> dict[str, Any]:
    """Per setting: anchor, reuse and whole-model speed-ups (median ratios) over the fastest dense baseline; the
    achieved rate of every candidate (GB/s in decode, GFLOP/s in prefill)."""
    dense_names = [n for n in (DENSE_DECODE if phase == "decode" else DENSE_PREFILL) if n in times]
    best = min(dense_names, key=lambda n: times[n]["median_s"])
    t = times[best]["median_s"]
    out: dict[str, Any] = {"best_dense": best, "vs_best": {}}
    for g, b in op_settings(budgets):
        anchor, reuse = times[f"anchor_{g}@{b:g}"]["median_s"], times[f"reuse_{g}@{b:g}"]["median_s"]
        whole = whole_model_time(schedule, t, anchor, reuse)
        out["vs_best"][f"{g}@{b:g}"] = {
            "anchor": t / anchor, "reuse": t / reuse, "whole_model": schedule.num_layers * t / whole,
            # layer 0 also has to emit Top-k: count it as dense + a full anchor step (an upper bound on the cost)
            "whole_model_conservative": schedule.num_layers * t / (whole + anchor)}
    if phase == "decode":
        out["gb_per_s"] = B.rates(times, {n: c["bytes"] for n, c in cost.items()}, "gb")
    else:
        out["gflop_per_s"] = B.rates(times, {n: c["flops"] for n, c in cost.items()}, "gflop")
    return out


def op_grid(cfg: LlamaConfig, *, phase: str, contexts: list[int], tile: int, budgets: tuple[float, ...], reps: int,
             schedule, dtype: Any = jnp.float32) -> list[dict]:
    """Time every candidate at every context; one row per context."""
    rows = []
    for n in contexts:
        make = op_decode_candidates if phase == "decode" else op_prefill_candidates
        cands, skipped = make(cfg, n, tile, budgets, dtype)
        times = B.compare(cands, reps=reps)
        cost = op_costs(cfg, phase, n, tile, budgets, list(times), jnp.dtype(dtype).itemsize)
        row = {"phase": phase, "context": n, "tile": tile,
               "keep_keys": {f"{g}@{b:g}": keys_read(n, phase=phase, granularity=g, tile=tile, budget=b, min_keys=0)
                             for g, b in op_settings(budgets)},
               "times": times, "cost": cost, "skipped": skipped, "speedup": op_summary(phase, times, cost, schedule,
                                                                                      budgets)}
        s = row["speedup"]
        print(f"{phase:7s} {n:6d}  best dense {s['best_dense']:6s} {times[s['best_dense']]['median_s'] * 1e3:9.1f} ms  "
              + "  ".join(f"{k} reuse x{v['reuse']:.2f} whole x{v['whole_model']:.2f}"
                          for k, v in s["vs_best"].items()),
              flush=True)
        rows.append(row)
    return rows


def shape_config(cfg: LlamaConfig, dtype: str = "float32", **extra: Any) -> dict[str, Any]:
    return {"q_heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "batch": 1,
            "dtype": dtype, "cache": "head-major [batch, kv_heads, L, head_dim]", **extra}


def run_attention(out: Path, command: str, *, smoke: bool, gpu: bool = False, only: str | None = None) -> None:
    """The attention-op benchmark into ``out`` (``only``: ``"attention"`` or ``"headline"``, one of its two files)."""
    cfg, tile = LLAMA_3_1_8B, TILE
    schedule = default_schedule("llama-3.1-8b", cfg.num_layers, cfg.num_kv_heads, 5, tile, 0.1)
    dtype, name = (jnp.bfloat16, "bfloat16") if gpu else (jnp.float32, "float32")
    machine = B.measure_machine(64, 256, reps=2) if smoke else B.measure_machine()
    print_machine(machine)
    if only != "headline":
        decode = [512, 1024] if smoke else [8192, 32768, 131072] if gpu else [2048, 4096, 8192, 16384, 32768]
        prefill = [256, 512] if smoke else [8192, 32768] if gpu else [2048, 4096, 8192, 16384]
        budgets = (0.1, 0.5) if smoke else BUDGETS
        reps = 2 if smoke else 30 if gpu else 7
        rows = op_grid(cfg, phase="decode", contexts=decode, tile=tile, budgets=budgets, reps=reps,
                       schedule=schedule, dtype=dtype)
        rows += op_grid(cfg, phase="prefill", contexts=prefill, tile=tile, budgets=budgets,
                        reps=2 if smoke else 10 if gpu else 2, schedule=schedule, dtype=dtype)
        config = shape_config(cfg, name, model="llama-3.1-8b (attention shape only; random q/k/v)", tile=tile,
                              budgets=list(budgets), min_keys=0, schedule=B.schedule_summary(schedule),
                              machine=machine, smoke=smoke)
        target = "bench_attention_gpu.json" if gpu else "bench_attention_cpu.json"
        B.write_results(out / target, command, config, rows, smoke=smoke)
    if only != "attention" and not gpu:
        rows = []
        for name, shape in (("llama-3.1-8b", cfg), ("smollm2-135m", SMOLLM2_135M)):
            sched = default_schedule(name, shape.num_layers, shape.num_kv_heads, 5, 16, 0.25)
            for phase in ("decode", "prefill"):
                for row in op_grid(shape, phase=phase, contexts=[512], tile=16, budgets=(0.25,),
                                   reps=3 if smoke else 15, schedule=sched):
                    rows.append({"shape": name, **row})
        config = {"setting": "512 tokens, tile 16, 8 of 32 tiles (budget 25 %)", "dtype": "float32", "batch": 1,
                  "machine": machine, "smoke": smoke}
        B.write_results(out / "bench_headline_cpu.json", command, config, rows, smoke=smoke)


# ------------------------------------------------------------------------------------------------ end to end
SCHEDULE = "schedules/smollm2-135m_greedy.json"
DENSE_PREFILL_LIMIT = 2048  # the materialised [T, T] scores of `dense` prefill: 9 x 8k x 8k floats per layer above


def step_costs(cfg: Any, schedule: Schedule, policies: dict[str, Any], context: int, phase: str,
         bytes_per_value: int) -> dict[str, dict[str, float]]:
    """`cost.model_step_cost` of each path: ``{name: {"flops", "bytes", "keys"}}`` (keys: per sparse query)."""
    out = {}
    for name, pol in policies.items():
        sparse = isinstance(pol, KascadeAttention)
        keys = (keys_read(context, phase=phase, granularity=pol.granularity, tile=pol.q_tile,
                          budget=pol.budget_value, min_keys=pol.min_keys_value) if sparse else context)
        cost = model_step_cost(cfg, context, phase=phase, layer_types=schedule.layer_types if sparse else None,
                               keep_keys=keys, bytes_per_value=bytes_per_value)
        out[name] = {**cost, "keys": keys}
    return out


def step_summary(phase: str, times: dict[str, dict], costs: dict[str, dict], dense_names: list[str]) -> dict[str, Any]:
    """Speed-ups over the fastest dense path, achieved rates and (decode) the bytes-moved ceilings."""
    best = min((n for n in dense_names if n in times), key=lambda n: times[n]["median_s"])
    row: dict[str, Any] = {"best_dense": best, "speedup": {n: B.speedup(times[best], t) for n, t in times.items()}}
    if phase == "decode":
        row["gb_per_s"] = B.rates(times, {n: c["bytes"] for n, c in costs.items()}, "gb")
        row["ceiling"] = {n: costs[best]["bytes"] / c["bytes"] for n, c in costs.items()}
        row["of_ceiling"] = {n: row["speedup"][n] / row["ceiling"][n] for n in times}
    else:
        row["gflop_per_s"] = B.rates(times, {n: c["flops"] for n, c in costs.items()}, "gflop")
    return row


def random_cache(cfg: Any, context: int, dtype: Any) -> KVCache:
    """A cache of ``context`` filled positions (random keys and values) with room for one more tile."""
    shape = (1, cfg.num_kv_heads, context + TILE, cfg.head_dim)
    key = jax.random.PRNGKey(context)
    layer = lambda i: jax.random.normal(jax.random.fold_in(key, i), shape, dtype)  # noqa: E731
    return KVCache(tuple(layer(2 * i) for i in range(cfg.num_layers)),
                   tuple(layer(2 * i + 1) for i in range(cfg.num_layers)), jnp.int32(context))


def step_decode_candidates(model: Llama, policies: dict[str, Any], context: int) -> dict[str, Callable[[], Any]]:
    """One decode step per policy, all on one shared cache that each step donates and hands to the next (its
    length reset to ``context``, so every step writes the same slot)."""
    shared = [random_cache(model.cfg, context, model.dtype)]
    token = jnp.ones((1, 1), jnp.int32)

    def candidate(step: Callable) -> Callable[[], Any]:
        def run() -> Any:
            logits, shared[0], _ = step(token, dataclasses.replace(shared[0], length=jnp.int32(context)))
            return logits, shared[0]
        return run

    return {name: candidate(make_forward(model, pol, donate=True)) for name, pol in policies.items()}


def step_rows(model: Llama, schedule: Schedule, text: jax.Array, *, phase: str, contexts: list[int], reps: int,
        budgets: tuple[float, ...]) -> list[dict[str, Any]]:
    """One row per context of ``phase``: times, costs and `step_summary`."""
    sparse = speed_grid(schedule, budgets)
    bpv = jnp.dtype(model.dtype).itemsize
    rows = []
    for context in contexts:
        if phase == "decode":
            policies = {"dense": dense_attention, **sparse}
            cands = step_decode_candidates(model, policies, context)
            dense_names = ["dense"]
        else:
            policies = {**({"dense": dense_attention} if context <= DENSE_PREFILL_LIMIT else {}),
                        "flash": flash_dense_attention, **sparse}
            tokens = text[:, :context]
            cands = {n: (lambda f=make_forward(model, p, last_only=True): f(tokens, None)[0])
                     for n, p in policies.items()}
            dense_names = ["dense", "flash"]
        times = B.compare(cands, reps=reps)
        costs = step_costs(model.cfg, schedule, policies, context, phase, bpv)
        row = {"phase": phase, "context": context, "times": times, "cost": costs,
               "settings": {n: {"granularity": p.granularity, "budget": p.budget_value, "min_keys": p.min_keys_value}
                            for n, p in sparse.items()},
               "skipped": {} if "dense" in policies else
               {"dense": f"skipped above {DENSE_PREFILL_LIMIT} tokens ([T, T] scores; flash is the dense path)"},
               **step_summary(phase, times, costs, dense_names)}
        rate = row.get("gb_per_s") or row.get("gflop_per_s")
        best = row["best_dense"]
        print(f"{phase:7s} {context:6d}: best dense {best} {times[best]['median_s'] * 1e3:8.1f}"
              f" ms ({rate[best]:.1f} {'GB/s' if phase == 'decode' else 'GFLOP/s'}); "
              + ", ".join(f"{n.removeprefix('kascade_')} x{row['speedup'][n]:.2f}" for n in sparse), flush=True)
        rows.append(row)
    return rows


def run_e2e(out: Path, command: str, *, smoke: bool, gpu: bool = False) -> Path:
    """The end-to-end benchmark into ``out``; returns the file written."""
    if smoke:
        prefill, decode, budgets = [256], [256, 512], (0.1, 0.5)
    elif gpu:
        prefill, decode, budgets = [2048, 8192], [8192, 32768], BUDGETS
    else:
        prefill, decode, budgets = [512, 2048, 8192], [512, 2048, 8192, 16384, 32768], BUDGETS
    if gpu and not smoke:
        model = Llama(SMOLLM2_135M, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    else:
        model = smollm2_or_tiny(smoke)
    cfg = model.cfg
    schedule = (default_schedule("tiny", cfg.num_layers, cfg.num_kv_heads, 2, TILE, 0.1) if smoke
                else Schedule.load(shipped_dir() / SCHEDULE))
    text = (jax.random.randint(jax.random.PRNGKey(0), (1, max(prefill)), 0, cfg.vocab_size, jnp.int32) if gpu
            else jnp.asarray(wikitext_windows("test", max(prefill), 1), jnp.int32))
    machine = B.measure_machine(64, 256, reps=2) if smoke else B.measure_machine()
    print_machine(machine)
    rows = step_rows(model, schedule, text, phase="decode", contexts=decode, reps=3 if smoke else 7, budgets=budgets)
    rows += step_rows(model, schedule, text, phase="prefill", contexts=prefill, reps=2 if smoke else 1,
                      budgets=budgets)
    model_name = ("tiny random Llama (smoke)" if smoke else "SmolLM2-135M shapes, random weights" if gpu
                  else "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to float32)")
    config = {"model": model_name, "dtype": str(jnp.dtype(model.dtype)), "batch": 1, "cache": "head-major",
              "tile": TILE, "budgets": list(budgets), "schedule": B.schedule_summary(schedule), "machine": machine,
              "prefill_tokens": "random ids" if gpu else "WikiText-2 test, first window",
              "decode_cache": "random keys and values", "smoke": smoke}
    target = out / ("bench_e2e_gpu.json" if gpu else "bench_e2e_cpu.json")
    B.write_results(target, command, config, rows, smoke=smoke)
    return target
