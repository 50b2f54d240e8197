"""Training losses as ``nn.Module``: the ordinal rater-consensus loss and BCE for the baseline strategies."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

REDUCTIONS = ("mean", "sum", "none")


class OrdinalLoss(nn.Module):
    """``BCE(majority logit, [k >= m]) + rps_weight * RPS`` on ordinal logits (SPEC §3).

    Wraps :func:`orcal.ordinal_loss`; the backend (compiled CPU/CUDA kernels, Triton or plain PyTorch) is
    picked per device unless ``backend`` names one.

    Args:
        rps_weight: weight ``lambda`` of the Ranked Probability Score (normalised by ``R``).
        majority: smallest vote count that is foreground; default ``R // 2 + 1``.
        reduction: ``"mean"`` over valid voxels, ``"sum"`` or ``"none"`` (a ``(B, *S)`` map).
        backend: ``"auto"``, ``"torch"``, ``"cpp"`` or ``"triton"``.

    Forward: ``loss(logits (B, R+1, *S), k (B, *S) uint8, valid=None (B, *S) bool)``.
    """

    def __init__(self, rps_weight: float = 1.0, majority: int | None = None, reduction: str = "mean",
                 backend: str = "auto"):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if not float(rps_weight) >= 0:
            raise ValueError(f"rps_weight must be >= 0, got {rps_weight!r}")
        self.rps_weight, self.majority, self.reduction, self.backend = float(rps_weight), majority, reduction, backend

    def forward(self, logits: torch.Tensor, k: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        from orcal.ops import ordinal_loss

        return ordinal_loss(logits, k, rps_weight=self.rps_weight, majority=self.majority, valid=valid,
                            reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return f"rps_weight={self.rps_weight}, majority={self.majority}, reduction={self.reduction!r}"


class SoftBCELoss(nn.Module):
    """Binary cross-entropy with logits against hard or soft targets in [0, 1] (the baselines, SPEC §3/§6).

    Computed in float32 from logits (stable for any logit). ``reduction="mean"`` averages over valid voxels
    and is 0 with a zero gradient when no voxel is valid; ``"sum"``; ``"none"`` gives a ``(B, *S)`` map with 0
    where invalid.

    Forward: ``loss(logit (B, 1, *S) or (B, *S), target (B, *S) float in [0, 1], valid=None (B, *S) bool)``.
    """

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction

    def forward(self, logit: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        for name, x in (("logit", logit), ("target", target)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not logit.is_floating_point():
            raise TypeError(f"logit must be a float tensor, got {logit.dtype}")
        if logit.ndim == target.ndim + 1 and logit.shape[1] == 1:
            logit = logit[:, 0]
        if logit.shape != target.shape:
            raise ValueError(f"logit {tuple(logit.shape)} (or (B, 1, *S)) and target {tuple(target.shape)} must "
                             "have the same spatial shape")
        t = target.float()
        if t.numel() and (bool(torch.isnan(t).any()) or float(t.min()) < 0 or float(t.max()) > 1):
            raise ValueError("target must hold values in [0, 1]")
        loss = F.binary_cross_entropy_with_logits(logit.float(), t, reduction="none")
        if valid is not None:
            if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool:
                raise TypeError("valid must be a bool tensor")
            if valid.shape != loss.shape:
                raise ValueError(f"valid must have shape {tuple(loss.shape)}, got {tuple(valid.shape)}")
            loss = torch.where(valid, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
        if self.reduction == "none":
            return loss
        if self.reduction == "sum":
            return loss.sum()
        count = loss.numel() if valid is None else valid.sum()
        return loss.sum() / torch.clamp(torch.as_tensor(count, device=loss.device, dtype=loss.dtype), min=1)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"
