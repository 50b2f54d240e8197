"""The statistics of one batch, as the streaming metrics (orcal.metrics, its torchmetrics and MONAI forms)
take them.

:func:`batch_stats` is :func:`orcal.calibration_stats`, with the large batches of the
pure-PyTorch backend fed in slabs along the first spatial axis (its int64 temporaries would otherwise take
tens of bytes per voxel of a CT volume).
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch

from orcal import ops
from orcal.ops.stats import CalibrationStats
from orcal.ops.structures import structures_of

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


def check_raters(configured: int | None, given: int | None) -> int | None:
    """The ``num_raters`` of an update: the one the metric was made with, which an update may repeat (older
    code passes it there) but not contradict; with none made, the update's own (``R`` may then vary)."""
    if given is None:
        return configured
    given = ops.check_int("num_raters", given, 1, ops.MAX_RATERS)
    if configured is not None and given != configured:
        raise ValueError(f"update(num_raters={given}) contradicts num_raters={configured} given when the metric "
                         "was made; give it once, to the constructor")
    return given


def warn_if_post_processed(pred: torch.Tensor, kind: str, name: str = "pred") -> None:
    """Warn when logits (``kind="ordinal"`` or ``"logit"``) all lie in [0, 1]: probabilities or a thresholded
    map where raw network outputs are expected, the trace of a segmentation tutorial's post-processing left in
    place. One min/max over ``pred`` (a second pass only when the first finds [0, 1])."""
    if (kind == "prob" or not isinstance(pred, torch.Tensor) or not pred.numel() or pred.device.type == "meta"
            or not pred.is_floating_point() or torch.compiler.is_compiling()):
        return
    lo, hi = (float(v) for v in torch.aminmax(pred.detach()))
    if not (0.0 <= lo and hi <= 1.0):
        return
    binary = bool(((pred == 0) | (pred == 1)).all())
    held = ("only 0 and 1, a thresholded map (MONAI: AsDiscrete(threshold=0.5))" if binary else
            "only values in [0, 1], probabilities (MONAI: Activations(sigmoid=True) or softmax)")
    fix = ("give the metric the network's raw ordinal outputs (R + 1 channels, no Activations/AsDiscrete "
           "post-processing; view them with orcal.integrations.monai.ORCReadoutd)" if kind == "ordinal" else
           "give the raw logits, or pass kind='prob' if these are probabilities")
    warnings.warn(f"{name} is read as {'ordinal' if kind == 'ordinal' else 'binary'} logits (kind={kind!r}) but "
                  f"holds {held}: the metrics computed from it are wrong; {fix}", UserWarning, stacklevel=3)


def _check_forgot_raters(pred: torch.Tensor, target: torch.Tensor, kind: str) -> None:
    """Vote counts ``k`` given where rater masks are read (no ``num_raters``): refuse, saying to pass it."""
    if target.ndim >= pred.ndim:
        one_channel = target.ndim >= 3 and target.shape[1] == 1
        levels = pred.shape[1] if kind == "ordinal" and pred.ndim >= 2 else 2
        if not one_channel or (levels == 2 and (not target.numel() or target.device.type == "meta"
                                                or int(target.max()) <= 1)):
            return  # a rater stack (one rater's 0/1 channel included)
    raise ValueError(f"target {tuple(target.shape)} holds vote counts k (one channel, or none), which need the "
                     "number of raters: pass num_raters=R where the metric is made (e.g. "
                     "MultiRaterCalibrationMetric(kind=..., num_raters=R)); a rater stack (B, R, *S) needs none")


def prepare(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None, num_raters: int | None,
            kind: str, num_structures: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A metric update's tensors as the ecosystem hands them over (``MetaTensor`` s, channel-first vote
    counts ``(B, 1, *S)``, counts and masks as floats holding integers after MONAI's resampling) as plain
    tensors with integer vote counts ``(B, *S)`` (``(B, C, *S)`` for several structures, which the metric must
    have been told of: ``num_structures``). Warns when logits look post-processed."""
    ops.check_choice("kind", kind, ops.KINDS)
    ops.check_tensor("pred", pred)
    ops.check_tensor("target", target)
    pred, target, valid = ops.plain_tensor(pred), ops.plain_tensor(target), ops.plain_tensor(valid)
    what = "rater label maps" if num_raters is None and num_structures else \
        "rater masks" if num_raters is None else "vote counts"
    target = ops.integer_valued(target, "target", what, 0, ops.MAX_RATERS)
    warn_if_post_processed(pred, kind)
    if num_structures is not None:
        return pred, target, valid
    if num_raters is None:
        _check_forgot_raters(pred, target, kind)
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
