#!/usr/bin/env bash
# Run the benchmark suite on a CUDA GPU and write the JSON, the markdown tables and the plot.
#   benchmarks/gpu.sh [output directory]        (default: bench-gpu/)
# Needs a CUDA build of torch and a visible GPU; records nvidia-smi's view of the device.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench-gpu}
mkdir -p "$out"
python - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu.sh: no CUDA device visible to torch")
print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
PY
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
# Correctness first: the GPU-only tests of the compiled backends (Triton kernels compiled, not
# interpreted; the extension's CUDA kernels) against the reference, then the benchmarks.
pytest tests/test_triton.py tests/test_extension.py -q -k cuda 2>&1 | tee "$out/gpu-tests.txt"
python -c "import dcp_kernels; print('backends on cuda:', dcp_kernels.backends('cuda'))" | tee -a "$out/gpu.txt"
pytest benchmarks/ --benchmark-only --device cuda --benchmark-json="$out/bench.json" -q
pytest benchmarks/bench_ops.py --benchmark-only --device cuda --dtype bf16 --benchmark-json="$out/bench-bf16.json" -q
python benchmarks/report.py "$out/bench.json" --plot "$out/benchmarks.png" | tee "$out/benchmarks.md"
python benchmarks/report.py "$out/bench-bf16.json" --plot "$out/benchmarks-bf16.png" | tee "$out/benchmarks-bf16.md"
