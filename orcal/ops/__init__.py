"""The public ops (SPEC §7): the ORC target, the readouts, the loss and the calibration statistics, for one
structure or several (SPEC §11). The metrics and the bootstrap of the statistics live in :mod:`orcal.metrics`.

Every op takes ``backend="auto" | "torch" | "cpp" | "triton"`` (or a backend added to the table of
:mod:`orcal.ops.backends`); ``ORCAL_BACKEND`` forces one when ``backend="auto"``. ``auto`` picks, per op and
device: compiled kernels if built for that device, else Triton on CUDA tensors, else the pure-PyTorch
reference. All backends compute the same function.

The package: :mod:`~orcal.ops._schema` (the op contract), :mod:`~orcal.ops._ext` (the compiled extension),
:mod:`~orcal.ops.backends` (the backend table), :mod:`~orcal.ops.checks` and :mod:`~orcal.ops.validation` (argument
checks), :mod:`~orcal.ops.masks` (the rater-mask rule), :mod:`~orcal.ops.subclasses` (``MetaTensor`` inputs),
:mod:`~orcal.ops.structures` (the several-structure views), :mod:`~orcal.ops.reference` (the spec in plain PyTorch)
and :mod:`~orcal.ops._triton` (the Triton kernels).
"""

from __future__ import annotations

import dataclasses

import torch

from orcal.ops import _ext, _schema, backends, reference, structures  # noqa: F401  (_ext, _schema: the package)
from orcal.ops._schema import (  # noqa: F401  (the op contract, re-exported)
    FLOAT_DTYPES,
    KINDS,
    MAX_AUC_BINS,
    MAX_ECE_BINS,
    MAX_RATERS,
    READOUTS,
    REDUCTIONS,
    opmath_dtype,
    under_func_transform,
)
from orcal.ops.backends import BACKENDS, register_backend, resolve_backend, unregister_backend  # noqa: F401
from orcal.ops.checks import (  # noqa: F401  (check_* re-exported)
    check_choice,
    check_int,
    check_real,
    check_tensor,
    data_check,
    integer_range,
    integer_valued,
    renamed,
)
from orcal.ops.masks import check_masks
from orcal.ops.stats import CalibrationStats
from orcal.ops.subclasses import plain_tensor, subclass_backend
from orcal.ops.validation import (  # noqa: F401  (channel_first_votes, drop_ignored, check_valid re-exported)
    as_votes,
    channel_first_votes,
    check_float,
    check_majority,
    check_no_majority,
    check_ordinal_logits,
    check_probabilities,
    check_same_device,
    check_spatial,
    check_valid,
    drop_ignored,
    loss_targets,
)

# --- §1 ORC target ---------------------------------------------------------------------------------------

def orc_targets(masks: torch.Tensor, backend: str = "auto", num_structures: int | None = None, *,
                num_classes: int | None = None) -> torch.Tensor:
    """Ordinal Rater Consensus target: the number of raters voting foreground.

    Args:
        masks: ``(B, R, *S)`` bool or uint8 masks in {0, 1}, one per rater; with ``num_structures``, rater label
            maps ``(B, R, *S)`` of any integer dtype (0 background, 1..C structures, one label per voxel). A
            float tensor holding integers (MONAI's) is read as those integers (SPEC §8).
        backend: ``"auto"``, ``"torch"``, ``"cpp"`` or ``"triton"``.
        num_structures: the number of structures ``C`` of label maps (SPEC §11).
        num_classes: deprecated name of ``num_structures`` (warns; removed in the next release).

    Returns:
        ``(B, *S)`` uint8 vote counts ``k`` in 0..R; with ``num_structures``, ``(B, C, *S)``: per structure, the
        raters who gave the voxel that label (so the counts of a voxel sum to at most R).
    """
    num_structures = renamed("num_structures", num_structures, "num_classes", num_classes, "orc_targets")
    if num_structures is not None:
        labels = plain_tensor(masks)
        C = structures.check_labels(labels, num_structures, "masks")
        # one binary count per structure, on whichever backend counts binary masks
        return torch.stack([orc_targets(labels == c, backend) for c in range(1, C + 1)], 1)
    raw, masks = masks, plain_tensor(masks)
    if isinstance(masks, torch.Tensor):
        masks = integer_valued(masks, "masks", "rater masks", 0, 1)
    which = resolve_backend("orc_targets", backend, masks.device if isinstance(masks, torch.Tensor) else
                            torch.device("cpu"))
    which = subclass_backend("orc_targets", which, backend, raw)
    check_masks(masks, check_values=which == "torch")  # compiled kernels check values in their pass
    if which == "torch":
        return reference.orc_targets(masks)
    return backends.call(which, "orc_targets", masks.device, masks)


