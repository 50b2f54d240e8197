"""Triton kernels of the orcal ops: the GPU path of an install without a CUDA compiler.

Triton is imported on first use, so ``import orcal`` works without it. Each entry point here mirrors a
compiled ``orcal::`` op (same arguments, same results); :mod:`orcal.ops` validates inputs and dispatches.
On CPU tensors the kernels run in Triton's interpreter when ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch


def _launchers() -> ModuleType:
    # Imports triton and registers the orcal_triton:: ops on first use.
    return importlib.import_module("orcal.ops._triton._ops")


def orc_targets(masks: torch.Tensor) -> torch.Tensor:
    """``(B, R, *S)`` binary masks -> ``(B, *S)`` uint8 vote counts (ValueError on non-binary masks)."""
    return _launchers().orc_targets(masks)


def foreground_probability(logits: torch.Tensor, readout: str, majority: int) -> torch.Tensor:
    """Foreground probability ``(B, *S)`` of ordinal logits ``(B, R+1, *S)``, in the logits' dtype."""
    return _launchers().foreground_probability(logits, readout, majority)


def ordinal_loss_op():
    """The differentiable custom op ``orcal_triton::ordinal_loss``.

    Schema ``(logits, k, valid, rps_weight: float, majority: int, reduction: int, need_grad: bool)
    -> (loss, grad)``, like ``orcal::ordinal_loss``.
    """
    return _launchers().ordinal_loss


def calibration_stats_op():
    """The custom op ``orcal_triton::calibration_stats``.

    Schema ``(pred, target, valid, num_raters: int, target_is_masks: bool, kind: str, readout: str,
    majority: int, n_bins: int, auc_bins: int) -> (counts int64, sums float64)``, like
    ``orcal::calibration_stats``.
    """
    return _launchers().calibration_stats


def interpreting() -> bool:
    """Whether the kernels run in Triton's CPU interpreter."""
    return _launchers().interpreting()
