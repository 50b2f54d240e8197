"""Deprecated: the metric plots moved to :mod:`orcal.metrics.plots`.

This module re-exports them for one release and warns on import.
"""

import warnings

from orcal.metrics.plots import (  # noqa: F401  (the old names, for one release)
    confidence_vs_agreement,
    draw_reliability,
    reliability_diagram,
    reliability_per_structure,
)

warnings.warn("orcal.plots is deprecated and will be removed in the next release; use orcal.metrics.plots",
              DeprecationWarning, stacklevel=2)
