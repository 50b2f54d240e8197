"""Deprecated: temperature scaling moved to :mod:`orcal.metrics.calibrate` (``orcal.metrics.TemperatureScaler``).

This module re-exports it for one release and warns on import.
"""

import warnings

from orcal.metrics.calibrate import (  # noqa: F401  (the old names, for one release)
    TemperatureScaler,
    apply_temperature,
    fit_temperature,
)

warnings.warn("orcal.calibrate is deprecated and will be removed in the next release; use orcal.metrics "
              "(orcal.metrics.TemperatureScaler)", DeprecationWarning, stacklevel=2)
