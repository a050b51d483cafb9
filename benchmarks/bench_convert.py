"""Peak memory and wall time of `convert_checkpoint` on a Llama-3.1-8B-shaped checkpoint and on SmolLM2's GGUF.

The 8B checkpoint is synthetic (random bf16 values, exact Llama-3.1-8B tensor names and shapes, sharded in ~5 GB
files with ``model.safetensors.index.json`` like the real release); it is written to a temporary directory under
``--tmp`` (``/tmp``), converted to bfloat16 in a child process whose resident memory is sampled from
``/proc/<pid>/status`` every ``--interval`` seconds (and read back as ``ru_maxrss``), then deleted.

    python benchmarks/bench_convert.py --out data/bench_convert.json   # full size (~16 GB written + ~16 GB converted)
    python benchmarks/bench_convert.py --scale 0.05 --out /tmp/bench_convert_small.json   # quick check
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from kascade_lite.checkpoints import HF_GLOBAL, HF_LAYER
from kascade_lite.config import LLAMA_3_1_8B, LlamaConfig
from kascade_lite.convert import write_safetensors
from kascade_lite.data import smollm2_gguf_path
from kascade_lite.files import provenance, write_json_atomic
from kascade_lite.model import LAYER_TENSORS, expected_shapes

SHARD_BYTES = 5_000_000_000  # transformers' default max_shard_size ("5GB"), which the real checkpoint used
TARGET_PEAK_RSS_MB = 2048


def scaled_config(scale: float) -> LlamaConfig:
    """Llama-3.1-8B at ``scale`` = 1, otherwise every width (and the depth) shrunk by about ``scale``."""
    if scale >= 1:
        return LLAMA_3_1_8B
    c = LLAMA_3_1_8B
    hidden = max(512, round(c.hidden_size * scale / 512) * 512)
    heads = hidden // c.head_dim
    return LlamaConfig(vocab_size=max(1024, round(c.vocab_size * scale)), hidden_size=hidden,
                       intermediate_size=max(512, round(c.intermediate_size * scale / 256) * 256),
                       num_layers=max(2, round(c.num_layers * scale)), num_heads=heads,
                       num_kv_heads=max(1, heads // c.group_size), head_dim=c.head_dim, rope_theta=c.rope_theta,
                       rope_scaling=c.rope_scaling, max_position_embeddings=c.max_position_embeddings)


def hf_tensors(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor names and stored (``[out, in]``) shapes, in checkpoint order."""
    ours = expected_shapes(cfg)
    out = {HF_GLOBAL["embed"].key: ours["embed"]}
    for i in range(cfg.num_layers):
        for short, hf in HF_LAYER.items():
            shape = ours[f"layers.{i}.{short}"]
            out[f"model.layers.{i}.{hf}"] = shape[::-1] if len(LAYER_TENSORS[short].split(",")) == 2 else shape
    out[HF_GLOBAL["final_norm"].key] = ours["final_norm"]
    out[HF_GLOBAL["lm_head"].key] = ours["lm_head"][::-1]
    return out


def write_synthetic_checkpoint(cfg: LlamaConfig, root: Path) -> int:
    """Write a sharded bf16 HF checkpoint of ``cfg`` (random values) to ``root``; return its size in bytes."""
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    base = (0.02 * np.random.default_rng(0).standard_normal(1 << 24)).astype(ml_dtypes.bfloat16)
    shapes = hf_tensors(cfg)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map = {}
    for k, names in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(root / file, names, shapes, ml_dtypes.bfloat16, lambda n: np.resize(base, shapes[n]))
        weight_map.update({n: file for n in names})
    total = sum(int(np.prod(s)) * 2 for s in shapes.values())
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return total


