"""The backends every hardening test runs on, and the child process that runs their Triton cases.

Each file with backend cases takes the ``be`` fixture (tests/conftest.py, one case per :data:`BACKENDS`) and has a
``test_triton_cases`` that calls :func:`run_triton_cases` on itself: the reference and the compiled CPU kernels
run in this process, the Triton kernels in Triton's interpreter in a child process (``TRITON_INTERPRET=1``
must be set before Triton is imported), and all of them on CUDA tensors on a GPU machine. Inside that child
:data:`INTERPRETED` is true and the cases that need the main process skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orcal.ops import _ext

REPO = Path(__file__).resolve().parents[1]
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _backends() -> list:
    if INTERPRETED:  # the child process of test_triton_cases: Triton on CPU tensors only
        return [pytest.param(("triton", "cpu"), id="triton")]
    out = [pytest.param(("torch", "cpu"), id="torch")]
    if _ext.compiled():
        out.append(pytest.param(("cpp", "cpu"), id="cpp"))
    if torch.cuda.is_available():
        out.append(pytest.param(("torch", "cuda"), id="torch-cuda", marks=pytest.mark.cuda))
        if _ext.cuda_built():
            out.append(pytest.param(("cpp", "cuda"), id="cpp-cuda", marks=pytest.mark.cuda))
        if _ext.triton_available():
            out.append(pytest.param(("triton", "cuda"), id="triton-cuda", marks=pytest.mark.cuda))
    return out


BACKENDS = _backends()


def run_triton_cases(test_file: str) -> None:
    """Run the ``triton`` backend cases of ``test_file`` in Triton's interpreter (a child process)."""
    if INTERPRETED:
        pytest.skip("already in the interpreter")
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), str(REPO / "tests"), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "pytest", test_file, "-q", "-x", "-p", "no:cacheprovider",
                           "-k", "triton"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout


def _votes(shape, R, seed=0, device="cpu"):
    return torch.randint(0, R + 1, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8).to(device)


def _logits(B, R, S, seed=0, device="cpu", scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn((B, R + 1, *S), generator=g, dtype=torch.float64)).to(dtype).to(device)
