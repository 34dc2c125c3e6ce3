#!/usr/bin/env bash
# The C++ extension under AddressSanitizer: the CUDA kernels run in their CPU emulation
# (csrc/emulation/), so every global-memory access of the kernels (activations, weights, indices,
# split-K workspace) and every `__shared__` array (statics in the emulation) is bounds-checked, as
# compute-sanitizer would on a GPU. Builds a CPU-only ASan copy of the extension, with the test-only
# emulated kernels compiled in (DCP_TEST_KERNELS=1), in a temporary
# folder (the checkout is not touched), then:
#   1. proves the sanitizer is live: a self-test kernel reading past its buffer must be reported;
#   2. runs the kernels' tests (tests/test_implicit_gemm.py, tests/test_extension.py and the op grid's
#      extension cases, which also cover the CPU kernels of csrc/cpu/) under it;
#      any out-of-bounds read or write fails them with ASan's report (kernel, file and line).
# Needs g++ with libasan (gcc's own runtime is preloaded into Python, with libstdc++ so that ASan
# sees C++ exceptions). About 1.5 minutes on 2 cores. Usage: bash csrc/sanitize.sh (from any folder,
# with the project's environment active). Called by .ci/run.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
asan=$(g++ -print-file-name=libasan.so)
stdcxx=$(g++ -print-file-name=libstdc++.so)
if [ ! -e "$asan" ] || [ "$asan" = "libasan.so" ]; then
  echo "sanitize: g++ has no libasan.so; install gcc's AddressSanitizer runtime (Debian: libasan8)" >&2
  exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Only what the build and the tests read (no compiled extension, runs or venvs).
cp -r "$root/csrc" "$root/setup.py" "$root/pyproject.toml" "$root/tests" "$work/"
mkdir "$work/dcp_kernels"
(cd "$root/dcp_kernels" && find . -name '*.py' -exec cp --parents {} "$work/dcp_kernels/" \;)

echo "sanitize: building the extension with -fsanitize=address (CPU only)"
(cd "$work" && CXX=g++ DCP_SANITIZE=address DCP_NO_CUDA=1 DCP_TEST_KERNELS=1 DCP_REQUIRE_EXTENSION=1 DCP_WERROR=1 \
  python3 setup.py -q build_ext --inplace --build-temp "$work/build" > "$work/build.log" 2>&1) \
  || { tail -30 "$work/build.log" >&2; echo "sanitize: the ASan build failed" >&2; exit 1; }

run() {  # python under ASan, importing the copy; ASan's reports go to $work/report.<pid>
  (cd "$work" && LD_PRELOAD="$asan $stdcxx" ASAN_OPTIONS="detect_leaks=0:log_path=$work/report" \
    PYTHONPATH="$work" python3 "$@")
}

where=$(run -c "import dcp_kernels.ops.extension as e; assert e.AVAILABLE, e.LOAD_ERROR; print(e.__file__)" 2>&1 | tail -1)
case "$where" in
  "$work"/*) ;;
  *) echo "sanitize: imported $where, not the ASan build in $work" >&2; exit 1 ;;
esac

echo "sanitize: a kernel reading past its buffer must be reported"
if run -c "import torch, dcp_kernels.ops.extension; torch.ops.dcp._emulation_selftest('read_out_of_bounds')" \
    > /dev/null 2>&1; then
  echo "sanitize: the out-of-bounds self-test ran unreported: AddressSanitizer is not active" >&2
  exit 1
fi
if ! grep -q "heap-buffer-overflow" "$work"/report.* || ! grep -q "read_kernel" "$work"/report.*; then
  cat "$work"/report.* >&2 || true
  echo "sanitize: the out-of-bounds self-test failed, but not with ASan's report" >&2
  exit 1
fi
rm -f "$work"/report.*

echo "sanitize: the kernels' tests under AddressSanitizer"
if ! run -m pytest -q -p no:cacheprovider tests/test_implicit_gemm.py tests/test_extension.py tests/test_ops.py \
    -k "test_implicit_gemm or test_extension or extension"; then
  cat "$work"/report.* 2>/dev/null | head -60 >&2 || true
  echo "sanitize: failed (ASan's report above, if it found a bad access)" >&2
  exit 1
fi
echo "sanitize: no out-of-bounds access"
