"""Builds orcal and its compiled extension orcal._C.

Switches (environment variables):
  ORCAL_SKIP_EXT=1     pure-Python install; every op falls back to the PyTorch reference.
  ORCAL_WITH_CUDA=1/0  force CUDA kernels on / off. Unset ("auto"): built when CUDA_HOME is set and torch
                       has CUDA. No GPU is needed to build them.
  TORCH_CUDA_ARCH_LIST CUDA architectures (default "8.0;9.0+PTX").
  MAX_JOBS             parallel compile jobs.
"""

import os
import platform
import re
from glob import glob
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
VERSION = re.search(r'^version = "(.+)"', (HERE / "pyproject.toml").read_text(), re.M).group(1)


def _want_cuda(torch) -> bool:
    flag = os.environ.get("ORCAL_WITH_CUDA", "auto").lower()
    if flag in ("1", "true", "yes", "on"):
        return True
    if flag in ("0", "false", "no", "off"):
        return False
    return bool(os.environ.get("CUDA_HOME")) and torch.version.cuda is not None


def extensions():
    if os.environ.get("ORCAL_SKIP_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # Sources are relative to this file: setuptools wants relative paths.
    sources = ["csrc/orcal.cpp", "csrc/pymodule.cpp", *sorted(glob("csrc/cpu/*.cpp"))]
    macros = [("ORCAL_VERSION", f'"{VERSION}"')]
    cxx = ["-O3", "-std=c++20"]
    if platform.system() != "Windows":
        # OpenMP makes at::parallel_for (inlined here) actually run in parallel.
        # -fno-math-errno / -fno-trapping-math let GCC vectorise exp/log (glibc's libmvec, declared in
        # csrc/cpu/vector_math.h) and if-convert the branch-free selects of the CPU kernels. No -ffast-math: it
        # would break their NaN checks. No -march=native: csrc/cpu/kernels_avx2.cpp brings its own target
        # and is picked at run time.
        cxx += ["-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd"]
    extra_link = ["-fopenmp", "-lm"] if platform.system() == "Linux" else []  # libm brings libmvec
    kwargs = dict(name="orcal._C", sources=sources, define_macros=macros,
                  extra_compile_args={"cxx": cxx}, extra_link_args=extra_link)
    if _want_cuda(torch):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        kwargs["sources"] += sorted(glob("csrc/cuda/*.cu"))
        macros += [("ORCAL_WITH_CUDA", None), ("ORCAL_CUDA_ARCHS", f'"{os.environ["TORCH_CUDA_ARCH_LIST"]}"')]
        # No --use_fast_math: its approximate logf/expf/division move the NLL and BCE of confident voxels off
        # the CPU and Triton results (a confident correct voxel could get a negative BCE).
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-std=c++20", "-lineinfo"]
        ext = CUDAExtension(**kwargs)
    else:
        ext = CppExtension(**kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
