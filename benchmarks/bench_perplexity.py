"""WikiText-2 (raw, test) perplexity of SmolLM2-135M-Instruct: our JAX model against `transformers`.

Both read the same GGUF weights (ours through `convert.py`, transformers through its own GGUF loader), in float32,
on the same non-overlapping 512-token windows; the first ``--windows`` windows of the test split are used.

    python benchmarks/bench_perplexity.py --windows 64 --out data/perplexity.json
    python benchmarks/bench_perplexity.py --smoke --out /tmp/perplexity.json   # 2 windows of 128 tokens
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from kascade_lite.data import smollm2_gguf_path, wikitext_windows
from kascade_lite.eval import nll_per_window
from kascade_lite.files import provenance, write_json_atomic
from kascade_lite.models import load_smollm2


def transformers_nll(windows: np.ndarray, batch_size: int) -> np.ndarray:
    """Mean token NLL ``[n]`` of each window under transformers' LlamaForCausalLM (float32, GGUF weights)."""
    import torch
    import torch.nn.functional as F
    from kascade_lite.progress import tqdm
    from transformers import LlamaForCausalLM

    gguf = smollm2_gguf_path()
    model = LlamaForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for start in tqdm(range(0, len(windows), batch_size), desc="transformers nll", unit="batch"):
            x = torch.tensor(windows[start:start + batch_size], dtype=torch.long)
            logits = model(x).logits[:, :-1].float()
            nll = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none").mean(dim=1)
            out.append(nll.double().numpy())
    return np.concatenate(out)


def sig3(x: float) -> str:
    return f"{x:.3g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=64, help="number of 512-token windows (the test split has ~560)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--out", required=True, help="JSON path (data/perplexity.json updates the published result)")
    ap.add_argument("--smoke", action="store_true", help="2 windows of 128 tokens, batch 2 (recorded as smoke)")
    args = ap.parse_args()
    if args.smoke:
        args.windows, args.seq_len, args.batch_size = 2, 128, 2

    windows = wikitext_windows("test", args.seq_len, args.windows)
    t0 = time.perf_counter()
    ours = nll_per_window(load_smollm2(), windows, batch_size=args.batch_size)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = transformers_nll(windows, args.batch_size)
    t_ref = time.perf_counter() - t0
    ppl_ours, ppl_ref = float(np.exp(ours.mean())), float(np.exp(ref.mean()))
    rows = [{"implementation": "kascade-lite (JAX, float32)", "perplexity": ppl_ours,
             "seconds_including_load": round(t_ours, 1)},
            {"implementation": "transformers (PyTorch, float32)", "perplexity": ppl_ref,
             "seconds_including_load": round(t_ref, 1)}]
    result = {
        "provenance": provenance(f"python benchmarks/bench_perplexity.py --windows {args.windows}", smoke=args.smoke),
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32)",
        "dataset": "wikitext-2-raw-v1 test", "seq_len": args.seq_len, "windows": int(len(windows)),
        "tokens_predicted": int(len(windows) * (args.seq_len - 1)),
        "rows": rows,
        "relative_difference": abs(ppl_ours - ppl_ref) / ppl_ref,
        "max_window_nll_difference": float(np.abs(ours - ref).max()),
        "equal_to_3_significant_digits": sig3(ppl_ours) == sig3(ppl_ref),
    }
    write_json_atomic(args.out, result)
    print(f"perplexity over {len(windows)} windows: JAX {ppl_ours:.4f} ({t_ours:.0f} s), "
          f"transformers {ppl_ref:.4f} ({t_ref:.0f} s) -> {args.out}")


if __name__ == "__main__":
    main()
