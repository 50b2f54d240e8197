"""Deprecated path: the readable reference of the ops (SPEC §1–4) moved to :mod:`orcal.ops.reference`, and the
metrics of pooled statistics and the bootstrap (SPEC §4–5) to :mod:`orcal.metrics.pooled`.

This module re-exports the op reference for one release and warns on import.
"""

import warnings

from orcal.ops.reference import *  # noqa: F401,F403  (the old names, for one release)

warnings.warn("orcal.reference is deprecated and will be removed in the next release; use orcal.ops.reference "
              "(the ops) or orcal.metrics.pooled (metrics of pooled statistics)", DeprecationWarning, stacklevel=2)
