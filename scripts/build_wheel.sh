#!/usr/bin/env bash
# A CUDA wheel of dcp_kernels as users receive it, checked where they install it.
#   1. builds the wheel from the tracked files of this checkout (a clean copy: no local build output),
#      against the torch of the active environment, with the extension required (DCP_REQUIRE_EXTENSION=1)
#      and compiled for sm_80 and sm_90 plus PTX for newer cards (TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX"),
#      its version labelled with that torch and CUDA (0.1.0+torch2.14.1.cu130: the extension only loads
#      into the torch it was built against);
#   2. lists the GPU code inside the extension (cuobjdump);
#   3. installs the wheel into a fresh virtual environment and, with no compiler on PATH (only that
#      environment's bin/), checks that the extension loads with its CPU and CUDA kernels and runs the
#      extension's tests (tests/test_extension.py; the CUDA cases skip without a GPU).
# Needs nvcc (CUDA_HOME or on PATH) and the package index torch came from. Usage, from any folder with
# the project's environment active: bash scripts/build_wheel.sh [OUT_DIR]  (default: dist/). About 10
# minutes on 2 cores.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${1:-$root/dist}" && cd "${1:-$root/dist}" && pwd)
python=$(command -v python)
torch_version=$("$python" -c "import torch; print(torch.__version__.split('+')[0])")
cuda_version=$("$python" -c "import torch; print((torch.version.cuda or '').replace('.', ''))")
if [ -z "$cuda_version" ]; then
  echo "build_wheel: this torch ($torch_version) is a CPU build; a CUDA wheel needs a CUDA build of torch" >&2
  exit 1
fi
label="torch${torch_version}.cu${cuda_version}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "build_wheel: building dcp_kernels+$label (sm_80, sm_90, PTX) from the tracked files"
(cd "$root" && git ls-files -z | tar --null -T - -cf -) | tar -x -C "$work" -f -
mkdir "$work/src" && (cd "$work" && find . -mindepth 1 -maxdepth 1 ! -name src -exec mv {} src/ \;)
(cd "$work/src" && TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX" DCP_REQUIRE_EXTENSION=1 DCP_WERROR=1 DCP_LOCAL_VERSION="$label" \
  "$python" -m pip wheel . --no-deps --no-build-isolation -q -w "$out" > "$work/build.log" 2>&1) \
  || { tail -40 "$work/build.log" >&2; echo "build_wheel: the build failed" >&2; exit 1; }
wheel=$(ls -t "$out"/dcp_kernels-*"+$label"-*.whl | head -1)
echo "build_wheel: $wheel ($(du -h "$wheel" | cut -f1))"

# cuobjdump: on PATH, in the toolkit, or the copy Triton ships (a toolkit may come without it).
cuobjdump=""
for candidate in "$(command -v cuobjdump || true)" "${CUDA_HOME:-/usr/local/cuda}/bin/cuobjdump" \
    "$("$python" -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))' 2>/dev/null || true)"; do
  if [ -n "$candidate" ] && [ -x "$candidate" ]; then cuobjdump=$candidate; break; fi
done
mkdir "$work/unpacked" && (cd "$work/unpacked" && "$python" -m zipfile -e "$wheel" .)
so=$(ls "$work"/unpacked/dcp_kernels/_C*.so)
if [ -n "$cuobjdump" ]; then
  echo "build_wheel: GPU code in $(basename "$so") ($cuobjdump):"
  "$cuobjdump" --list-elf --list-ptx "$so" | sed -E 's/^.*(sm_[0-9]+|compute_[0-9]+).*\.(cubin|ptx)$/  \2 \1/' | sort | uniq -c
else
  echo "build_wheel: no cuobjdump found: GPU code not listed"
fi

echo "build_wheel: installing into a fresh virtual environment"
"$python" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q "torch==$torch_version" pytest "$wheel" > "$work/install.log" 2>&1 \
  || { tail -20 "$work/install.log" >&2; echo "build_wheel: installing the wheel failed" >&2; exit 1; }
echo "build_wheel: checking with no compiler on PATH"
(cd "$work" && env -i HOME="$HOME" PATH="$work/venv/bin" CC=/nonexistent CXX=/nonexistent \
  python - "$label" <<'PY'
import shutil, sys
import dcp_kernels
from dcp_kernels.ops import extension
assert all(shutil.which(c) is None for c in ("c++", "g++", "gcc", "cc", "nvcc")), "a compiler is on PATH"
assert dcp_kernels.__file__.startswith(sys.prefix), f"imported {dcp_kernels.__file__}, not the installed wheel"
assert extension.AVAILABLE, extension.LOAD_ERROR
assert extension.CUDA_BUILT, "the extension was built without its CUDA kernels"
from importlib.metadata import version
assert version("dcp_kernels").endswith("+" + sys.argv[1]), version("dcp_kernels")
print(f"build_wheel: dcp_kernels {version('dcp_kernels')} loads its extension: {extension.status()}")
PY
)
(cd "$work" && env -i HOME="$HOME" PATH="$work/venv/bin" CC=/nonexistent CXX=/nonexistent \
  python -m pytest -q -p no:cacheprovider "$root/tests/test_extension.py" 2>&1 | tail -3)
echo "build_wheel: done: $wheel"
