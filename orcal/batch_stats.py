"""The statistics of one batch, as the streaming metrics (orcal.metrics, its torchmetrics forms, orcal.monai)
take them.

:func:`batch_stats` is :func:`orcal.calibration_stats`, with the large batches of the
pure-PyTorch backend fed in slabs along the first spatial axis (its int64 temporaries would otherwise take
tens of bytes per voxel of a CT volume).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from orcal import ops
from orcal.stats import CalibrationStats
from orcal.structures import structures_of

#: With the pure-PyTorch backend, a batch larger than this many voxels goes to calibration_stats in slabs.
SLAB_VOXELS = 1 << 22


def check_options(n_bins: int, auc_bins: int, kind: str, readout: str, majority: int | None,
                  backend: str) -> tuple[int, int, int | None]:
    """Validate a streaming metric's options; returns ``(n_bins, auc_bins, majority)`` as ints."""
    n_bins = ops.check_int("n_bins", n_bins, 1, ops.MAX_ECE_BINS)
    auc_bins = ops.check_int("auc_bins", auc_bins, 2, ops.MAX_AUC_BINS)
    ops.check_choice("kind", kind, ops.KINDS)
    ops.check_choice("readout", readout, ops.READOUTS)
    ops.check_choice("backend", backend, ops.BACKENDS)
    if majority is not None:
        majority = ops.check_int("majority", majority, 1, ops.MAX_RATERS)
    return n_bins, auc_bins, majority


def prepare(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None, num_raters: int | None,
            kind: str, num_structures: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A metric update's tensors as the ecosystem hands them over (``MetaTensor`` s, channel-first vote
    counts ``(B, 1, *S)``) as plain tensors with vote counts ``(B, *S)`` (``(B, C, *S)`` for several
    structures, which the metric must have been told of: ``num_structures``)."""
    ops.check_choice("kind", kind, ops.KINDS)
    ops.check_tensor("pred", pred)
    ops.check_tensor("target", target)
    pred, target, valid = ops.plain_tensor(pred), ops.plain_tensor(target), ops.plain_tensor(valid)
    if num_structures is not None:
        return pred, target, valid
    if kind == "ordinal" and num_raters is not None and structures_of(pred, target) is not None:
        raise ValueError(f"target {tuple(target.shape)} has as many dimensions as the ordinal logits and "
                         f"{target.shape[1]} channels: vote counts of {target.shape[1]} structures (then pass "
                         f"num_structures={target.shape[1]}, SPEC §11), or rater masks (then leave num_raters unset)")
    if num_raters is not None:
        target, valid = ops.channel_first_votes(pred, target, valid, kind)
    return pred, target, valid


def batch_stats(pred: torch.Tensor, target: torch.Tensor, *, num_raters: int | None, valid: torch.Tensor | None,
                kind: str, readout: str, majority: int | None, n_bins: int, auc_bins: int,
                backend: str, device: torch.device | str | None = None,
                num_structures: int | None = None) -> CalibrationStats:
    """Per-image statistics of one batch (arguments as :func:`orcal.calibration_stats`, with plain tensors and
    vote counts ``(B, *S)``), moved to ``device`` (None: they stay where the prediction is, so an update on
    a GPU waits for nothing); the rows of an image's slabs add up to its row."""
    def call(p, t, v):
        return ops.calibration_stats(p, t, num_raters=num_raters, kind=kind, readout=readout, majority=majority,
                                     n_bins=n_bins, auc_bins=auc_bins, valid=v, backend=backend,
                                     num_structures=num_structures)

    if num_structures is not None:
        return _structure_batch_stats(pred, target, num_raters, valid, num_structures, device, call,
                                      dict(kind=kind, readout=readout, majority=majority, n_bins=n_bins,
                                           auc_bins=auc_bins, backend=backend))

    spatial = tuple(target.shape[1:] if num_raters is not None else target.shape[2:])
    axis_p = pred.ndim - len(spatial)
    axis_t = target.ndim - len(spatial)
    voxels = target.shape[0] * math.prod(spatial)
    slab_ok = (len(spatial) >= 2 and tuple(pred.shape[axis_p:]) == spatial and axis_p in (1, 2)
               and (valid is None or tuple(valid.shape[1:]) == spatial))
    if (voxels <= SLAB_VOXELS or not slab_ok
            or ops.resolve_backend("calibration_stats", backend, pred.device) != "torch"):
        st = call(pred, target, valid)
        return st if device is None else st.to(device)
    step = max(1, SLAB_VOXELS // max(1, voxels // spatial[0]))
    counts = sums = None
    for start in range(0, spatial[0], step):
        length = min(step, spatial[0] - start)
        part = call(pred.narrow(axis_p, start, length), target.narrow(axis_t, start, length),
                    None if valid is None else valid[:, start:start + length])
        c, f = part.pack()
        counts, sums = (c, f) if counts is None else (counts + c, sums + f)
    st = CalibrationStats.unpack(counts, sums, n_bins, auc_bins)
    return st if device is None else st.to(device)


def _structure_batch_stats(pred, target, num_raters, valid, C, device, call, options) -> CalibrationStats:
    """:func:`batch_stats` of several structures: a large batch on the reference backend goes through the
    binary slabs of its ``(B * C, ...)`` view, so its temporaries stay bounded as for one structure."""
    large = target.shape[0] * math.prod(pred.shape[2:]) * C > SLAB_VOXELS
    if not large or ops.resolve_backend("calibration_stats", options["backend"], pred.device) != "torch":
        st = call(pred, target, valid)
        return st if device is None else st.to(device)
    pred, k, valid, R = ops.fold_structures(pred, target, num_raters, options["kind"], valid, options["backend"], C)
    st = batch_stats(pred, k, num_raters=R, valid=valid, device=device, **options)
    return dataclasses.replace(st, num_structures=C)
