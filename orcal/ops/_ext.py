"""Loads the compiled extension ``orcal._C`` and reports what was built.

Importing ``orcal._C`` registers the ``orcal::`` ops with the PyTorch dispatcher. Without it (a pure
Python install with ``ORCAL_SKIP_EXT=1``, or a failed build) every op falls back to the reference.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch

try:
    from orcal import _C  # noqa: F401  (registers the ops)

    LOAD_ERROR: str | None = None
except ImportError as err:
    _C = None
    LOAD_ERROR = str(err)
    # A pure-Python install has no orcal._C: nothing to say. A built extension that fails to load (most often
    # a torch upgraded under it by another package) would make every op fall back to the slow reference.
    if importlib.util.find_spec("orcal._C") is not None:
        warnings.warn(f"orcal's compiled extension exists but could not be loaded ({err}); every op falls back to "
                      f"the pure-PyTorch reference. It was probably built against another torch than the "
                      f"installed {torch.__version__}: rebuild it with "
                      "`pip install --no-build-isolation --force-reinstall --no-deps -e .` (or `orcal info` "
                      "to see what was built)", RuntimeWarning, stacklevel=2)


def compiled() -> bool:
    """Whether the compiled extension is loaded."""
    return _C is not None


def cuda_built() -> bool:
    """Whether the compiled extension contains CUDA kernels."""
    return _C is not None and bool(_C.build_info().get("cuda"))


@functools.cache
def _has_kernel(op: str, dispatch_key: str) -> bool:
    if _C is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"orcal::{op}", dispatch_key)
    except RuntimeError:  # the op's schema is not registered
        return False


def has_kernel(op: str, device: torch.device) -> bool:
    """Whether a compiled kernel for ``orcal::op`` exists for ``device``."""
    return _has_kernel(op, "CUDA" if device.type == "cuda" else "CPU")


def why_no_kernel(device: torch.device) -> str:
    """Why no compiled kernel runs on ``device``, and how to get one."""
    if _C is None:
        return (f"the compiled extension is not installed ({LOAD_ERROR}); reinstall without ORCAL_SKIP_EXT, "
                f"e.g. `pip install --no-build-isolation -e .`")
    if device.type == "cuda" and not cuda_built():
        return ("orcal was built without CUDA kernels; rebuild with ORCAL_WITH_CUDA=1 and "
                "CUDA_HOME=/path/to/cuda, or use backend='triton'")
    return "this op has no compiled kernel for that device"


@functools.cache
def triton_available() -> bool:
    """Whether Triton can be imported."""
    return importlib.util.find_spec("triton") is not None


def why_no_triton(device: torch.device) -> str | None:
    """None if Triton kernels can run on ``device``, else the reason."""
    if not triton_available():
        return "Triton is not installed (`pip install triton`)"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)"
    return None


def build_info() -> dict[str, object]:
    """What this install of orcal was built with."""
    info: dict[str, object] = {
        "torch": torch.__version__,
        "compiled": compiled(),
        "cuda": cuda_built(),
        "triton": triton_available(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if _C is not None:
        info.update({f"ext_{key}": value for key, value in _C.build_info().items() if key != "cuda"})
    else:
        info["load_error"] = LOAD_ERROR
    return info
