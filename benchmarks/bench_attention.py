"""Attention-op benchmark: Kascade anchor / reuse layers (`kascade.py`, key tiles) vs dense baselines, one process,
median of repetitions.

    python benchmarks/bench_attention.py --out data        # Llama-3.1-8B shape, ~15 min on 2 CPU cores
    python benchmarks/bench_attention.py --smoke           # tiny sizes (CI), writes to a temporary folder unless --out
    python benchmarks/bench_attention.py --gpu --out data  # on a GPU (benchmarks/gpu.sh): bf16, + cuDNN, longer

Writes ``bench_attention_cpu.json`` (decode 2k-32k, prefill 2k-16k, tile 32, budget 10 %) and
``bench_headline_cpu.json`` (the design's headline setting: 512 tokens, tile 16, 8 of 32 tiles, for the
Llama-3.1-8B and SmolLM2-135M head shapes). Times are per layer, batch 1, float32, on the model's head-major cache
``[batch, kv_heads, L, head_dim]``. Decode candidates: ``dense`` (two matmuls over the cache), ``flash``, ``xla``
(the dense baselines; the best of them is the reference), ``anchor`` and ``reuse`` (Kascade), and two
counter-examples that are not baselines: ``dense_seq`` (the same dense step on a sequence-major ``[batch, L,
kv_heads, head_dim]`` copy: what the layout costs) and ``reuse_masked`` (a reuse layer written as a mask over the
whole cache: the same selection, no gather). With ``--gpu`` the run is in bfloat16 at longer contexts, adds
``cudnn`` (``jax.nn.dot_product_attention(implementation="cudnn")`` on its own ``[batch, L, heads, d]`` layout, the
fused dense kernel a GPU user would compare against) and writes ``bench_attention_gpu.json`` only.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from kascade_lite import bench as B
from kascade_lite import kernels as K
from kascade_lite.attention import NEG_INF
from kascade_lite.config import LLAMA_3_1_8B, SMOLLM2_135M, LlamaConfig
from kascade_lite.cost import whole_model_time
from kascade_lite.kascade import Selection, attend, select, tiles_kept
from kascade_lite.schedule import default_schedule

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


def decode_candidates(cfg: LlamaConfig, context: int, tile: int, budget: float,
                      dtype: Any = jnp.float32) -> tuple[dict[str, Callable], dict]:
    """Zero-argument callables for one decode step at ``context`` cached keys."""
    q, k, v = B.random_qkv(jax.random.PRNGKey(context), 1, 1, context, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                           dtype)
    ks, vs, q1, n = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), q[:, 0], context
    jit = jax.jit
    choose = lambda q, k: select(q, k, n - 1, n, q_tile=1, unit=tile, pool="group", budget=budget,  # noqa: E731
                                 min_keys=0)
    anchor = jit(lambda q, k, v: attend(q, k, v, choose(q, k), n - 1, n))
    sel = jit(choose)(q, k)  # what a reuse layer receives (head map = identity: same cost)
    reuse = jit(lambda q, k, v, s: attend(q, k, v, s, n - 1, n))
    masked = jit(lambda q, k, v, s: masked_decode(q, k, v, s, n))
    dense = jit(lambda q, k, v: K.dense_decode_attention(q, k, v, n))
    dense_s = jit(lambda q, k, v: K.dense_decode_attention(q, k, v, n, layout="seq"))
    flash = jit(lambda q, k, v: K.flash_attention(q, k, v, q_offset=n - 1, kv_len=n, block_k=min(4096, n)))
    xla = jit(lambda q, k, v: K.xla_attention(q, k, v, q_offset=n - 1, kv_len=n))
    cands = {
        "dense": lambda: dense(q1, k, v), "dense_seq": lambda: dense_s(q1, ks, vs),
        "flash": lambda: flash(q, k, v), "xla": lambda: xla(q, k, v),
        "anchor": lambda: anchor(q, k, v), "reuse": lambda: reuse(q, k, v, sel),
        "reuse_masked": lambda: masked(q, k, v, sel),
    }
    cudnn, why = cudnn_attention(q, k, v, causal=False, kv_len=n)
    if cudnn is not None:
        cands["cudnn"] = cudnn
    return cands, {"cudnn": why} if why else {}


def prefill_candidates(cfg: LlamaConfig, t: int, tile: int, budget: float,
                       dtype: Any = jnp.float32) -> tuple[dict[str, Callable], dict]:
    """Zero-argument callables for a causal prefill of ``t`` tokens; dense XLA skipped when it would not fit."""
    q, k, v = B.random_qkv(jax.random.PRNGKey(t), 1, t, t, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, dtype)
    choose = lambda q, k: select(q, k, 0, t, q_tile=tile, unit=tile, pool="group", budget=budget,  # noqa: E731
                                 min_keys=0)
    anchor = jax.jit(lambda q, k, v: attend(q, k, v, choose(q, k), 0, t))
    sel = jax.jit(choose)(q, k)
    reuse = jax.jit(lambda q, k, v, s: attend(q, k, v, s, 0, t))
    flash = jax.jit(lambda q, k, v: K.flash_attention(q, k, v))
    cands = {"flash": lambda: flash(q, k, v), "anchor": lambda: anchor(q, k, v), "reuse": lambda: reuse(q, k, v, sel)}
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


def summarise(phase: str, times: dict[str, dict], schedule) -> dict[str, Any]:
    """Speedups (median ratios) of anchor, reuse and the whole-model mix vs each dense baseline and the best one."""
    dense_names = [n for n in (DENSE_DECODE if phase == "decode" else DENSE_PREFILL) if n in times]
    best = min(dense_names, key=lambda n: times[n]["median_s"])
    anchor, reuse = times["anchor"]["median_s"], times["reuse"]["median_s"]
    out: dict[str, Any] = {"best_dense": best}
    for name in dense_names + ["best"]:
        t = times[best if name == "best" else name]["median_s"]
        whole_dense = schedule.num_layers * t
        out[f"vs_{name}"] = {
            "anchor": t / anchor, "reuse": t / reuse,
            "whole_model": whole_dense / whole_model_time(schedule, t, anchor, reuse),
            # layer 0 also has to emit Top-k: count it as dense + a full anchor step (an upper bound on the cost)
            "whole_model_conservative": whole_dense / (whole_model_time(schedule, t, anchor, reuse) + anchor),
        }
    return out


def run_grid(cfg: LlamaConfig, *, phase: str, contexts: list[int], tile: int, budget: float, reps: int,
             schedule, dtype: Any = jnp.float32) -> list[dict]:
    """Time every candidate at every context; one row per context."""
    rows = []
    for n in contexts:
        keep = tiles_kept(n, tile, budget, 0)
        make = decode_candidates if phase == "decode" else prefill_candidates
        cands, skipped = make(cfg, n, tile, budget, dtype)
        times = B.compare(cands, reps=reps)
        row = {"phase": phase, "context": n, "tile": tile, "keep_tiles": keep, "keep_keys": keep * tile,
               "times": times, "skipped": skipped}
        row["speedup"] = summarise(phase, times, schedule)
        best = row["speedup"]["vs_best"]
        print(f"{phase:7s} {n:6d}  best dense {row['speedup']['best_dense']:11s} "
              f"{times[row['speedup']['best_dense']]['median_s'] * 1e3:9.1f} ms  "
              f"anchor x{best['anchor']:.2f}  reuse x{best['reuse']:.2f}  whole x{best['whole_model']:.2f}",
              flush=True)
        rows.append(row)
    return rows


def shape_config(cfg: LlamaConfig, dtype: str = "float32", **extra: Any) -> dict[str, Any]:
    return {"q_heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "batch": 1,
            "dtype": dtype, "cache": "head-major [batch, kv_heads, L, head_dim]", **extra}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    p.add_argument("--out", type=Path, help="output folder (required at full size, e.g. data/ to update the "
                                            "published results; with --smoke default: a new temporary folder)")
    p.add_argument("--only", choices=("attention", "headline"), help="run one of the two parts")
    p.add_argument("--gpu", action="store_true", help="the accelerator run (benchmarks/gpu.sh): bfloat16, longer "
                                                      "contexts, cuDNN; writes bench_attention_gpu.json only")
    args = p.parse_args(argv)
    if args.out is None and not args.smoke:
        p.error("--out is required at full size (e.g. --out data to update the published results)")
    out = args.out or Path(tempfile.mkdtemp(prefix="kascade-lite-smoke-"))
    command = ("python benchmarks/bench_attention.py " + shlex.join(sys.argv[1:] if argv is None else argv)).strip()
    cfg, tile, budget = LLAMA_3_1_8B, 32, 0.1
    schedule = default_schedule("llama-3.1-8b", cfg.num_layers, cfg.num_kv_heads, 5, tile, budget)
    dtype, name = (jnp.bfloat16, "bfloat16") if args.gpu else (jnp.float32, "float32")
    if args.only != "headline":
        decode = ([512, 1024] if args.smoke else [8192, 32768, 131072] if args.gpu
                  else [2048, 4096, 8192, 16384, 32768])
        prefill = [256, 512] if args.smoke else [8192, 32768] if args.gpu else [2048, 4096, 8192, 16384]
        reps = 2 if args.smoke else 30 if args.gpu else 7
        rows = run_grid(cfg, phase="decode", contexts=decode, tile=tile, budget=budget, reps=reps,
                        schedule=schedule, dtype=dtype)
        rows += run_grid(cfg, phase="prefill", contexts=prefill, tile=tile, budget=budget,
                         reps=2 if args.smoke else 10 if args.gpu else 2, schedule=schedule, dtype=dtype)
        config = shape_config(cfg, name, model="llama-3.1-8b (attention shape only; random q/k/v)", tile=tile,
                              budget=budget, schedule=B.schedule_summary(schedule), smoke=args.smoke)
        target = "bench_attention_gpu.json" if args.gpu else "bench_attention_cpu.json"
        B.write_results(out / target, command, config, rows, smoke=args.smoke)
    if args.only != "attention" and not args.gpu:
        rows = []
        for name, shape in (("llama-3.1-8b", cfg), ("smollm2-135m", SMOLLM2_135M)):
            sched = default_schedule(name, shape.num_layers, shape.num_kv_heads, 5, 16, 0.25)
            for phase in ("decode", "prefill"):
                for row in run_grid(shape, phase=phase, contexts=[512], tile=16, budget=0.25,
                                    reps=3 if args.smoke else 15, schedule=sched):
                    rows.append({"shape": name, **row})
        config = {"setting": "512 tokens, tile 16, 8 of 32 tiles (budget 25 %)", "dtype": "float32", "batch": 1,
                  "claim": "original guide: 1.8-2.2x on CPU", "smoke": args.smoke}
        B.write_results(out / "bench_headline_cpu.json", command, config, rows, smoke=args.smoke)
    print(f"wrote results to {out}")


if __name__ == "__main__":
    main()
