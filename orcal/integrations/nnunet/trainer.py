"""nnU-Net's trainer with orcal's loss (:class:`nnUNetTrainerORC`, defined on first use because it imports
nnU-Net), its shorter-schedule variants, and the module that lets nnU-Net find them by name."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orcal.integrations.nnunet.convert import read_orcal_meta
from orcal.integrations.nnunet.levels import JointOrdinalLoss, joint_levels, marginal_logits

#: The module the trainer classes live in (nnU-Net and pickle find them there by name).
HOME = "orcal.integrations.nnunet"

#: The module :func:`write_trainer_module` writes into a ``nnUNet_extTrainer`` folder.
TRAINER_MODULE = "orcal_trainers.py"


def _nnunet():
    try:
        import nnunetv2  # noqa: F401
    except ImportError as err:
        raise ImportError('orcal.integrations.nnunet needs nnU-Net v2: pip install "orcal[nnunet]"') from err


def write_trainer_module(folder: str | os.PathLike) -> Path:
    """Write the module that lets nnU-Net find :class:`nnUNetTrainerORC` by name: point
    ``nnUNet_extTrainer`` at ``folder`` (for ``nnUNetv2_train`` and ``nnUNetv2_predict`` alike)."""
    path = Path(folder) / TRAINER_MODULE
    path.parent.mkdir(parents=True, exist_ok=True)
    names = "".join(f"    {n},\n" for n in ["nnUNetTrainerORC", *_variants()])
    path.write_text('"""nnU-Net trainers of orcal: found by class name through nnUNet_extTrainer."""\n\n'
                    f"from orcal.integrations.nnunet import (  # noqa: F401\n{names})\n")
    return path


def _trainer_class():
    """Define :class:`nnUNetTrainerORC` on nnU-Net's trainer (imported only when it is asked for)."""
    _nnunet()
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from orcal import ops
    from orcal.losses import OrdinalLoss

    class nnUNetTrainerORC(nnUNetTrainer):  # noqa: N801  (nnU-Net's naming)
        """nnU-Net's trainer with the ``R + 1``-level head trained by orcal's fused ordinal loss (SPEC §3).

        The dataset's labels must be the vote counts ``0..R`` (:func:`convert_dataset`), with nnU-Net's
        optional ignore label last. Class attributes to subclass: ``rps_weight`` (λ, default 1) and
        ``majority`` (the majority threshold, default ``R // 2 + 1``). Deep supervision weights the scales
        as nnU-Net does (halving, the lowest scale left out). Validation reports the Dice of the majority
        readout ``P(k >= m) >= 0.5`` against ``k >= m``, which nnU-Net's checkpoint selection then tracks;
        the final validation (summary.json) scores the region ``k >= m`` of each structure. Shorter
        schedules: ``nnUNetTrainerORC_1epoch``, ``_5epochs`` ... (:data:`EPOCH_VARIANTS`), and
        ``nnUNetTrainerORC_smoke`` (:data:`SMOKE_ITERATIONS` iterations) to check the path.
        """

        rps_weight: float = 1.0
        majority: int | None = None

        def _orcal_meta(self) -> tuple[int | None, int | None]:
            """``(R, C)`` from the dataset.json nnU-Net was given (its copy in nnUNet_preprocessed named)."""
            source = os.path.join(self.preprocessed_dataset_folder_base, "dataset.json")
            return read_orcal_meta(self.dataset_json, source)

        @property
        def num_structures(self) -> int | None:
            """``C`` of a dataset of several structures (joint classes), from its dataset.json."""
            return self._orcal_meta()[1]

        @property
        def num_raters(self) -> int:
            labels = sorted(int(v) for v in self.label_manager.all_labels)
            if self.label_manager.has_regions or labels != list(range(len(labels))) or len(labels) < 2:
                raise ValueError(f"nnUNetTrainerORC needs the labels 0..R (vote counts), got {labels}; convert the "
                                 "data with orcal nnunet convert")
            R, C = self._orcal_meta()
            if C is None:
                return len(labels) - 1
            if R is None or len(labels) != len(joint_levels(C, R)):
                raise ValueError(f"{len(labels)} labels are not the joint vote counts of {C} structures and {R} "
                                 "raters; convert the data with orcal nnunet convert")
            return R

        @property
        def majority_threshold(self) -> int:
            """``m``: the class attribute ``majority`` checked against ``R``, or the strict majority."""
            return ops.check_majority(self.num_raters, self.majority)

        def majority_regions(self) -> list[tuple[int, ...]]:
            """Per structure, the nnU-Net classes whose vote count reaches the majority (``k_c >= m``)."""
            R, m = self.num_raters, self.majority_threshold
            if self.num_structures is None:
                return [tuple(range(m, R + 1))]
            levels = joint_levels(self.num_structures, R)
            return [tuple(int(i) for i in torch.nonzero(levels[:, c] >= m)[:, 0]) for c in range(levels.shape[1])]

        def perform_actual_validation(self, *args, **kwargs):  # its arguments differ between nnU-Net versions
            """nnU-Net's final validation, scored per structure on the majority region ``k_c >= m`` of its
            exported segmentation (summary.json: one Dice per structure, ``foreground_mean`` their mean).
            Scored per class, the vote counts (joint ones above all) that neither the reference nor the
            prediction holds make nnU-Net's mean Dice NaN."""
            labels, regions = self.label_manager, self.majority_regions()
            self.label_manager = _MajorityRegions(labels, regions)  # read only by the scoring of the exports
            try:
                super().perform_actual_validation(*args, **kwargs)
            finally:
                self.label_manager = labels

        def _ordinal_loss(self) -> torch.nn.Module:
            ignore = self.label_manager.ignore_label
            if self.num_structures is not None:
                return JointOrdinalLoss(self.num_structures, self.num_raters, self.rps_weight, self.majority, ignore)
            return OrdinalLoss(self.rps_weight, self.majority, ignore_index=ignore)

        def _build_loss(self):
            self.num_raters  # noqa: B018  (the labels are checked before training starts)
            loss = self.loss_module = self._ordinal_loss()
            if not self.enable_deep_supervision:
                return loss
            n = len(self._get_deep_supervision_scales())
            weights = np.array([0.5 ** i for i in range(n)])
            weights[-1] = 1e-6 if self.is_ddp else 0.0  # the coarsest output is not trained (DDP needs a grad)
            return DeepSupervisionWrapper(loss, weights / weights.sum())

        def validation_step(self, batch: dict) -> dict:
            data = batch["data"].to(self.device, non_blocking=True)
            target = batch["target"]
            target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
                else target.to(self.device, non_blocking=True)
            with torch.no_grad():
                output = self.network(data)
                loss = self.loss(output, target)
                if self.enable_deep_supervision:
                    output, target = output[0], target[0]
                C, m = self.num_structures, self.majority_threshold
                if C is None:
                    k = target[:, 0].long()
                    valid = torch.ones_like(k, dtype=torch.bool)
                    if self.label_manager.ignore_label is not None:
                        valid = k != self.label_manager.ignore_label
                    k, logits = k[:, None], output.float()
                else:  # each structure's marginal levels
                    k, valid = self.loss_module.votes(target)
                    valid = torch.ones_like(k[:, 0], dtype=torch.bool) if valid is None else valid
                    logits = marginal_logits(output, self.loss_module.M)
                pred = ops.foreground_probability(logits, readout="majority", majority=m,
                                                  num_structures=C or 1) >= 0.5  # (B, C, *S)
                truth, valid = k >= m, valid[:, None]
                dims = (0, *range(2, pred.ndim))  # per structure: nnU-Net averages its classes' Dice
                tp = (pred & truth & valid).sum(dims).double().cpu().numpy()
                fp = (pred & ~truth & valid).sum(dims).double().cpu().numpy()
                fn = (~pred & truth & valid).sum(dims).double().cpu().numpy()
            return {"loss": loss.detach().cpu().numpy(), "tp_hard": tp, "fp_hard": fp, "fn_hard": fn}

    nnUNetTrainerORC.__module__ = HOME
    return nnUNetTrainerORC


