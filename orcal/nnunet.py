"""Deprecated: the nnU-Net integration moved to :mod:`orcal.integrations.nnunet`.

Trainer modules written by an earlier ``orcal nnunet trainer`` import ``orcal.nnunet``; this module keeps them
working for one release and warns on import. Rewrite them with ``orcal nnunet trainer DIR``.
"""

import warnings

from orcal.integrations import nnunet as _home
from orcal.integrations.nnunet import (  # noqa: F401  (the old names, for one release)
    EPOCH_VARIANTS,
    SMOKE_ITERATIONS,
    TRAINER_MODULE,
    JointOrdinalLoss,
    convert_dataset,
    export_probabilities,
    joint_levels,
    marginal_matrix,
    read_orcal_meta,
    write_trainer_module,
)

warnings.warn("orcal.nnunet is deprecated and will be removed in the next release; use orcal.integrations.nnunet "
              "(rewrite a trainer module with: orcal nnunet trainer DIR)", DeprecationWarning, stacklevel=2)


def __getattr__(name: str):
    # nnUNetTrainerORC and its variants are defined on first use there (they import nnU-Net)
    return getattr(_home, name)