def measure(code: str, interval: float) -> dict:
    """Run ``python -c code`` in a child; sample its RSS; return wall time, peak RSS and the sampled timeline."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code])
    timeline: list[list[float]] = []
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            rss_kb = next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmRSS"))
            timeline.append([round(time.perf_counter() - t0, 3), round(rss_kb / 1024, 1)])
        except (OSError, StopIteration):
            pass
        time.sleep(interval)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"child failed with exit code {proc.returncode}: {code}")
    maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    peak = maxrss / 1024 if maxrss > before else max((r for _, r in timeline), default=float("nan"))
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(peak, 1), "rss_timeline_mb": thin(timeline, 400)}


def thin(series: list[list[float]], n: int) -> list[list[float]]:
    """At most about ``n`` points, keeping the maximum of each stretch (so the peak survives)."""
    if len(series) <= n:
        return series
    step = -(-len(series) // n)
    return [max(series[i:i + step], key=lambda p: p[1]) for i in range(0, len(series), step)]


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir())


def convert_code(src: Path, out: Path, dtype: str) -> str:
    return (f"from kascade_lite.convert import convert_checkpoint; "
            f"convert_checkpoint({str(src)!r}, {str(out)!r}, dtype={dtype!r}, progress=False)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=1.0, help="1 = real Llama-3.1-8B shapes; smaller for a quick run")
    ap.add_argument("--tmp", default="/tmp", help="where the synthetic checkpoint and its conversion are written")
    ap.add_argument("--interval", type=float, default=0.05, help="RSS sampling period in seconds")
    ap.add_argument("--out", required=True, help="JSON path (data/bench_convert.json updates the published result)")
    ap.add_argument("--smoke", action="store_true", help="--scale 0.01 (recorded as smoke)")
    args = ap.parse_args()
    if args.smoke:
        args.scale = 0.01

    cfg = scaled_config(args.scale)
    runs = []
    # fixed cost: a child that only imports the converter (Python, NumPy, JAX)
    base = measure("import kascade_lite.convert", args.interval)
    runs.append({"name": "import only", **base})
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="kascade-bench-convert-") as tmp:
        work = Path(tmp)
        free = shutil.disk_usage(work).free
        need = 2.2 * sum(int(np.prod(s)) * 2 for s in hf_tensors(cfg).values())
        if free < need:
            raise SystemExit(f"{work}: {free / 1e9:.1f} GB free, need about {need / 1e9:.1f} GB")
        t0 = time.perf_counter()
        src_bytes = write_synthetic_checkpoint(cfg, work / "src")
        print(f"wrote {src_bytes / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s", flush=True)
        res = measure(convert_code(work / "src", work / "out", "bfloat16"), args.interval)
        runs.append({"name": "llama-3.1-8b-synthetic" if args.scale >= 1 else f"llama-3.1-8b-synthetic x{args.scale}",
                     "source_format": "hf-safetensors (sharded, bf16)", "dtype": "bfloat16",
                     "num_shards": len(list((work / "src").glob("*.safetensors"))), "source_bytes": src_bytes,
                     "output_bytes": dir_bytes(work / "out"), "config": cfg.to_dict(), **res})
        print(f"8B-shaped: {res['wall_s']} s, peak RSS {res['peak_rss_mb']} MB", flush=True)
        gguf = smollm2_gguf_path()
        res = measure(convert_code(gguf, work / "smollm2", "float32"), args.interval)
        runs.append({"name": "smollm2-135m-gguf", "source_format": "gguf (Q4_1)", "dtype": "float32",
                     "source_bytes": gguf.stat().st_size, "output_bytes": dir_bytes(work / "smollm2"), **res})
        print(f"SmolLM2 GGUF: {res['wall_s']} s, peak RSS {res['peak_rss_mb']} MB", flush=True)
    cmd = "python benchmarks/bench_convert.py" + "".join(
        f" --{k} {v}" for k, v in (("scale", args.scale), ("out", args.out)) if v != ap.get_default(k)) + (" --smoke" if args.smoke else "")
    write_json_atomic(args.out, {"provenance": provenance(cmd, smoke=args.smoke), "target_peak_rss_mb": TARGET_PEAK_RSS_MB,
                                 "scale": args.scale, "runs": runs})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
