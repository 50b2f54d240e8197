"""What the benchmarks measure with: the machine's name, wall times, the copy bandwidth and the peak memory of a
call (the method is in :mod:`benchmarks.suite`'s docstring). Shared by every benchmark module, so none imports
the suite for them."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import os
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from orcal.ops import _ext

# --- machine ---------------------------------------------------------------------------------------------

def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def cpu_model() -> str:
    from orcal.training.runtime import cpu_name

    return cpu_name()


def device_name(device: str) -> str:
    """``cpu-<model>-<n>threads`` or the GPU's name, slugified: the results file name."""
    if device == "cuda":
        return _slug(torch.cuda.get_device_name(0))
    return f"cpu-{_slug(cpu_model())}-{torch.get_num_threads()}threads"


def device_description(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    return f"{cpu_model()}, {torch.get_num_threads()} threads"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: str, repeats: int, budget_s: float) -> list[float]:
    """Wall times of ``repeats`` calls after one warm-up; stops early (at least 3 runs) past ``budget_s``."""
    fn()
    sync(device)
    times: list[float] = []
    start = time.perf_counter()
    for i in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if i >= 2 and time.perf_counter() - start > budget_s:
            break
    return times


def copy_bandwidth(device: str, quick: bool) -> tuple[float, float]:
    """(GB/s, MB) of a large tensor copy (bytes read + bytes written): the memory-bandwidth floor of the run."""
    n = (1 << 22) if quick else (1 << 26)  # 16 MiB or 256 MiB of float32
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    times = time_fn(lambda: dst.copy_(src), device, 5 if quick else 10, 2.0)
    nbytes = src.numel() * src.element_size()
    return 2 * nbytes / statistics.median(times) / 1e9, nbytes / 1e6


# --- peak memory -----------------------------------------------------------------------------------------

_MALLOC_SET = False


def malloc_returns_memory() -> None:
    """Make glibc return every block of 64 KiB or more to the system on free (so RSS follows live memory),
    and give back what it holds now. Only for the memory pass: timings use the default allocator."""
    global _MALLOC_SET
    if _MALLOC_SET:
        return
    _MALLOC_SET = True
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD (fixed: no dynamic growth)
        libc.mallopt(-1, 1 << 16)  # M_TRIM_THRESHOLD
        libc.malloc_trim(0)


def _status_kb(key: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def peak_extra_mb(fn: Callable[[], object], device: str) -> float:
    """Peak memory of one call of ``fn`` above what was in use before it, in MB (see the module doc)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del out
        return (peak - before) / 1e6
    malloc_returns_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        return math.nan
    before = _status_kb("VmRSS")
    out = fn()
    peak = _status_kb("VmHWM")
    del out
    if before is None or peak is None:
        return math.nan
    return max(peak - before, 0) * 1024 / 1e6


def cpu_isa() -> str:
    """Which CPU kernel set the extension runs: the widest of AVX-512, AVX2/FMA and the baseline that the CPU
    has and ``ORCAL_CPU_ISA`` allows (the choice of csrc/cpu/kernels_base.cpp)."""
    if not _ext.compiled():
        return "no compiled"
    capability = torch.backends.cpu.get_cpu_capability().lower()
    cap = os.environ.get("ORCAL_CPU_ISA", "")
    if cap == "baseline" or capability not in ("avx2", "avx512"):
        return "baseline"
    return "AVX-512" if capability == "avx512" and cap != "avx2" else "AVX2/FMA"
