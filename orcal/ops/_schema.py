"""The op contract shared by every backend: argument codes, the statistics layout, fake shapes, autograd.

The compiled ``orcal::`` ops (``csrc/orcal.cpp``) and the Triton ``orcal_triton::`` ops
(:mod:`orcal.ops._triton`) take the same arguments and return the same tensors; this module is the one Python
statement of that contract, and the lowest layer of the package: it imports torch only.
:func:`register` gives a namespace's ops their shape functions (``torch.compile``, meta tensors,
``opcheck``) and the fused loss its autograd formula.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
#: The readouts the kernels compute (SPEC §2).
KERNEL_READOUTS = ("majority", "expected")
#: Every readout of the ops: the kernels' and the half-tie readout, the mean of the majority readouts at
#: m = R/2 and m = R/2 + 1 (two kernel passes; equal to the majority readout for odd R).
READOUTS = (*KERNEL_READOUTS, "half_tie")
KINDS = ("prob", "logit", "ordinal")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_RATERS = 255
#: Bounds of the histogram sizes of ``calibration_stats`` on every backend (SPEC §8): more ECE bins than this
#: leave most bins empty on any real image, and each AUC bin costs 16 bytes per image row.
MAX_ECE_BINS = 1024
MAX_AUC_BINS = 2**20


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of an input dtype: float32 for half types and float32, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class StatsLayout:
    """Columns of the packed per-image statistics of ``calibration_stats`` (mirrors
    ``csrc/common/stats_layout.h``; ``tests/test_schema.py`` checks that the two agree).

    ``counts (B, count_cols)`` int64: ``n`` and ``a`` per ECE bin, TP/FP/FN, ``pos`` and ``neg`` per score bin.
    ``sums (B, sum_cols)`` float64: ``s`` per ECE bin, the Brier and NLL sums.
    """

    n_bins: int
    auc_bins: int

    def n(self) -> int:
        return 0

    def a(self) -> int:
        return self.n_bins

    def tp(self) -> int:
        return 2 * self.n_bins

    def fp(self) -> int:
        return 2 * self.n_bins + 1

    def fn(self) -> int:
        return 2 * self.n_bins + 2

    def pos(self) -> int:
        return 2 * self.n_bins + 3

    def neg(self) -> int:
        return 2 * self.n_bins + 3 + self.auc_bins

    def count_cols(self) -> int:
        return 2 * self.n_bins + 3 + 2 * self.auc_bins

    def s(self) -> int:
        return 0

    def brier(self) -> int:
        return self.n_bins

    def nll(self) -> int:
        return self.n_bins + 1

    def sum_cols(self) -> int:
        return self.n_bins + 2


# --- shape functions (register_fake) ----------------------------------------------------------------------

def _spatial(x: torch.Tensor) -> list[int]:
    return [x.shape[0], *x.shape[2:]]


def _orc_targets(masks):
    return masks.new_empty(_spatial(masks), dtype=torch.uint8)


def _foreground_probability(logits, readout, majority):
    return logits.new_empty(_spatial(logits))


def _ordinal_loss(logits, k, valid, rps_weight, majority, reduction, need_grad):
    dtype = opmath_dtype(logits.dtype)
    loss = logits.new_empty(_spatial(logits) if reduction == REDUCTIONS["none"] else [], dtype=dtype)
    grad = torch.empty_like(logits) if need_grad else logits.new_empty([0])
    return loss, grad


def _calibration_stats(pred, target, valid, num_raters, target_is_masks, kind, readout, majority,
                       n_bins, auc_bins):
    rows, layout = pred.shape[0], StatsLayout(n_bins, auc_bins)
    counts = pred.new_empty([rows, layout.count_cols()], dtype=torch.int64)
    sums = pred.new_empty([rows, layout.sum_cols()], dtype=torch.float64)
    return counts, sums


FAKES = {
    "orc_targets": _orc_targets,
    "foreground_probability": _foreground_probability,
    "ordinal_loss": _ordinal_loss,
    "calibration_stats": _calibration_stats,
}


# --- autograd of the fused loss ---------------------------------------------------------------------------

def under_func_transform() -> bool:
    """Whether a ``torch.func`` transform (grad, vmap, ...) is active around this call."""
    return not torch.compiler.is_compiling() and torch._C._functorch.maybe_current_level() is not None


def _setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[1])
    ctx.reduction = inputs[5]
    ctx.set_materialize_grads(False)  # else autograd fills a zero gradient for the (unused) grad output


def _unsupported_transform(backend: str) -> str | None:
    """Why the fused loss's backward cannot serve the current autograd call, or None if it can.

    The fused kernels save the first derivative as a constant, so anything that differentiates it again
    (``create_graph=True``, ``torch.func`` transforms, which always build a graph) would silently get a
    zero Hessian. Traced graphs (``torch.compile``) run their backward without a graph and are fine.
    """
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return None
    if under_func_transform():
        what = "torch.func transforms (grad, vjp, jacrev, hessian)"
    else:
        what = "double backward (create_graph=True, e.g. a Hessian-vector product or a gradient penalty)"
    return (f"{what} is not supported by the fused ordinal_loss of backend={backend!r}, whose backward is a saved "
            "constant; use backend='torch' (plain PyTorch, differentiable to any order)")


def upstream_is_one(grad_loss: torch.Tensor) -> bool:
    """Whether the upstream gradient of a reduced loss is known, without synchronising, to be exactly 1."""
    eager = type(grad_loss) is torch.Tensor and not torch.compiler.is_compiling()
    return eager and grad_loss.device.type == "cpu" and bool(grad_loss == 1)


def _loss_backward(backend: str):
    def backward(ctx, grad_loss, _grad_grad):
        if grad_loss is None:  # only the grad output was used downstream: it is not differentiable
            return (None,) * 7
        reason = _unsupported_transform(backend)
        if reason:
            raise RuntimeError(reason)
        (grad,) = ctx.saved_tensors
        if grad.dim() == 1 and grad_loss.numel() != 0:  # the [0] placeholder of need_grad=False (logits >= 3D)
            raise RuntimeError("orcal ordinal_loss was run without its gradient; call it with logits that "
                               "require grad")
        none = (None,) * 6
        if ctx.reduction == REDUCTIONS["none"]:
            return (grad * grad_loss.unsqueeze(1)).to(grad.dtype), *none
        # The usual loss.backward() sends exactly 1: hand the saved gradient over without another pass. Only where
        # the value is on the host (a CPU tensor): reading a device tensor would synchronise the host on every
        # backward, and a traced graph (fake or functional tensors, torch.compile) must not branch on data.
        if upstream_is_one(grad_loss):
            return grad, *none
        return (grad * grad_loss).to(grad.dtype), *none

    return backward


def register(namespace: str, backend: str) -> None:
    """Register the shape functions of ``namespace``'s four ops and the autograd of its fused loss.

    ``backend`` is the name errors use (``"cpp"`` for ``orcal::``, ``"triton"`` for ``orcal_triton::``).
    """
    for name, fake in FAKES.items():
        torch.library.register_fake(f"{namespace}::{name}")(fake)
    torch.library.register_autograd(f"{namespace}::ordinal_loss", _loss_backward(backend), setup_context=_setup)


def async_checks(device: torch.device) -> bool:
    """Whether a kernel's error flags are checked on the device instead of read by the host: while the current
    CUDA stream is captured into a graph (``torch.compile(mode="reduce-overhead")``, ``torch.cuda.graph``),
    where reading them would be an illegal synchronisation, or always with ``ORCAL_ASYNC_CHECKS=1`` (no
    host synchronisation in any op; a bad input then fails the stream with a device-side assertion instead
    of a Python error that names the value). The CUDA kernels follow the same rule (csrc/cuda/cuda_utils.cuh),
    reading the variable once per process: set it before the process starts."""
    if os.environ.get("ORCAL_ASYNC_CHECKS") == "1":
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()
