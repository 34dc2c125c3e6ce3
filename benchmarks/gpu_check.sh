#!/usr/bin/env bash
# A short GPU check for a time-boxed lease (about 7 minutes on one H100/H200): build the extension
# in place, run the CUDA correctness tests, then a reduced benchmark set. Each stage has its own time
# limit and the stages after a failed one still run, so one run reports as much as it can.
#   benchmarks/gpu_check.sh [output directory]     (default: bench-gpu/)
# benchmarks/gpu.sh is the full suite (much longer: every shape, keep ratio and dtype, autotuned).
# Stages:
#   1. extension build (CUDA kernels for TORCH_CUDA_ARCH_LIST, default 9.0) in the background, while
#   2. the Triton CUDA tests run (DCP_TRITON_AUTOTUNE=0: one tile configuration, so one compile per
#      kernel), then the extension's CUDA tests once the build is done;
#   3. op level, fp32, forward+backward, keep 0.5 and 1.0, every variant, Triton autotuned;
#   4. step level (interleaved) on VGG-16 and ResNet-56 at prune 0.5, Triton with its single
#      untuned configuration (autotuning every layer's shape would take the whole lease).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench-gpu}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
stage() { echo "=== $(date +%T) $*"; }

stage environment | tee "$out/gpu.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee -a "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'CUDA', torch.version.cuda, '| triton', triton.__version__, '|', torch.cuda.get_device_name(0))" | tee -a "$out/gpu.txt"

stage "extension build (background)"
(TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=16 DCP_REQUIRE_EXTENSION=1 \
  timeout 240 python3 setup.py -q build_ext --inplace --build-temp /tmp/dcp_build >"$out/build.txt" 2>&1;
  echo "build exit $?" >>"$out/build.txt") &
build_pid=$!

stage "Triton CUDA tests" | tee "$out/gpu-tests.txt"
DCP_TRITON_AUTOTUNE=0 timeout 180 python3 -m pytest -q -p no:cacheprovider --maxfail=25 \
  tests/test_ops.py tests/test_convert.py tests/test_triton.py -k "cuda and not extension" 2>&1 \
  | tail -40 | tee -a "$out/gpu-tests.txt"

wait $build_pid
tail -3 "$out/build.txt"
stage "extension CUDA tests" | tee -a "$out/gpu-tests.txt"
timeout 100 python3 -m pytest -q -p no:cacheprovider --maxfail=25 \
  tests/test_ops.py tests/test_convert.py tests/test_extension.py -k "cuda and extension" 2>&1 \
  | tail -40 | tee -a "$out/gpu-tests.txt"
python3 -c "import dcp_kernels; print('backends on cuda:', dcp_kernels.backends('cuda'))" | tee -a "$out/gpu.txt"

stage "op benchmarks"
timeout 150 python3 -m pytest -q -p no:cacheprovider benchmarks/bench_ops.py --benchmark-only --device cuda \
  -k "fwd+bwd and (keep0.5 or keep1.0) and not reference" --benchmark-json="$out/bench-ops.json" 2>&1 | tail -5
python3 benchmarks/report.py "$out/bench-ops.json" > "$out/bench-ops.md" 2>&1

stage "step benchmarks"
DCP_TRITON_AUTOTUNE=0 timeout 100 python3 -m pytest -q -p no:cacheprovider benchmarks/bench_step.py --benchmark-only \
  --device cuda -k "interleaved and prune0.5" --benchmark-json="$out/bench-step.json" 2>&1 | tail -5
python3 benchmarks/report.py "$out/bench-step.json" > "$out/bench-step.md" 2>&1
stage done
