"""Deprecated: the metric registry moved to :mod:`orcal.metrics.registry` (``orcal.metrics.register_metric``).

This module re-exports it for one release and warns on import.
"""

import warnings

from orcal.metrics.registry import (  # noqa: F401  (the old names, for one release)
    METRICS,
    Metric,
    higher_is_better,
    keys,
    label,
    metrics_from_totals,
    register_metric,
    split_structure,
    unregister_metric,
)

warnings.warn("orcal.metric_table is deprecated and will be removed in the next release; use orcal.metrics "
              "(orcal.metrics.register_metric) or orcal.metrics.registry", DeprecationWarning, stacklevel=2)
