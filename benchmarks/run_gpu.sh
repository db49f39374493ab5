#!/usr/bin/env bash
# One command for a GPU machine: the GPU tests, then the LLaMA-7B-shape benchmark, results saved
# under benchmarks/results/<device>/. Usage: bash benchmarks/run_gpu.sh [extra dcft-bench args]
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
name=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
python -m pytest -q tests/
python -m dcft_kernels.bench --preset llama7b --out-dir "benchmarks/results/$name" "$@"