class _MajorityRegions:
    """nnU-Net's label manager, with the majority region of each structure as the regions its validation
    scores (nnU-Net evaluates a region as the union of its classes)."""

    has_regions = True

    def __init__(self, labels: Any, regions: list[tuple[int, ...]]) -> None:
        self._labels, self.foreground_regions = labels, regions

    def __getattr__(self, name: str) -> Any:
        return getattr(self._labels, name)


#: nnUNetTrainerORC_<n>epochs (and _1epoch): shorter schedules, named the way nnU-Net's own variants are.
EPOCH_VARIANTS = (1, 5, 10, 20, 50, 100, 250)
#: The smoke-test variant: one epoch of this many training (and 2 validation) iterations, which checks the
#: whole path in minutes on a CPU and trains nothing useful.
SMOKE_ITERATIONS = 10


def _variants() -> dict[str, tuple[int, int | None]]:
    """``{class name: (epochs, iterations per epoch or None for nnU-Net's)}`` of the variants."""
    names = {f"nnUNetTrainerORC_{e}epoch" + ("" if e == 1 else "s"): (e, None) for e in EPOCH_VARIANTS}
    return {**names, "nnUNetTrainerORC_smoke": (1, SMOKE_ITERATIONS)}


def _variant(base: type, name: str, epochs: int, iterations: int | None) -> type:
    """``nnUNetTrainerORC`` with a shorter schedule, with nnU-Net's ``__init__`` signature (nnU-Net stores a
    trainer's arguments by name)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008  (nnU-Net's signature)
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        self.num_epochs = epochs
        if iterations is not None:
            self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = iterations, 2

    doc = f"nnUNetTrainerORC for {epochs} epoch(s)" + ("" if iterations is None else f" of {iterations} iterations")
    return type(name, (base,), {"__init__": __init__, "__module__": HOME, "__doc__": doc + "."})