# --- §2 readouts -----------------------------------------------------------------------------------------

def foreground_probability(logits: torch.Tensor, readout: str = "majority", majority: int | None = None,
                           backend: str = "auto", num_structures: int | None = None) -> torch.Tensor:
    """Foreground probability ``(B, *S)`` from ordinal logits ``(B, R+1, *S)``; with ``num_structures = C``,
    ``(B, C, *S)`` from the structure-major logits ``(B, C * (R+1), *S)`` of SPEC §11.

    ``readout="majority"`` (the paper's Eq. 2) is the probability that at least ``majority`` raters vote
    foreground; ``readout="expected"`` is the expected fraction of raters voting foreground. The result
    has the dtype of ``logits``. Compiled kernels read the logits once and write ``p`` once; when the logits
    require grad the differentiable reference is used. A tensor subclass (a MONAI ``MetaTensor``) is read as
    a plain tensor, and the result is a plain tensor.
    """
    raw, logits = logits, plain_tensor(logits)
    if num_structures is not None:
        check_tensor("logits", logits)
        check_spatial("logits", logits, 1)
        C = num_structures
        structures.raters_per_structure(logits.shape[1], C)
        p = foreground_probability(structures.fold(logits, C), readout, majority, backend)
        return structures.unfold(p, C)
    R = check_ordinal_logits(logits)
    check_choice("readout", readout, READOUTS)
    if readout == "half_tie":
        check_no_majority(readout, majority)
        # two majority passes (the kernels do not return q_{R/2} on its own), averaged in the accumulation dtype
        ps = [foreground_probability(raw, "majority", m, backend) for m in reference.half_tie_thresholds(R)]
        return (sum(p.to(opmath_dtype(p.dtype)) for p in ps) / len(ps)).to(ps[0].dtype)
    m = check_majority(R, majority)
    which = resolve_backend("foreground_probability", backend, logits.device)
    which = subclass_backend("foreground_probability", which, backend, raw)
    if logits.requires_grad and torch.is_grad_enabled():
        which = "torch"
    if which == "torch":
        return reference.foreground_probability(logits, readout, m).to(logits.dtype)
    return backends.call(which, "foreground_probability", logits.device, logits, readout, m)


# --- §3 loss ---------------------------------------------------------------------------------------------

