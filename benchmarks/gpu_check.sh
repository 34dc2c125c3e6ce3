#!/usr/bin/env bash
# The one prepared GPU check for a time-boxed lease, in one call of the 10-minute limit, most decisive
# numbers first: each stage (stages a and b after each configuration or pass) writes its JSON/text
# under the output directory as it ends, so a run cut short still brings back everything before the
# cut. Stage limits add up to 8 minutes (480 s); the extension builds in the background (nice 19, 6
# jobs, at most 170 s) from stage c on, which needs it not: stages a and b keep every core, and stage
# e waits at most 60 s beyond c and d for the build (540 s in all).
#   benchmarks/gpu_check.sh [output directory]     (default: bench-gpu/)
# On a lent device (at most 8 files come back, so archive them, also after a timeout):
#   timeout 570 bash benchmarks/gpu_check.sh /tmp/g; tar czf $OUT/g.tgz -C /tmp g
# Stages (limits in seconds):
#   a. the ceiling: dense vs ideal (finalized net of the kept widths), eager and captured, ResNet-50
#      224 px bf16 channels_last batch 128, prune 0.5, prune_residual True (first) then False,
#      round_to 8/32                                                                              120
#   b. the capacity-width DCP step captured (GraphedStep) vs dense, ideal and ideal at round_to=8
#      captured, then all eager, same shapes (prune_residual=True, compact residual streams);
#      kernel-time profile of one captured replay                                                 180
#   c. CIFAR VGG-16 and ResNet-56 batch 128 fp32 (TF32), interleaved: dense, torch-capacity, ideal
#      (fixed shapes only: cudnn.benchmark is on, and a moving-width variant would search inside
#      its timed rounds; Triton left out: cold compiles would not fit), one JSON each              30 + 30
#   d. correctness on CUDA: the capacity step vs the reference (VGG, ResNet with residual groups
#      pruned), the capacity step's CUDA-graph replays vs eager, the torch backend's op grid and
#      conversions (no Triton backend; the torch backend's fused BN backward is Triton and runs
#      in all of these), the fused BN backward's kernels                                         50
#   e. the extension's CUDA tests, then its op benchmark (ResNet-50 3x3 convs, batch 64, bf16,
#      keep 0.5, fwd+bwd, NCHW and channels_last)                                                 30 + 2 x 20
# Not here (run alone when a lease allows): the Triton CUDA tests (tests/test_ops.py,
# test_convert.py, test_triton.py -k "cuda and not extension", test_static_shapes.py; 145 passed on
# 2026-11-28), benchmarks/gpu.sh (every shape, keep and dtype), benchmarks/bench_graphs.py (the
# Triton static step under graphs), benchmarks/profile_step.py.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench-gpu}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
stage() { echo "=== $(date +%T) $*"; }

stage environment | tee "$out/gpu.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee -a "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'cuDNN', torch.backends.cudnn.version(), '| triton', triton.__version__, '|', torch.cuda.get_device_name(0))" | tee -a "$out/gpu.txt"
date -u +%F | tee -a "$out/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee -a "$out/gpu.txt"

stage "a. ceiling: dense vs ideal, ResNet-50 224 bf16 b128" | tee "$out/steps.txt"
timeout 120 python3 benchmarks/gpu_step.py ceiling --json "$out/ceiling.json" 2>&1 | grep -v Warning \
  | tail -6 | tee -a "$out/steps.txt"

stage "b. capacity step captured, then eager, vs dense and ideals" | tee -a "$out/steps.txt"
timeout 180 python3 benchmarks/gpu_step.py capacity --json "$out/capacity.json" \
  --profile "$out/capacity-profile.txt" 2>&1 | grep -v Warning | tail -4 | tee -a "$out/steps.txt"

stage "extension build (background)"
(TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=6 DCP_REQUIRE_EXTENSION=1 DCP_WERROR=1 \
  timeout 170 nice -n 19 python3 setup.py -q build_ext --inplace --build-temp /tmp/dcp_build >"$out/build.txt" 2>&1;
  echo "build exit $?" >>"$out/build.txt") &
build_pid=$!

stage "c. CIFAR VGG-16 / ResNet-56 b128 fp32 (TF32), prune 0.5, interleaved" | tee -a "$out/steps.txt"
for net in vgg16-cifar-b128 resnet56-cifar-b128; do
  timeout 30 python3 -m pytest -q -p no:cacheprovider benchmarks/bench_step.py --benchmark-only --device cuda \
    --variants dense,torch-capacity,ideal -k "interleaved and $net-prune0.5" \
    --benchmark-json="$out/bench-step-$net.json" 2>&1 | tail -2
  python3 benchmarks/report.py "$out/bench-step-$net.json" 2>&1 | tail -8 | tee -a "$out/steps.txt"
done

stage "d. correctness on CUDA" | tee "$out/gpu-tests.txt"
timeout 50 python3 -m pytest -q -p no:cacheprovider --maxfail=25 \
  tests/test_capacity.py tests/test_ops.py tests/test_convert.py tests/test_fused_bn_backward.py \
  -k "cuda and not extension and not triton" 2>&1 | tail -30 | tee -a "$out/gpu-tests.txt"

wait $build_pid
tail -3 "$out/build.txt"
stage "e. extension CUDA tests" | tee -a "$out/gpu-tests.txt"
timeout 30 python3 -m pytest -q -p no:cacheprovider --maxfail=25 \
  tests/test_ops.py tests/test_convert.py tests/test_extension.py tests/test_implicit_gemm.py \
  -k "(cuda and extension) or (test_implicit_gemm and cuda)" 2>&1 \
  | tail -30 | tee -a "$out/gpu-tests.txt"
python3 -c "import dcp_kernels; print('backends on cuda:', dcp_kernels.backends('cuda'))" | tee -a "$out/gpu.txt"
stage "e. op level: extension vs ideal / torch, ResNet-50 b64 bf16 keep 0.5, NCHW and channels_last"
for layout in nchw channels_last; do
  flag=$([ "$layout" = channels_last ] && echo --channels-last)
  timeout 20 python3 -m pytest -q -p no:cacheprovider benchmarks/bench_ops.py --benchmark-only --device cuda \
    --dtype bf16 $flag -k "fwd+bwd and resnet50-imagenet-b64 and keep0.5 and not reference and not triton" \
    --benchmark-json="$out/bench-ops-$layout.json" 2>&1 | tail -2
  python3 benchmarks/report.py "$out/bench-ops-$layout.json" > "$out/bench-ops-$layout.md" 2>&1
done
tail -12 "$out/bench-ops-channels_last.md"

stage done
