"""Deprecated: the MONAI integration moved to :mod:`orcal.integrations.monai`.

This module re-exports it for one release and warns on import.
"""

import warnings

from orcal.integrations.monai import (  # noqa: F401  (the old names, for one release)
    AFFINE_ATOL,
    MultiRaterCalibrationHandler,
    MultiRaterCalibrationMetric,
    ORCReadoutd,
    ORCTargetd,
    StackRatersd,
    metric_cmp_fn,
    score_function,
)

warnings.warn("orcal.monai is deprecated and will be removed in the next release; use orcal.integrations.monai",
              DeprecationWarning, stacklevel=2)