def ordinal_loss(logits: torch.Tensor, k: torch.Tensor, rps_weight: float = 1.0, majority: int | None = None,
                 valid: torch.Tensor | None = None, reduction: str = "mean", backend: str = "auto",
                 ignore_index: int | None = None, structure_reduction: str = "sum", num_raters: int | None = None,
                 num_structures: int | None = None) -> torch.Tensor:
    """Ordinal rater-consensus loss: ``BCE(majority logit, [k >= m]) + rps_weight * RPS`` (SPEC §3).

    Several structures (SPEC §11): ``k`` ``(B, C, *S)`` with ``C > 1`` and logits ``(B, C * (R+1), *S)``
    (channel ``c * (R+1) + level``) give the loss of each structure, reduced over its valid voxels, then
    summed or averaged over the structures as ``structure_reduction`` (``"sum"`` or ``"mean"``) says;
    ``reduction="none"`` gives the ``(B, C, *S)`` map. ``valid`` is then ``(B, *S)`` or ``(B, C, *S)``.

    Args:
        logits: ``(B, R+1, *S)`` float32/float16/bfloat16 logits, one per consensus level 0..R.
        k: ``(B, *S)`` or channel-first ``(B, 1, *S)`` vote counts in 0..R: uint8, another integer dtype, or a
            float tensor holding integers (MONAI's loaders give float32). MONAI ``MetaTensor`` s are accepted.
        rps_weight: weight ``lambda`` of the Ranked Probability Score term (normalised by R).
        majority: smallest vote count that is foreground; default ``R // 2 + 1``.
        valid: optional ``(B, *S)`` bool mask of voxels that count.
        reduction: ``"mean"`` over valid voxels, ``"sum"``, or ``"none"`` (a ``(B, *S)`` map, 0 where invalid).
        backend: ``"auto"``, ``"torch"``, ``"cpp"`` or ``"triton"``.
        ignore_index: a value of ``k`` that marks voxels to leave out (nnU-Net pads with -1): they are treated
            as invalid (no loss, zero gradient).
        num_raters, num_structures: ``R`` and ``C`` when known: the logits must then have ``R + 1`` (or
            ``C * (R + 1)``) channels and ``k`` ``C`` channels, else an error names both numbers. Without
            them ``R`` is read from the head, so a head sized for other raters trains on other counts.

    Returns:
        The loss in float32 (float64 for float64 logits). Compiled backends compute the gradient in the
        same pass when ``logits`` requires grad; backward only scales it.
    """
    raw = (logits, k, valid)
    logits, k, valid = plain_tensor(logits), plain_tensor(k), plain_tensor(valid)
    check_tensor("logits", logits)
    C = structures.structures_of(logits, k)
    if num_raters is not None or num_structures is not None:
        check_spatial("logits", logits, 1)
        structures.check_head(logits.shape[1], num_raters, num_structures)
        if num_structures is not None and (C or 1) != num_structures:
            raise ValueError(f"k {tuple(k.shape)} holds the vote counts of {C or 1} structure(s) (channels), but "
                             f"num_structures = {num_structures}: k must be (B, C, *S)")
    if C is not None:
        return _structure_loss(logits, k, C, rps_weight, majority, valid, reduction, backend, ignore_index,
                               structure_reduction)
    R = check_ordinal_logits(logits)
    spatial = logits.shape[:1] + logits.shape[2:]
    k, valid = loss_targets(k, valid, spatial, ignore_index)
    k = as_votes(k, spatial, R, device=logits.device)
    check_valid(valid, spatial, "k")
    check_same_device(logits=logits, k=k, valid=valid)
    check_choice("reduction", reduction, tuple(REDUCTIONS))
    w = check_real("rps_weight", rps_weight)
    m = check_majority(R, majority)
    which = subclass_backend("ordinal_loss", resolve_backend("ordinal_loss", backend, logits.device), backend, *raw)
    if which != "torch" and under_func_transform():
        # torch.func (grad, vjp, hessian, ...) differentiates through the op; the fused backward is a saved
        # constant, so only the reference gives the right answer there.
        if backend != "auto":
            raise RuntimeError(f"torch.func transforms are not supported by the fused ordinal_loss of "
                               f"backend={backend!r}; use backend='torch' or 'auto' (which uses it under torch.func)")
        which = "torch"
    if which == "torch":
        if k.numel() and k.device.type != "meta":
            data_check(k.max() <= R, lambda: f"k must lie in 0..R = 0..{R}; found {int(k.max())}")
        return reference.ordinal_loss(logits, k, w, m, valid, reduction)
    need_grad = logits.requires_grad and torch.is_grad_enabled()
    loss, _ = backends.call(which, "ordinal_loss", logits.device, logits, k, valid, w, m, REDUCTIONS[reduction],
                            need_grad)
    return loss


