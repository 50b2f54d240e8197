"""nnU-Net v2 (``pip install "orcal[nnunet]"``): ORC trained the way nnU-Net users work.

With ``R`` raters, the label nnU-Net trains on is the vote count ``k`` (0..R, SPEC §1): nnU-Net plans an
``R + 1``-channel head for its ``R + 1`` "classes", which are exactly ORC's ordinal levels. With ``C``
structures (SPEC §11) the label is the joint vote count ``(k_1, ..., k_C)`` of a voxel, one nnU-Net class per
tuple with ``sum k_c <= R`` (:func:`joint_levels`): the head predicts their joint distribution, and the loss
is orcal's on each structure's marginal levels (:class:`JointOrdinalLoss`). Three pieces:

- :func:`convert_dataset` writes any orcal dataset in nnU-Net's raw layout (``imagesTr``, ``labelsTr`` with
  ``k``, ``imagesTs``, and ``ratersTs/<case>/rater<r>.nii.gz`` kept for evaluation) with its ``dataset.json``;
- :class:`nnUNetTrainerORC` trains that head with orcal's fused loss (BCE on the majority readout + λ·RPS)
  under nnU-Net's deep supervision and ignore label; its validation Dice is the majority readout's;
- :func:`export_probabilities` turns what ``nnUNetv2_predict --save_probabilities`` writes (the softmax over
  the ``R + 1`` levels, ``.npz``) into foreground-probability maps of both readouts and ``E[k]``, with the
  geometry of nnU-Net's own output, in the layout ``orcal evaluate --pred`` reads. nnU-Net's argmax over
  the levels means nothing for ORC and is left aside.

nnU-Net finds trainers by class name in its package or in the folders of ``nnUNet_extTrainer``;
:func:`write_trainer_module` (``orcal nnunet trainer DIR``) writes the one-line module that makes it find
this one. See docs/integrations.md for the commands in order.
"""

from orcal.integrations.nnunet.convert import convert_dataset, read_orcal_meta
from orcal.integrations.nnunet.export import export_probabilities
from orcal.integrations.nnunet.levels import (
    JointOrdinalLoss,
    joint_levels,
    marginal_matrix,
)
from orcal.integrations.nnunet.trainer import (
    EPOCH_VARIANTS,
    SMOKE_ITERATIONS,
    TRAINER_MODULE,
    _trainer_class,
    _variant,
    _variants,
    write_trainer_module,
)

# and nnUNetTrainerORC with its epoch variants, defined when first asked for (they import nnU-Net)
__all__ = ["EPOCH_VARIANTS", "SMOKE_ITERATIONS", "TRAINER_MODULE", "JointOrdinalLoss", "convert_dataset",
           "export_probabilities", "joint_levels", "marginal_matrix", "read_orcal_meta", "write_trainer_module"]


def __getattr__(name: str):
    # nnU-Net is imported only when a trainer is asked for
    if name == "nnUNetTrainerORC":
        cls = globals()[name] = _trainer_class()
        return cls
    variants = _variants()
    if name in variants:
        base = __getattr__("nnUNetTrainerORC")
        cls = globals()[name] = _variant(base, name, *variants[name])
        return cls
    raise AttributeError(f"module 'orcal.integrations.nnunet' has no attribute {name!r}")
