#!/usr/bin/env bash
# The accelerator run: one short pass (under 10 minutes on one H200) of the attention-op and end-to-end benchmarks
# in bfloat16, against cuDNN's fused attention, writing bench_attention_gpu.json and bench_e2e_gpu.json (device named
# in their provenance) into the folder given (default: data/, the published results).
#
#   bash benchmarks/gpu.sh            # on the GPU machine, from the repository root
#   bash benchmarks/gpu.sh "$OUT"     # the device tool's output folder
#
# It needs only JAX (with CUDA), Flax, NumPy, safetensors and tqdm, which the lent machine's image holds; the package
# is imported from the checkout (PYTHONPATH), nothing is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-data}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" XLA_PYTHON_CLIENT_PREALLOCATE=false
python3 -c "import jax; print('devices:', jax.devices()); assert jax.default_backend() == 'gpu', 'no GPU backend'"
timeout 420 python3 benchmarks/bench_attention.py --gpu --out "$out"
timeout 150 python3 benchmarks/bench_e2e.py --gpu --out "$out"
echo "gpu.sh: wrote $out/bench_attention_gpu.json and $out/bench_e2e_gpu.json"
