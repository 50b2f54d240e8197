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
        num_structures: the number of structures ``C`` (SPEC §11): the logits must have ``C * (R + 1)``
            channels; with ``from_masks=True`` the target is then rater label maps (0..C).
        num_raters: the number of raters ``R``: the logits must have ``R + 1`` channels (``C * (R + 1)``), the
            rater stack ``R`` channels; an error names both numbers. Without it ``R`` is read from the head.
        num_classes: deprecated name of ``num_structures`` (warns; removed in the next release).

    Forward: ``loss(logits (B, R+1, *S), target, valid=None (B, *S) bool)`` with ``target`` the vote count
    ``k`` — ``(B, *S)`` or ``(B, 1, *S)``, any integer dtype or a float holding integers, a MONAI
    ``MetaTensor`` too — or, with ``from_masks=True``, the rater masks ``(B, R, *S)``. Several structures:
    logits ``(B, C * (R+1), *S)`` and ``k`` ``(B, C, *S)``.
    """

    def __init__(self, rps_weight: float = 1.0, majority: int | None = None, reduction: str = "mean",
                 backend: str = "auto", from_masks: bool = False, ignore_index: int | None = None,
                 structure_reduction: str = "sum", num_structures: int | None = None, num_raters: int | None = None,
                 *, num_classes: int | None = None):
        super().__init__()
        from orcal.ops.checks import check_choice, check_int, check_real, renamed

        num_structures = renamed("num_structures", num_structures, "num_classes", num_classes, "OrdinalLoss")

        check_choice("structure_reduction", structure_reduction, ("sum", "mean"))
        self.structure_reduction = structure_reduction
        self.num_structures = None if num_structures is None else check_int("num_structures", num_structures, 1, 255)
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
            k = orc_targets(as_bool_masks(k, "target")) if self.num_structures is None else \
                orc_targets(k, num_structures=self.num_structures)
        return ordinal_loss(logits, k, rps_weight=self.rps_weight, majority=self.majority, valid=valid,
                            reduction=self.reduction, backend=self.backend, ignore_index=self.ignore_index,
                            structure_reduction=self.structure_reduction, num_raters=self.num_raters,
                            num_structures=self.num_structures)

    def extra_repr(self) -> str:
        return (f"rps_weight={self.rps_weight}, majority={self.majority}, reduction={self.reduction!r}"
                + (", from_masks=True" if self.from_masks else "")
                + (f", ignore_index={self.ignore_index}" if self.ignore_index is not None else "")
                + (f", num_raters={self.num_raters}" if self.num_raters is not None else "")
                + (f", num_structures={self.num_structures}" if self.num_structures is not None else ""))


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
        _check_unit_target(t)
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


# ---------------------------------------------------------------------------------------------------------------
# Calibration losses of other work, on a binary head (one logit) and a hard target (the majority label). Each is
# ``loss(logit (B, *S) or (B, 1, *S), target (B, *S) in {0, 1}, valid=None (B, *S) bool) -> mean over valid
# voxels``; the experiment runs them as the methods nacl, hl1_ace and focal (orcal.fusion registers them).


def _check_unit_target(target: torch.Tensor) -> None:
    """A binary head's target is a probability: NaN or a value outside [0, 1] would train without a word."""
    if target.numel() and (bool(torch.isnan(target).any()) or float(target.min()) < 0 or float(target.max()) > 1):
        raise ValueError("target must hold values in [0, 1]")


def _binary_inputs(logit: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None):
    from orcal.ops import plain_tensor

    logit, target, valid = plain_tensor(logit), plain_tensor(target), plain_tensor(valid)
    if logit.ndim == target.ndim + 1 and logit.shape[1] == 1:
        logit = logit[:, 0]
    if logit.shape != target.shape:
        raise ValueError(f"logit {tuple(logit.shape)} (or (B, 1, *S)) and target {tuple(target.shape)} must have "
                         "the same shape")
    if valid is not None and (valid.dtype != torch.bool or valid.shape != target.shape):
        raise ValueError(f"valid must be a bool tensor of shape {tuple(target.shape)}")
    dtype = torch.promote_types(logit.dtype, torch.float32)  # float32 at least; float64 stays (gradcheck)
    target = target.to(dtype)
    _check_unit_target(target)
    return logit.to(dtype), target, valid


