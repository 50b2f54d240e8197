"""Shape functions (``register_fake``) and autograd of the compiled ``orcal::`` ops.

They let the ops run under ``torch.compile``, meta tensors and ``torch.library.opcheck``.
"""

from __future__ import annotations

import torch

from orcal import _ext, ops
from orcal.reference import opmath_dtype


def _spatial(x: torch.Tensor) -> list[int]:
    return [x.shape[0], *x.shape[2:]]


def _orc_targets(masks):
    return masks.new_empty(_spatial(masks), dtype=torch.uint8)


def _foreground_probability(logits, readout, majority):
    return logits.new_empty(_spatial(logits))


def _ordinal_loss(logits, k, valid, rps_weight, majority, reduction, need_grad):
    dtype = opmath_dtype(logits.dtype)
    loss = logits.new_empty(_spatial(logits) if reduction == ops.REDUCTIONS["none"] else [], dtype=dtype)
    grad = torch.empty_like(logits) if need_grad else logits.new_empty([0])
    return loss, grad


def _calibration_stats(pred, target, valid, num_raters, target_is_masks, kind, readout, majority,
                       n_bins, auc_bins):
    rows = pred.shape[0]
    counts = pred.new_empty([rows, 2 * n_bins + 3 + 2 * auc_bins], dtype=torch.int64)
    sums = pred.new_empty([rows, n_bins + 2], dtype=torch.float64)
    return counts, sums


_FAKES = {
    "orc_targets": _orc_targets,
    "foreground_probability": _foreground_probability,
    "ordinal_loss": _ordinal_loss,
    "calibration_stats": _calibration_stats,
}


def register() -> None:
    """Register shape functions and autograd for every op whose schema the extension defines."""
    if not _ext.compiled():
        return
    for name, fake in _FAKES.items():
        torch.library.register_fake(f"orcal::{name}")(fake)
    ops.register_autograd("orcal::ordinal_loss", "cpp")
