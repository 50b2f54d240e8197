"""The data a run trains on: the seeded training view, batching, the dataset probe and the label prior."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import Dataset

from orcal.training.config import TrainConfig
from orcal.training.runtime import mix


class SeededView(Dataset):
    """Training view of a dataset: ``repeats`` passes per epoch, each sample transformed with a generator
    seeded by (seed, epoch, index), so augmentation is reproducible whatever the workers or ranks."""

    def __init__(self, base: Dataset, make_transform: Callable[[torch.Generator], Callable] | None,
                 seed: int, repeats: int = 1):
        self.base, self.make_transform, self.seed, self.repeats = base, make_transform, seed, repeats
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base) * self.repeats

    def __getitem__(self, index: int) -> dict:
        item = self.base[index % len(self.base)]
        if self.make_transform is None:
            return item
        g = torch.Generator().manual_seed(mix(self.seed, self.epoch, index, 17))
        return self.make_transform(g)(item)


def training_transform(patch_size: tuple[int, ...] | None, fg_prob: float, augment: bool):
    from orcal.data.transforms import Compose, RandomFlip, RandomPatch

    if patch_size is None and not augment:
        return None

    def make(g: torch.Generator) -> Callable:
        steps: list[Callable] = []
        if patch_size is not None:
            steps.append(RandomPatch(patch_size, fg_prob=fg_prob, generator=g))
        if augment:
            steps.append(RandomFlip(generator=g))
        return Compose(steps)

    return make


def collate(items: Sequence[dict]) -> dict:
    """Stack item dicts into a batch (:func:`orcal.data.collate`); images of different sizes are first
    zero-padded to the largest, the padding marked invalid. Every item must have the same number of raters."""
    from orcal.data import collate as stack
    from orcal.data.transforms import pad_to

    raters = {int(it["masks"].shape[0]) for it in items}
    if len(raters) > 1:
        raise ValueError(f"a batch mixes images with different numbers of raters {sorted(raters)}; training "
                         "needs one R (use batch_size=1 for evaluation, or filter the dataset)")
    shapes = {tuple(it["masks"].shape[1:]) for it in items}
    if len(shapes) > 1:
        size = tuple(max(s[i] for s in shapes) for i in range(len(next(iter(shapes)))))
        items = [pad_to(it, size) for it in items]
    return stack(items)


def load_datasets(cfg: TrainConfig) -> tuple[Dataset, Dataset | None]:
    from orcal.data import load_dataset

    opts = dict(cfg.dataset_options)
    if cfg.val_fraction is not None:
        opts["val_fraction"] = cfg.val_fraction
    train_ds = load_dataset(cfg.dataset, cfg.root, split=cfg.train_split, task=cfg.task, **opts)
    val_ds = None
    if cfg.val_split is not None:
        val_ds = load_dataset(cfg.dataset, cfg.root, split=cfg.val_split, task=cfg.task, **opts)
    return train_ds, val_ds


def probe(ds: Dataset) -> tuple[int, int, int, int | None]:
    """``(image channels, spatial dims, R, C)`` of the first item; ``C`` is None for binary rater masks, the
    item's ``num_structures`` for rater label maps (SPEC §11)."""
    if len(ds) == 0:
        raise ValueError("the training set is empty")
    item = ds[0]
    masks, image = item["masks"], item["image"]
    if masks.ndim not in (3, 4):
        raise ValueError(f"items must hold masks (R, H, W) or (R, D, H, W), got {tuple(masks.shape)}")
    structures = item.get("num_structures")
    return int(image.shape[0]), int(masks.ndim - 1), int(masks.shape[0]), \
        None if structures is None else int(structures)


def _votes(item: dict, num_structures: int | None) -> torch.Tensor:
    """An item's vote counts, ``(C, *S)`` (``C = 1`` for binary rater masks)."""
    from orcal.ops import orc_targets

    if num_structures is None:
        return item["masks"].to(torch.int64).sum(0, keepdim=True)
    return orc_targets(item["masks"][None], backend="torch", num_structures=num_structures)[0].long()


def label_prior(ds: Dataset, head: str, num_raters: int, max_items: int = 64,
                num_structures: int | None = None) -> torch.Tensor:
    """Output bias that reproduces the label frequencies of (up to ``max_items`` evenly spaced) training items.

    Ordinal head: log-frequency of each vote count 0..R, so the initial softmax is the empirical distribution.
    Binary head: logit of the mean vote fraction. With several structures, one such bias per structure,
    structure-major as the head's channels.
    """
    step = max(1, len(ds) // max_items)
    counts = torch.zeros(num_structures or 1, num_raters + 1, dtype=torch.float64)
    for i in range(0, len(ds), step):
        item = ds[i]
        for c, k in enumerate(_votes(item, num_structures)):
            if item.get("valid") is not None:
                k = k[item["valid"]]
            counts[c] += torch.bincount(k.reshape(-1), minlength=num_raters + 1)[: num_raters + 1].double()
    freq = (counts + 1.0) / (counts.sum(1, keepdim=True) + num_raters + 1)  # add-one: no level starts impossible
    if head == "ordinal":
        return torch.log(freq).float().reshape(-1)
    mean = (freq * torch.arange(num_raters + 1)).sum(1) / num_raters
    return torch.log(mean / (1 - mean)).float()
