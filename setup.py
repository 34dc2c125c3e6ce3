"""Build script. Metadata lives in pyproject.toml; this file only decides about the C++/CUDA extension.

The extension in ``csrc/`` (``dcp_kernels._C``) is optional: the package works without it (PyTorch
and Triton backends) and logs that it is missing. It is built when torch is importable at build
time and ``DCP_NO_EXTENSION`` is not ``1``:

* ``CUDAExtension`` (CPU + CUDA kernels) when a CUDA toolkit is found: ``CUDA_HOME``, else the
  toolkit of the ``nvcc`` on PATH, else ``/usr/local/cuda``; GPU architectures from
  ``TORCH_CUDA_ARCH_LIST`` (default ``"8.0;9.0"``: A100 and H100);
* ``CppExtension`` (CPU kernels only) otherwise, or with ``DCP_NO_CUDA=1``.

A failing extension build prints a loud warning and installs the package without it, unless
``DCP_REQUIRE_EXTENSION=1`` (then the install fails: what CI's compile check wants).
"""
from __future__ import annotations

import glob
import os
import re
import shutil

from setuptools import setup


def _cuda_home() -> str | None:
    """The CUDA toolkit to build against (a directory holding include/cuda_runtime.h), or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        # /usr/local/bin/nvcc may be a lone link or wrapper: its toolkit is found through realpath.
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return os.path.realpath(home)
    return None


def _extension_kwargs() -> dict:
    if os.environ.get("DCP_NO_EXTENSION") == "1":
        return {}
    # csrc/emulation/ (the CPU emulation of CUDA, its self-test, the emulated-kernel ops) is test code: the
    # tests build it as its own extension (tests/emulated_kernels.py); DCP_TEST_KERNELS=1 compiles it
    # into _C instead (csrc/sanitize.sh's AddressSanitizer build).
    test_kernels = os.environ.get("DCP_TEST_KERNELS") == "1"
    sources = sorted(s for s in glob.glob("csrc/**/*.cpp", recursive=True)
                     if test_kernels or not s.startswith(os.path.join("csrc", "emulation", "")))
    if not sources:
        return {}
    cuda_home = None if os.environ.get("DCP_NO_CUDA") == "1" else _cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    try:
        from torch.utils import cpp_extension
    except ImportError:
        print("dcp_kernels: WARNING: torch is not importable at build time; building without the extension")
        return {}
    cuda_sources = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    # Warnings of our sources are shown (torch's headers, included as system headers, are not judged);
    # DCP_WERROR=1 (CI, benchmarks/gpu_check.sh) makes them errors. The C++ standard is the one
    # torch.utils.cpp_extension sets (C++20 for torch 2.14).
    werror = os.environ.get("DCP_WERROR") == "1"
    system_headers = [f"-isystem{path}" for path in cpp_extension.include_paths("cuda" if cuda_home else "cpu")]
    cxx = ["-O3", "-Wall", "-Wextra", *system_headers, *(["-Werror"] if werror else [])]
    # DCP_SANITIZE=address: an AddressSanitizer build of the C++ code (CPU-only: DCP_NO_CUDA=1), for
    # running the CUDA kernels' emulation with out-of-bounds checks (csrc/sanitize.sh).
    sanitize = os.environ.get("DCP_SANITIZE")
    link = []
    if sanitize:
        if sanitize != "address" or cuda_home:
            raise SystemExit(f"DCP_SANITIZE={sanitize!r}: only 'address' is supported, with DCP_NO_CUDA=1")
        cxx += ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"]
        link = ["-fsanitize=address"]
    # --threads=0: the GPU architectures' device compiles run in parallel (one CPU each; 140 s -> 88 s for
    # fused_conv_cuda.cu, sm_80 + sm_90, on 2 cores).
    nvcc = ["-O3", "--threads=0", "-Xcompiler=-Wall" + (",-Werror" if werror else ""),
            *(["--Werror=all-warnings"] if werror else [])]
    if cuda_home and cuda_sources:
        ext = cpp_extension.CUDAExtension(
            "dcp_kernels._C", sources + cuda_sources, define_macros=[("DCP_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        )
    else:
        ext = cpp_extension.CppExtension("dcp_kernels._C", sources, extra_compile_args={"cxx": cxx},
                                         extra_link_args=link)

    class OptionalBuildExtension(cpp_extension.BuildExtension):
        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as error:  # noqa: BLE001 - any build failure leaves the pure-Python package
                if os.environ.get("DCP_REQUIRE_EXTENSION") == "1":
                    raise
                print(f"\n{'!' * 78}\ndcp_kernels: WARNING: building the C++/CUDA extension failed ({error}).\n"
                      "Installing without it: backend 'extension' will be unavailable.\n"
                      f"Set DCP_REQUIRE_EXTENSION=1 to make this an error.\n{'!' * 78}\n")

    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}}


def _version() -> str:
    """``dcp_kernels.__version__``, plus ``+DCP_LOCAL_VERSION`` when set: scripts/build_wheel.sh names the
    torch and CUDA a wheel's extension links against (``0.1.0+torch2.14.1.cu130``)."""
    with open(os.path.join("dcp_kernels", "__init__.py")) as f:
        version = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)
    local = os.environ.get("DCP_LOCAL_VERSION")
    return f"{version}+{local}" if local else version


setup(version=_version(), **_extension_kwargs())
