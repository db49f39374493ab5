#!/usr/bin/env bash
# One command for a GPU machine that already has CUDA torch, triton, peft and transformers:
# build the package (CUDA extension included), run the whole test suite on the GPU, then the
# LLaMA-7B-shape benchmark; results go to benchmarks/results/<device>/ (and to $OUT if set).
#   bash benchmarks/run_gpu.sh [extra dcft-bench arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
python -m pip install --no-build-isolation --no-deps -q -e .
name=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
python -m pytest -q tests/ || status=$?
python -m dcft_kernels.bench --preset llama7b --out-dir "benchmarks/results/$name" "$@"
if [ -n "${OUT:-}" ]; then cp -r "benchmarks/results/$name" "$OUT/"; fi
exit "${status:-0}"
