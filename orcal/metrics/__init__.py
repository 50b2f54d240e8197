"""Multi-rater calibration metrics (SPEC §4–5, §10–11): functional pieces beside the streaming classes.

Everything is computed from per-image :class:`~orcal.ops.stats.CalibrationStats` rows (the output of
:func:`orcal.calibration_stats`), so one pass over the voxels feeds every metric, the bootstrap and the plots.

- :mod:`~orcal.metrics.registry`: the metrics themselves, one :func:`register_metric` entry each (key, label,
  direction, value from pooled statistics); every consumer reads this one table.
- :mod:`~orcal.metrics.pooled`: :func:`calibration_metrics` of pooled rows, per structure, the reliability
  :func:`bin_table`, the exact AUC, and the :func:`bootstrap` over images.
- :mod:`~orcal.metrics.batch_stats`: one batch's statistics as every streaming form takes them.
- :mod:`~orcal.metrics.streaming`: :class:`MultiRaterCalibration`, the streaming metric with distributed sync.
- :mod:`~orcal.metrics.comparison`: seeds and paired differences on the same bootstrap draws (SPEC §5.1).
- :mod:`~orcal.metrics.volume`: volume uncertainty of several structures (SPEC §11.4).
- :mod:`~orcal.metrics.calibrate`: post-hoc temperature scaling (SPEC §10).
- :mod:`~orcal.metrics.conformal`: conformal thresholds and volume intervals against a random rater (SPEC §12).
- :mod:`~orcal.metrics.conformal_sets`: conformal voxel label sets with an uncertainty mask, and consensus-level
  sets of an ordinal head (SPEC §12.3–12.4); saving and loading fitted calibrators.
- :mod:`~orcal.metrics.conformal_evaluation`: every kind of conformal set measured per image
  (:class:`ConformalEvaluation`, the registry ``KINDS`` of what is reported).
- :mod:`~orcal.metrics.plots`: reliability diagrams and confidence-vs-agreement plots.

When torchmetrics is installed, the same statistics are also ``torchmetrics.Metric`` classes (summed states,
so the value is pooled over batches and ranks): the scalar :class:`MultiRaterECE`, :class:`MultiRaterAUROC`,
:class:`MultiRaterBrier` and :class:`MultiRaterDice` for Lightning's ``self.log``, and
:class:`MultiRaterCalibrationMetric` (every metric as a dict) for ``self.log_dict``; see
:mod:`orcal.integrations.torchmetrics`. They load on first access, so torchmetrics stays optional.
"""

from __future__ import annotations

from orcal.metrics.calibrate import TemperatureScaler, apply_temperature, fit_temperature
from orcal.metrics.comparison import exceeds_noise, paired_difference, seed_summary
from orcal.metrics.conformal import ConformalRiskControl, ConformalVolume, fnr_curves, min_calibration_images
from orcal.metrics.conformal_evaluation import ConformalEvaluation
from orcal.metrics.conformal_sets import (
    ConformalLevelSets,
    ConformalVoxelSets,
    VoxelSets,
    level_set_curves,
    load_conformal,
    save_conformal,
    voxel_set_curves,
)
from orcal.metrics.pooled import (
    auc_exact,
    bin_table,
    bootstrap,
    bootstrap_samples,
    calibration_metrics,
    per_structure,
    summarize_samples,
)
from orcal.metrics.registry import METRICS, Metric, register_metric, unregister_metric
from orcal.metrics.streaming import MultiRaterCalibration, agreement_table, summarize
from orcal.metrics.volume import VolumeStats, volume_metrics, volume_stats
from orcal.ops.stats import CalibrationStats

#: The ``torchmetrics.Metric`` classes of :mod:`orcal.integrations.torchmetrics`, reachable from here.
TORCHMETRICS_CLASSES = ("MultiRaterCalibrationMetric", "MultiRaterECE", "MultiRaterAUROC", "MultiRaterBrier",
                        "MultiRaterDice")


def __getattr__(name: str):
    # torchmetrics is optional: its forms are imported on first access only.
    if name in TORCHMETRICS_CLASSES:
        import importlib

        return getattr(importlib.import_module("orcal.integrations.torchmetrics"), name)
    raise AttributeError(f"module 'orcal.metrics' has no attribute {name!r}")


__all__ = [
    "METRICS",
    "CalibrationStats",
    "ConformalEvaluation",
    "ConformalLevelSets",
    "ConformalRiskControl",
    "ConformalVolume",
    "ConformalVoxelSets",
    "Metric",
    "MultiRaterCalibration",
    "TemperatureScaler",
    "VolumeStats",
    "VoxelSets",
    "agreement_table",
    "apply_temperature",
    "auc_exact",
    "bin_table",
    "bootstrap",
    "bootstrap_samples",
    "calibration_metrics",
    "exceeds_noise",
    "fit_temperature",
    "fnr_curves",
    "level_set_curves",
    "load_conformal",
    "paired_difference",
    "min_calibration_images",
    "per_structure",
    "register_metric",
    "save_conformal",
    "seed_summary",
    "summarize",
    "summarize_samples",
    "unregister_metric",
    "volume_metrics",
    "volume_stats",
    "voxel_set_curves",
]
