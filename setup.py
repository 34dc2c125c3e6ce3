"""Build script. Metadata lives in pyproject.toml; this file only decides about the C++/CUDA extension.

The extension in ``csrc/`` is optional: the package works without it (pure PyTorch backends).
It is built when ``csrc/`` has sources, torch is importable at build time and
``DCP_NO_EXTENSION`` is not set; ``CUDAExtension`` when nvcc is found, ``CppExtension`` otherwise.
"""
from __future__ import annotations

import glob
import os

from setuptools import setup


def _extension_kwargs() -> dict:
    if os.environ.get("DCP_NO_EXTENSION") == "1":
        return {}
    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    if not sources:
        return {}  # no C++ sources yet: nothing to build
    try:
        from torch.utils import cpp_extension
    except ImportError:
        print("dcp_kernels: torch is not importable at build time; building without the extension")
        return {}
    cuda_sources = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    if cuda_sources and cpp_extension.CUDA_HOME is not None:
        ext = cpp_extension.CUDAExtension("dcp_kernels._C", sources + cuda_sources)
    else:
        ext = cpp_extension.CppExtension("dcp_kernels._C", sources)
    return {"ext_modules": [ext], "cmdclass": {"build_ext": cpp_extension.BuildExtension}}


setup(**_extension_kwargs())
