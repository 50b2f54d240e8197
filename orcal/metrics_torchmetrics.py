"""Deprecated: the torchmetrics forms moved to :mod:`orcal.integrations.torchmetrics` (the classes are also
``orcal.metrics.MultiRaterECE``, ...).

This module re-exports them for one release and warns on import.
"""

import warnings

from orcal.integrations.torchmetrics import (  # noqa: F401  (the old names, for one release)
    MultiRaterAUROC,
    MultiRaterBrier,
    MultiRaterCalibrationMetric,
    MultiRaterDice,
    MultiRaterECE,
    MultiRaterStatistics,
)

warnings.warn("orcal.metrics_torchmetrics is deprecated and will be removed in the next release; use "
              "orcal.integrations.torchmetrics (or orcal.metrics.MultiRaterECE, ...)", DeprecationWarning,
              stacklevel=2)
