"""The training objective of a method: the ordinal loss to ``k``, BCE to the strategy's target, or the loss the
strategy registers (:attr:`orcal.fusion.Strategy.loss`) to its target."""

from __future__ import annotations

import torch

from orcal import fusion
from orcal.training.config import TrainConfig


def fusion_options(method: str, options: dict) -> dict:
    """The options of ``method``'s strategy; options meant for other strategies are dropped, unknown ones
    refused (so one options dict can drive every method of an experiment). A seed is training's to give."""
    known = {o for name in fusion.names() for o in (*fusion.get(name).options, *fusion.get(name).loss_options)}
    unknown = set(options) - known
    if unknown:
        raise ValueError(f"fusion_options {sorted(unknown)} are not options of any strategy; known: {sorted(known)}")
    strategy = fusion.get(method)
    return {k: v for k, v in options.items() if k in strategy.options and not (strategy.needs_generator
                                                                                 and k == "seed")}


def loss_options(method: str, options: dict) -> dict:
    """The options of ``method``'s registered loss (:attr:`orcal.fusion.Strategy.loss_options`) in ``options``."""
    return {k: v for k, v in options.items() if k in fusion.get(method).loss_options}


class _MeanAndSum:
    """A loss that averages over valid voxels, and its sum over them (mean times their number)."""

    def __init__(self, loss, reduction: str):
        self.loss, self.reduction = loss, reduction

    def __call__(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        mean = self.loss(logits, target, valid)
        if self.reduction == "mean":
            return mean
        return mean * (target.numel() if valid is None else valid.sum())


class Objective:
    """The training objective of a method: ordinal loss to ``k`` or BCE to the strategy's target."""

    def __init__(self, cfg: TrainConfig):
        from orcal.losses import OrdinalLoss, SoftBCELoss

        self.method = cfg.method
        self.strategy = fusion.get(cfg.method)
        self.options = fusion_options(cfg.method, cfg.fusion_options)
        if cfg.majority is not None and self.strategy.uses_majority:
            self.options.setdefault("majority", cfg.majority)  # one majority threshold for the whole run
        if self.strategy.loss is not None:
            loss = self.strategy.loss(**loss_options(cfg.method, cfg.fusion_options))
            self.mean, self.sum = _MeanAndSum(loss, "mean"), _MeanAndSum(loss, "sum")
        elif self.strategy.head == "ordinal":
            self.mean = OrdinalLoss(cfg.rps_weight, cfg.majority, "mean")
            self.sum = OrdinalLoss(cfg.rps_weight, cfg.majority, "sum")
        else:
            self.mean, self.sum = SoftBCELoss("mean"), SoftBCELoss("sum")

    def __call__(self, logits: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor | None,
                 generator: torch.Generator, reduction: str = "mean", num_structures: int | None = None
                 ) -> torch.Tensor:
        """The loss of a batch; with ``num_structures``, ``masks`` are rater label maps and the loss is the
        sum over structures of each one's loss (SPEC §11), for either head."""
        extra = {"generator": generator} if self.strategy.needs_generator else {}
        target = fusion.make_target(self.method, masks, num_structures=num_structures, **self.options, **extra)
        fn = self.mean if reduction == "mean" else self.sum
        if num_structures == 1:  # one structure of a label map: the binary case
            target, num_structures = target[:, 0], None
        if num_structures is not None and self.strategy.loss is not None:
            raise ValueError(f"method {self.method!r} trains one structure; several (num_structures = "
                             f"{num_structures}) are not supported")
        if num_structures is None or self.strategy.head == "ordinal":
            return fn(logits.float(), target, valid)
        if valid is not None:
            valid = valid.unsqueeze(1).expand_as(target)
        loss = fn(logits.float(), target, valid)  # BCE per channel: its mean is the mean over structures
        return loss * num_structures if reduction == "mean" else loss