def _structure_loss(logits, k, C, rps_weight, majority, valid, reduction, backend, ignore_index,
                    structure_reduction):
    """The loss of SPEC §11: the binary loss on the ``(B * C, R + 1, *S)`` view, reduced per structure."""
    check_choice("structure_reduction", structure_reduction, ("sum", "mean"))
    check_choice("reduction", reduction, tuple(REDUCTIONS))
    check_spatial("logits", logits, 1)
    structures.raters_per_structure(logits.shape[1], C)
    spatial = logits.shape[:1] + logits.shape[2:]
    if k.shape[:1] + k.shape[2:] != spatial:
        raise ValueError(f"k {tuple(k.shape)} must be (B, C, *S) with the logits' B and S {tuple(spatial)}")
    flat_k, flat_valid = structures.fold(k, C), structures.fold_valid(valid, spatial, C)
    if ignore_index is not None:
        flat_k, flat_valid = loss_targets(flat_k, flat_valid, flat_k.shape, ignore_index)
    # A per-structure mean needs the voxel count of each structure unless they all count the same voxels.
    shared = ignore_index is None and (valid is None or valid.shape == spatial)
    if reduction == "none" or (reduction == "mean" and not shared):
        losses = ordinal_loss(structures.fold(logits, C), flat_k, rps_weight, majority, flat_valid, "none", backend)
        losses = structures.unfold(losses, C)
        if reduction == "none":
            return losses
        counts = structures.unfold(flat_valid, C).transpose(0, 1).reshape(C, -1).sum(1).clamp_min(1)
        per_structure = losses.transpose(0, 1).reshape(C, -1).sum(1) / counts
        return per_structure.sum() if structure_reduction == "sum" else per_structure.mean()
    # One fused pass over the view: its mean over B * C * N voxels is the mean over structures of the
    # per-structure means over N, and its sum is the sum over structures.
    loss = ordinal_loss(structures.fold(logits, C), flat_k, rps_weight, majority, flat_valid, reduction, backend)
    scale = {("mean", "sum"): C, ("sum", "mean"): 1 / C}.get((reduction, structure_reduction), 1)
    return loss * scale if scale != 1 else loss


# --- §4 calibration statistics and metrics ---------------------------------------------------------------

def calibration_stats(pred: torch.Tensor, target: torch.Tensor, num_raters: int | None = None,
                      kind: str = "prob", readout: str = "majority", majority: int | None = None,
                      n_bins: int = 15, auc_bins: int = 4096, valid: torch.Tensor | None = None,
                      backend: str = "auto", num_structures: int | None = None) -> CalibrationStats:
    """Per-image multi-rater calibration statistics in one pass (SPEC §4).

    Args:
        pred: probabilities ``(B, *S)`` or ``(B, 1, *S)`` (``kind="prob"``), binary logits of the same
            shapes (``kind="logit"``), or ordinal logits ``(B, R+1, *S)`` (``kind="ordinal"``, read out with
            ``readout``; the probability is never materialised by compiled kernels).
        target: rater masks ``(B, R, *S)`` when ``num_raters`` is None, else vote counts ``k`` ``(B, *S)`` or
            channel-first ``(B, 1, *S)``.
        num_raters: ``R`` when ``target`` holds vote counts.
        majority: majority threshold for the readout and the Dice counts; default ``R // 2 + 1``.
        n_bins: equal-width ECE bins; auc_bins: score bins of the streaming AUC.
        valid: optional ``(B, *S)`` bool mask of voxels that count.
        num_structures: ``C`` structures at once (SPEC §11): ``pred`` is ``(B, C, *S)`` (probabilities or
            logits) or ``(B, C * (R+1), *S)`` (ordinal), and ``target`` holds rater label maps ``(B, R, *S)``
            (0..C) or, with ``num_raters``, vote counts ``(B, C, *S)``; ``valid`` is ``(B, *S)`` or
            ``(B, C, *S)``. Ordinal logits with ``(B, C, *S)`` vote counts, ``C > 1``, need not say it.

    Returns:
        :class:`~orcal.ops.stats.CalibrationStats` with one row per image (per image and structure for several
        structures, ``num_structures`` set).
    """
    raw = (pred, target, valid)
    pred, target, valid = plain_tensor(pred), plain_tensor(target), plain_tensor(valid)
    check_tensor("pred", pred)
    check_tensor("target", target)
    if num_structures is None and kind == "ordinal" and num_raters is not None:
        num_structures = structures.structures_of(pred, target)
    if num_structures is not None:
        return _structure_stats(pred, target, num_raters, kind, readout, majority, n_bins, auc_bins, valid,
                                backend, num_structures)
    check_choice("kind", kind, KINDS)
    check_choice("readout", readout, READOUTS)
    check_float("pred", pred)
    n_bins = check_int("n_bins", n_bins, 1, MAX_ECE_BINS)
    auc_bins = check_int("auc_bins", auc_bins, 2, MAX_AUC_BINS)
    if num_raters is None:  # target are masks
        target = integer_valued(target, "target", "rater masks", 0, 1)
        check_masks(target, "target", check_values=False)
        R = target.shape[1]
        spatial = target.shape[:1] + target.shape[2:]
    else:
        R = check_int("num_raters", num_raters, 1, MAX_RATERS)
        target, valid = channel_first_votes(pred, target, valid, kind)
        spatial = target.shape
    if kind == "ordinal":
        if check_ordinal_logits(pred, "pred") != R:
            raise ValueError(f"ordinal pred has {pred.shape[1]} channels, so R + 1 channels means R = "
                             f"{pred.shape[1] - 1}, but the target has R = {R} raters")
        pred_spatial = pred.shape[:1] + pred.shape[2:]
    else:
        if pred.ndim == len(spatial) + 1 and pred.shape[1] == 1:
            pred = pred[:, 0]
        pred_spatial = pred.shape
    if pred_spatial != spatial:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} do not describe the same "
                         f"images: spatial shapes {tuple(pred_spatial)} vs {tuple(spatial)}")
    if len(spatial) not in (3, 4):
        raise ValueError(f"images must be 2D or 3D: target has shape {tuple(target.shape)}")
    check_valid(valid, spatial, "the images")
    check_same_device(pred=pred, target=target, valid=valid)
    m = check_majority(R, majority)
    which = resolve_backend("calibration_stats", backend, pred.device)
    which = subclass_backend("calibration_stats", which, backend, *raw)
    if kind == "ordinal" and readout == "half_tie" and which != "torch":  # the kernels read out majority/expected
        pred, kind, readout = foreground_probability(pred, readout, backend=which), "prob", "majority"
    if which == "torch":
        return _reference_stats(pred, target, num_raters, R, kind, readout, m, n_bins, auc_bins, valid)
    if num_raters is not None:
        target = as_votes(target, spatial, R, "target")
    counts, sums = backends.call(which, "calibration_stats", pred.device, pred, target, valid, R, num_raters is None,
                                 kind, readout, m, n_bins, auc_bins)
    return CalibrationStats.unpack(counts, sums, n_bins, auc_bins)


