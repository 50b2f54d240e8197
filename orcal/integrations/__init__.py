"""orcal inside other frameworks, each an optional extra that loads only when imported:

- :mod:`orcal.integrations.torchmetrics`: the streaming statistics as ``torchmetrics.Metric`` classes (also
  reachable as ``orcal.metrics.MultiRaterECE``, ...);
- :mod:`orcal.integrations.monai`: rater transforms, the metric in MONAI's protocol and an engine handler;
- :mod:`orcal.integrations.nnunet`: nnU-Net v2's raw layout, a trainer with orcal's loss, and the export of
  its probabilities.

This is the top of the library: nothing else in orcal imports these modules (tests/test_layers.py), apart
from the lazy re-export of the torchmetrics classes by :mod:`orcal.metrics`.
"""