def _valid_mean(loss: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if valid is None:
        return loss.mean()
    return torch.where(valid, loss, torch.zeros((), dtype=loss.dtype, device=loss.device)).sum() / valid.sum().clamp(
        min=1)


def hard_l1_ace(confidence: torch.Tensor, target: torch.Tensor, n_bins: int = 20,
                valid: torch.Tensor | None = None) -> torch.Tensor:
    """hL1-ACE, the L1 average calibration error with hard binning (Barfoot et al., "Average Calibration
    Error: A Differentiable Loss for Improved Reliability in Image Segmentation", MICCAI 2024).

    The voxels' foreground probabilities ``confidence`` are put into ``n_bins`` equal-width bins of [0, 1]
    (the last bin holds 1); per non-empty bin, ``|mean confidence - mean target|``; the loss is the mean over
    the non-empty bins. Bin membership is a step function, so the gradient flows through the confidences'
    means only. With a binary target, the background's ACE is the mirror of the foreground's, so the
    foreground's is the binary case of their per-class mean. 0 when no voxel is valid.
    """
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    p, y = confidence.reshape(-1), target.reshape(-1).to(confidence.dtype)
    if valid is not None:
        keep = valid.reshape(-1)
        p, y = p[keep], y[keep]
    index = (p.detach() * n_bins).long().clamp_(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=p.dtype, device=p.device).index_add_(0, index, torch.ones_like(p))
    gap = (torch.zeros_like(count).index_add(0, index, p) - torch.zeros_like(count).index_add(0, index, y))
    filled = count > 0
    if not bool(filled.any()):
        return p.sum() * 0
    return (gap[filled].abs() / count[filled]).mean()


def soft_dice_loss(prob: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None,
                   smooth: float = 1e-5) -> torch.Tensor:
    """``1 - (2 sum(p y) + smooth) / (sum p + sum y + smooth)`` per image over its (valid) voxels, averaged over
    the batch: MONAI's ``DiceLoss(sigmoid=True)`` on one channel with its defaults (``smooth_nr = smooth_dr =
    1e-5``, ``batch=False``). ``prob`` and ``target``: ``(B, *S)``, the same shape (no broadcasting)."""
    from orcal.ops.checks import check_real

    smooth = check_real("smooth", smooth)
    if prob.shape != target.shape or (valid is not None and valid.shape != target.shape):
        raise ValueError(f"soft_dice_loss: prob {tuple(prob.shape)}, target {tuple(target.shape)}"
                         + ("" if valid is None else f" and valid {tuple(valid.shape)}")
                         + " must have one shape (B, *S)")
    if valid is not None:
        prob, target = prob * valid, target * valid
    dims = tuple(range(1, prob.ndim))
    overlap = (prob * target).sum(dims)
    return (1 - (2 * overlap + smooth) / (prob.sum(dims) + target.sum(dims) + smooth)).mean()


#: The segmentation losses hL1-ACE is added to: the authors' DiceCE (as MONAI's ``DiceCELoss(sigmoid=True)``),
#: or BCE alone as for the other binary-head methods.
ACE_BASES = ("dice_ce", "bce")


class HardL1ACELoss(nn.Module):
    """``segmentation loss + ace_weight * hL1-ACE(sigmoid(logit), target)`` (:func:`hard_l1_ace`): the auxiliary
    average-calibration loss of Barfoot et al., added, as they add it, to DiceCE (``ace_base="dice_ce"``: BCE +
    :func:`soft_dice_loss`, MONAI's ``DiceCELoss(sigmoid=True)`` on one channel) or to BCE alone
    (``ace_base="bce"``). Defaults: weight 1, 20 bins, DiceCE. With BCE alone a network trained briefly on
    small foreground can settle on background everywhere: the bins' unweighted mean rewards putting every voxel
    in the lowest bin."""

    def __init__(self, ace_weight: float = 1.0, ace_bins: int = 20, ace_base: str = "dice_ce"):
        super().__init__()
        from orcal.ops.checks import check_int, check_real

        self.ace_weight, self.ace_bins = check_real("ace_weight", ace_weight), check_int("ace_bins", ace_bins, 1)
        if ace_base not in ACE_BASES:
            raise ValueError(f"ace_base must be one of {ACE_BASES}, got {ace_base!r}")
        self.ace_base = ace_base

    def forward(self, logit: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        logit, target, valid = _binary_inputs(logit, target, valid)
        prob = torch.sigmoid(logit)
        loss = _valid_mean(F.binary_cross_entropy_with_logits(logit, target, reduction="none"), valid)
        if self.ace_base == "dice_ce":
            loss = loss + soft_dice_loss(prob, target, valid)
        return loss + self.ace_weight * hard_l1_ace(prob, target, self.ace_bins, valid)

    def extra_repr(self) -> str:
        return f"ace_weight={self.ace_weight}, ace_bins={self.ace_bins}, ace_base={self.ace_base!r}"


class BinaryFocalLoss(nn.Module):
    """Binary focal loss ``-(1 - p_t)^gamma log p_t`` (Lin et al., 2017), computed by
    ``torchvision.ops.sigmoid_focal_loss`` (extra ``orcal[models]``), else by MONAI's ``FocalLoss``.

    ``focal_alpha`` (None: no class weighting, as in the calibration work of Mukhoti et al., 2020) weighs the
    foreground by ``alpha`` and the background by ``1 - alpha`` (Lin et al. used 0.25 for detection).
    """

    def __init__(self, focal_gamma: float = 2.0, focal_alpha: float | None = None):
        super().__init__()
        from orcal.ops.checks import check_real

        self.focal_gamma = check_real("focal_gamma", focal_gamma)
        self.focal_alpha = None if focal_alpha is None else check_real("focal_alpha", focal_alpha)
        if self.focal_alpha is not None and self.focal_alpha > 1:
            raise ValueError(f"focal_alpha must lie in [0, 1] (or be None), got {focal_alpha}")
        try:
            from torchvision.ops import sigmoid_focal_loss
        except ImportError:
            try:
                from monai.losses import FocalLoss
            except ImportError:
                raise ImportError("the focal loss needs torchvision or MONAI: pip install orcal[models] "
                                  "(or orcal[monai])") from None
            monai_loss = FocalLoss(gamma=self.focal_gamma, alpha=self.focal_alpha, reduction="none")
            self._fn = lambda z, y: monai_loss(z[:, None], y[:, None])[:, 0]
        else:
            alpha = -1.0 if self.focal_alpha is None else self.focal_alpha  # torchvision: alpha < 0 is no weighting
            self._fn = lambda z, y: sigmoid_focal_loss(z, y, alpha=alpha, gamma=self.focal_gamma, reduction="none")

    def forward(self, logit: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        logit, target, valid = _binary_inputs(logit, target, valid)
        return _valid_mean(self._fn(logit, target), valid)

    def extra_repr(self) -> str:
        return f"focal_gamma={self.focal_gamma}, focal_alpha={self.focal_alpha}"


class NACLBinaryLoss(nn.Module):
    """MONAI's ``NACLLoss`` (Murugesan et al., MICCAI 2023: cross-entropy plus ``alpha`` times the L1 distance
    between the logits and the mean-filtered one-hot target) on a binary head, called from MONAI (extra
    ``orcal[monai]``).

    The one logit ``z`` becomes the two class logits ``[0, z]``: their softmax is ``[1 - sigmoid(z),
    sigmoid(z)]``, so the cross-entropy is the head's BCE, and the penalty pulls ``z`` toward the foreground's
    neighbourhood proportion (the background channel's term is a constant). Defaults are MONAI's: alpha 0.1, a
    3-wide mean kernel, L1. NACLLoss takes no mask of valid voxels, so with one each image is cropped to the box
    of its valid voxels (the zero padding of a batch of unequal images) and the images' losses are averaged,
    weighted by their voxels.
    """

    def __init__(self, nacl_alpha: float = 0.1, nacl_kernel_size: int = 3, nacl_kernel_ops: str = "mean",
                 nacl_distance: str = "l1", nacl_sigma: float = 1.0):
        super().__init__()
        try:
            from monai.losses import NACLLoss
        except ImportError:
            raise ImportError("method nacl calls MONAI's NACLLoss: pip install orcal[monai]") from None
        self._cls = NACLLoss
        self.options = {"alpha": float(nacl_alpha), "kernel_size": int(nacl_kernel_size),
                        "kernel_ops": nacl_kernel_ops, "distance_type": nacl_distance, "sigma": float(nacl_sigma)}
        self._losses: dict[int, nn.Module] = {}

    def _loss(self, dim: int) -> nn.Module:
        if dim not in self._losses:
            self._losses[dim] = self._cls(classes=2, dim=dim, **self.options)
        return self._losses[dim]

    def forward(self, logit: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        logit, target, valid = _binary_inputs(logit, target, valid)
        loss = self._loss(logit.ndim - 1)
        two = torch.stack([torch.zeros_like(logit), logit], 1)
        label = target.round().long()
        if valid is None or bool(valid.all()):
            return loss(two, label)
        total, count = logit.new_zeros(()), 0
        for i in range(logit.shape[0]):
            where = valid[i].nonzero()
            if not len(where):
                continue
            lo, hi = where.min(0).values.tolist(), (where.max(0).values + 1).tolist()
            box = tuple(slice(a, b) for a, b in zip(lo, hi))
            n = int(valid[i].sum())
            if n != int(torch.tensor([b - a for a, b in zip(lo, hi)]).prod()):
                raise ValueError("NACLLoss takes no mask of valid voxels; the valid voxels of an image must form a box")
            total = total + n * loss(two[i][(slice(None), *box)][None], label[i][box][None])
            count += n
        return total / max(count, 1)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
