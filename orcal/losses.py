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
        from_masks: the target is the rater stack ``(B, R, *S)``; its vote count is taken here.
        ignore_index: a target value marking voxels to leave out (nnU-Net's -1 padding).
        structure_reduction: with several structures (SPEC §11), ``"sum"`` or ``"mean"`` of their losses.
        num_classes: the number of structures ``C`` (SPEC §11): the logits must have ``C * (R + 1)`` channels;
            with ``from_masks=True`` the target is then rater label maps (0..C).
        num_raters: the number of raters ``R``: the logits must have ``R + 1`` channels (``C * (R + 1)``), the
            rater stack ``R`` channels; an error names both numbers. Without it ``R`` is read from the head.

    Forward: ``loss(logits (B, R+1, *S), target, valid=None (B, *S) bool)`` with ``target`` the vote count
    ``k`` — ``(B, *S)`` or ``(B, 1, *S)``, any integer dtype or a float holding integers, a MONAI
    ``MetaTensor`` too — or, with ``from_masks=True``, the rater masks ``(B, R, *S)``. Several structures:
    logits ``(B, C * (R+1), *S)`` and ``k`` ``(B, C, *S)``.
    """

    def __init__(self, rps_weight: float = 1.0, majority: int | None = None, reduction: str = "mean",
                 backend: str = "auto", from_masks: bool = False, ignore_index: int | None = None,
                 structure_reduction: str = "sum", num_classes: int | None = None, num_raters: int | None = None):
        super().__init__()
        from orcal.ops.checks import check_choice, check_int, check_real

        check_choice("structure_reduction", structure_reduction, ("sum", "mean"))
        self.structure_reduction = structure_reduction
        self.num_classes = None if num_classes is None else check_int("num_classes", num_classes, 1, 255)
        self.num_raters = None if num_raters is None else check_int("num_raters", num_raters, 1, 255)

        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.rps_weight, self.majority, self.reduction, self.backend = check_real("rps_weight", rps_weight), \
            majority, reduction, backend
        self.from_masks = bool(from_masks)
        self.ignore_index = None if ignore_index is None else check_int("ignore_index", ignore_index)

    def forward(self, logits: torch.Tensor, k: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        from orcal.ops import orc_targets, ordinal_loss, plain_tensor

        if self.from_masks:
            from orcal.ops.masks import as_bool_masks

            k = plain_tensor(k)
            if self.num_raters is not None and k.ndim > 1 and k.shape[1] != self.num_raters:
                raise ValueError(f"target holds {k.shape[1]} raters (channels), but num_raters = {self.num_raters}")
            k = orc_targets(as_bool_masks(k, "target")) if self.num_classes is None else \
                orc_targets(k, num_classes=self.num_classes)
        return ordinal_loss(logits, k, rps_weight=self.rps_weight, majority=self.majority, valid=valid,
                            reduction=self.reduction, backend=self.backend, ignore_index=self.ignore_index,
                            structure_reduction=self.structure_reduction, num_raters=self.num_raters,
                            num_structures=self.num_classes)

    def extra_repr(self) -> str:
        return (f"rps_weight={self.rps_weight}, majority={self.majority}, reduction={self.reduction!r}"
                + (", from_masks=True" if self.from_masks else "")
                + (f", ignore_index={self.ignore_index}" if self.ignore_index is not None else "")
                + (f", num_raters={self.num_raters}" if self.num_raters is not None else "")
                + (f", num_classes={self.num_classes}" if self.num_classes is not None else ""))


class SoftBCELoss(nn.Module):
    """Binary cross-entropy with logits against hard or soft targets in [0, 1] (the baselines, SPEC §3/§6).

    Computed in float32 from logits (stable for any logit). ``reduction="mean"`` averages over valid voxels
    and is 0 with a zero gradient when no voxel is valid; ``"sum"``; ``"none"`` gives a ``(B, *S)`` map with 0
    where invalid.

    Forward: ``loss(logit (B, 1, *S) or (B, *S), target, valid=None (B, *S) bool)`` with ``target`` in [0, 1],
    ``(B, *S)`` or ``(B, 1, *S)`` (MONAI ``MetaTensor`` s too), or with ``from_masks=True`` the rater masks
    ``(B, R, *S)``, whose soft consensus ``k / R`` is the target. ``ignore_index``: a target value marking
    voxels to leave out (nnU-Net's -1 padding).
    """

    def __init__(self, reduction: str = "mean", from_masks: bool = False, ignore_index: float | None = None):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.reduction, self.from_masks, self.ignore_index = reduction, bool(from_masks), ignore_index

    def forward(self, logit: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        from orcal.ops import drop_ignored, plain_tensor

        logit, target, valid = plain_tensor(logit), plain_tensor(target), plain_tensor(valid)
        for name, x in (("logit", logit), ("target", target)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not logit.is_floating_point():
            raise TypeError(f"logit must be a float tensor, got {logit.dtype}")
        if self.from_masks:
            from orcal.ops.masks import as_bool_masks

            target = as_bool_masks(target, "target").float().mean(1)
        spatial_dims = logit.ndim - 1 if logit.shape[1:2] != (1,) else logit.ndim - 2
        if target.ndim == spatial_dims + 2 and target.shape[1] == 1:
            target = target[:, 0]
        if self.ignore_index is not None:
            target, valid = drop_ignored(target, valid, self.ignore_index)
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
