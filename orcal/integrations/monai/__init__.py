"""MONAI building blocks for multi-rater data (``pip install "orcal[monai]"``).

- :class:`StackRatersd`: several raters' label maps ``(1, *S)`` (as ``LoadImaged(ensure_channel_first=True)``
  gives them) → one ``(R, *S)`` uint8 rater stack of a label, plus their union ``(1, *S)`` for
  ``RandCropByPosNegLabeld(label_key="union")``.
- :class:`ORCTargetd`: the rater stack → the vote count ``k`` ``(1, *S)`` uint8, the target of
  :class:`orcal.OrdinalLoss`.
- :class:`ORCReadoutd`: ordinal logits → the foreground probability of a readout, per image.
- :class:`ConformalMaskd`: a fitted conformal calibrator (SPEC §12) applied to one image's probabilities (or
  logits, or ordinal logits through a readout) → its conformal mask and, for voxel sets, the uncertainty mask.
- :class:`MultiRaterCalibrationMetric`: a ``monai.metrics.CumulativeIterationMetric`` over orcal's
  statistics (``metric(y_pred, y)`` on batches or decollated lists, ``aggregate()``, ``reset()``, MONAI's
  gather across ranks), equal to :class:`orcal.metrics.MultiRaterCalibration` on the same data.
- :class:`MultiRaterCalibrationHandler`: that metric as a MONAI/ignite engine handler (one value, e.g. the
  MR-ECE, for ``key_val_metric``); :func:`score_function` and :func:`metric_cmp_fn` for MONAI's checkpoint and
  early-stopping handlers (lower is better for the calibration errors).

MetaTensors keep their metadata through the transforms; the metric and :mod:`orcal.ops` read them as plain
tensors. See docs/integrations.md for a whole 3D loop.
"""

from orcal.integrations.monai.conformal import ConformalMaskd
from orcal.integrations.monai.metric import (
    MultiRaterCalibrationHandler,
    MultiRaterCalibrationMetric,
    metric_cmp_fn,
    score_function,
)
from orcal.integrations.monai.transforms import AFFINE_ATOL, ORCReadoutd, ORCTargetd, StackRatersd

__all__ = ["AFFINE_ATOL", "ConformalMaskd", "MultiRaterCalibrationHandler", "MultiRaterCalibrationMetric",
           "ORCReadoutd", "ORCTargetd", "StackRatersd", "metric_cmp_fn", "score_function"]
