"""The experiment's data: each dataset's splits, kept in memory for every run, and the test case shown in the
qualitative figure."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from orcal.experiment.config import DatasetSpec


def load_split(spec: DatasetSpec, split: str):
    """The ``split`` of ``spec`` through :func:`orcal.data.load_dataset`."""
    from orcal.data import load_dataset

    return load_dataset(spec.name, spec.root, split=split, task=spec.task, **spec.options)


class CachedDataset(torch.utils.data.Dataset):
    """Every item of a dataset read (or generated) once and kept in memory, shared by all runs."""

    def __init__(self, dataset, desc: str = "", progress: bool = True):
        from orcal._progress import progress_bar

        self.items = [dataset[i] for i in progress_bar(range(len(dataset)), desc=desc or "loading", unit="item",
                                                       leave=False, enabled=progress)]
        for attr in ("num_raters", "R", "name", "ids", "groups"):  # groups: the bootstrap's units (SPEC §5)
            if hasattr(dataset, attr):
                setattr(self, attr, getattr(dataset, attr))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return dict(self.items[index])


def test_groups(dataset, cfg, order: Sequence[str] | None = None) -> list | None:
    """The bootstrap's units of the test images (SPEC §5): the dataset's ``groups`` (one patient, case or
    volume id per image) with ``cfg.bootstrap_by == "group"``, else None (each image its own unit). ``order``
    lists the image ids in the order of the statistics rows (default: the dataset's order)."""
    groups = getattr(dataset, "groups", None)
    if cfg.bootstrap_by != "group" or groups is None or len(groups) != len(dataset):
        return None
    groups = list(groups)
    if order is None:
        return groups
    ids = [str(i) for i in getattr(dataset, "ids", [])]
    if len(ids) != len(groups):
        raise ValueError(f"dataset {getattr(dataset, 'name', '')!r} gives groups but no case ids to match them")
    by_id = dict(zip(ids, groups))
    return [by_id[str(i)] for i in order]


def pick_case(dataset, limit: int = 256) -> dict[str, Any]:
    """The test case shown in the qualitative figure: of (at most ``limit`` evenly spaced) cases, the one
    with the most voxels where raters disagree. For 3D cases, its slice (first spatial axis) with the most
    disagreement."""
    n = len(dataset)
    if n == 0:
        raise ValueError("the test split is empty")
    best = (-1, 0, None)
    for i in np.unique(np.linspace(0, n - 1, min(n, limit)).round().astype(int)):
        item = dataset[int(i)]
        masks = item["masks"]
        if item.get("num_structures") is not None:  # rater label maps: where the raters' labels differ
            amb = (masks != masks[:1]).any(0)
        else:
            k = masks.sum(0)
            amb = (k > 0) & (k < masks.shape[0])
        score = int(amb.sum())
        if score > best[0]:
            sl = int(amb.flatten(1).sum(1).argmax()) if amb.ndim == 3 else None
            best = (score, int(i), sl)
    item = dataset[best[1]]
    image, masks = item["image"], item["masks"]
    if best[2] is not None:
        image, masks = image[:, best[2]], masks[:, best[2]]
    structures = item.get("num_structures")
    votes = (masks > 0).sum(0) if structures is not None else masks.sum(0)  # any structure, for several
    return {"index": best[1], "id": item["id"], "slice": best[2], "image": image.float().numpy(),
            "votes": votes.numpy().astype(np.int64), "num_raters": int(masks.shape[0]),
            "num_structures": structures}
