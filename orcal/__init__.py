"""orcal: calibrated multi-rater segmentation with Ordinal Rater Consensus.

The public API (SPEC §7)::

    k    = orcal.orc_targets(masks)
    loss = orcal.ordinal_loss(logits, k, rps_weight=1.0)
    p    = orcal.foreground_probability(logits, readout="majority")
    st   = orcal.calibration_stats(p, masks)
    vals = orcal.calibration_metrics(st)
    ci   = orcal.bootstrap(st, n_boot=1000)

Several structures (SPEC §11)::

    k    = orcal.orc_targets(labels, num_structures=C)       # (B, C, *S)
    loss = orcal.ordinal_loss(logits, k)                     # logits (B, C * (R+1), *S)
    st   = orcal.calibration_stats(logits, k, num_raters=R, kind="ordinal")
    vol  = orcal.volume_metrics(orcal.volume_stats(p, labels, spacing, num_structures=C))
"""

from orcal.metrics.pooled import bootstrap, calibration_metrics
from orcal.metrics.volume import VolumeStats, volume_metrics, volume_stats
from orcal.ops import _ext, calibration_stats, foreground_probability, orc_targets, ordinal_loss
from orcal.ops.stats import CalibrationStats

__version__ = "0.1.0"

build_info = _ext.build_info


def __getattr__(name: str):
    # Sub-modules with heavier dependencies load on first use: orcal.metrics, orcal.fusion, orcal.data, ...
    import importlib

    if name in {"metrics", "fusion", "data", "models", "losses", "train", "evaluate", "experiment",
                "reference", "plots", "io", "calibrate"}:
        return importlib.import_module(f"orcal.{name}")
    if name in {"OrdinalLoss", "SoftBCELoss"}:  # the nn.Module forms, for `from orcal import OrdinalLoss`
        return getattr(importlib.import_module("orcal.losses"), name)
    raise AttributeError(f"module 'orcal' has no attribute {name!r}")


__all__ = [
    "CalibrationStats",
    "OrdinalLoss",
    "SoftBCELoss",
    "VolumeStats",
    "bootstrap",
    "build_info",
    "calibration_metrics",
    "calibration_stats",
    "foreground_probability",
    "ordinal_loss",
    "orc_targets",
    "volume_metrics",
    "volume_stats",
    "__version__",
]
