"""Builds the CUDA kernels of ``csrc/cuda`` as host C++ for the ``emulated`` tests (tests only, never installed).

The very ``.cu`` files that nvcc compiles are compiled by the C++ compiler with ``-DORCAL_CUDA_EMULATION``, which
makes ``csrc/cuda/cuda_utils.cuh`` use ``csrc/cuda/emulation.h``: every CUDA thread an OS thread. Their
launchers register under ``torch.ops.orcal_emu`` for CPU tensors, next to (never instead of) ``torch.ops.orcal``.

``ORCAL_CUDA_EMULATION=1`` builds the plain flavour; ``ORCAL_CUDA_EMULATION=tsan`` builds with ThreadSanitizer,
which must be loaded first: ``LD_PRELOAD=$(g++ -print-file-name=libtsan.so)``. The build goes to
``build/cuda_emulation/<flavour>`` of the working tree (or ``$ORCAL_CUDA_EMULATION_BUILD_DIR/<flavour>``) and is
reused while no source changed (ninja tracks the included headers).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
ENV = "ORCAL_CUDA_EMULATION"
FLAVOURS = {"1": [], "tsan": ["-fsanitize=thread"]}
HOW = f"{ENV}=1 python -m pytest -m emulated"


def flavour() -> str | None:
    """The requested flavour (``"1"`` or ``"tsan"``), or None when the emulation is not requested."""
    value = os.environ.get(ENV, "")
    return value if value in FLAVOURS else None


def _tsan_loaded() -> bool:
    with open("/proc/self/maps") as maps:
        return "libtsan" in maps.read()


def build_dir(which: str) -> Path:
    base = os.environ.get("ORCAL_CUDA_EMULATION_BUILD_DIR")
    return (Path(base) if base else ROOT / "build" / "cuda_emulation") / which


def load(which: str = "1"):
    """Builds (or reuses) and loads the emulated kernels; returns ``torch.ops.orcal_emu``."""
    if which == "tsan" and not _tsan_loaded():
        raise RuntimeError("the ThreadSanitizer build needs libtsan loaded first: run with "
                           "LD_PRELOAD=$(g++ -print-file-name=libtsan.so)")
    from torch.utils.cpp_extension import load as build

    out = build_dir(which)
    out.mkdir(parents=True, exist_ok=True)
    sources = [str(CSRC / "orcal.cpp")]
    for cu in sorted((CSRC / "cuda").glob("*.cu")):
        # a .cpp that includes the .cu: cpp_extension hands .cu files to nvcc, this one goes to the C++ compiler
        wrapper = out / f"emu_{cu.stem}.cpp"
        text = f'#include "{cu}"\n'
        if not wrapper.exists() or wrapper.read_text() != text:
            wrapper.write_text(text)
        sources.append(str(wrapper))
    sanitize = FLAVOURS[which]
    preload = os.environ.pop("LD_PRELOAD", None)  # the compiler crashes with libtsan preloaded
    try:
        build(name=f"orcal_emu_{'tsan' if sanitize else 'plain'}", sources=sources, build_directory=str(out),
              extra_cflags=["-std=c++20", "-O2", "-g0", "-pthread", "-DORCAL_CUDA_EMULATION",
                            "-DORCAL_OPS_NAMESPACE=orcal_emu", *sanitize],
              extra_ldflags=["-pthread", *sanitize], is_python_module=False, verbose=False)
    finally:
        if preload is not None:
            os.environ["LD_PRELOAD"] = preload
    return torch.ops.orcal_emu