def fold_structures(pred, target, num_raters, kind, valid, backend, C):
    """Check the inputs of SPEC §11 statistics and return their binary views ``(pred, k, valid, R)``: pred
    ``(B * C, ...)``, vote counts ``(B * C, *S)`` (rater label maps counted first), valid likewise."""
    C = check_int("num_structures", C, 1)
    check_choice("kind", kind, KINDS)
    check_spatial("pred", pred, 1)
    if num_raters is None:  # rater label maps (B, R, *S)
        structures.check_labels(target, C, "target")
        num_raters = target.shape[1]
        target = orc_targets(target, backend, num_structures=C)
    channels = C * (check_int("num_raters", num_raters, 1, MAX_RATERS) + 1) if kind == "ordinal" else C
    if pred.shape[1] != channels:
        raise ValueError(f"pred {tuple(pred.shape)} must have {channels} channels: "
                         + (f"C * (R + 1) for C = {C} structures and R = {num_raters} raters" if kind == "ordinal"
                            else f"one per structure, C = {C}"))
    spatial = pred.shape[:1] + pred.shape[2:]
    if target.shape[:1] + target.shape[2:] != spatial or target.shape[1] != C:
        raise ValueError(f"target {tuple(target.shape)} must be (B, C, *S) = {(spatial[0], C, *spatial[1:])}")
    return (structures.fold(pred, C), structures.fold(target, C), structures.fold_valid(valid, spatial, C),
            num_raters)


def _structure_stats(pred, target, num_raters, kind, readout, majority, n_bins, auc_bins, valid, backend, C):
    """The statistics of SPEC §11: the binary pass over the ``(B * C, ...)`` views, one row per structure."""
    pred, k, valid, R = fold_structures(pred, target, num_raters, kind, valid, backend, C)
    st = calibration_stats(pred, k, R, kind, readout, majority, n_bins, auc_bins, valid, backend)
    return dataclasses.replace(st, num_structures=C)


def _reference_stats(pred, target, num_raters, R, kind, readout, m, n_bins, auc_bins, valid):
    if num_raters is None:
        check_masks(target, "target")
        k = reference.orc_targets(target)
    else:
        k = as_votes(target, target.shape, R, "target")
        if k.numel():
            data_check(k.max() <= R, lambda: f"target vote counts must lie in 0..R = 0..{R}; found {int(k.max())}")
    p = reference.binary_probability(pred, kind, readout, m)
    check_probabilities(p, valid, "pred", kind)
    return reference.calibration_stats(p, k, R, n_bins, auc_bins, m, valid)

