"""CT datasets with several raters: LongCIU (2D lung slices) and CURVAS (3D abdomen)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import numpy as np
import torch

from orcal.io import read_spacing
from orcal.ops.masks import check_structures, select_labels, structure_map

from ._io import read_array
from .base import (
    SPLITS,
    Case,
    MultiRaterDataset,
    check_root,
    check_same_shape,
    label_mask,
    make_item,
    natural_key,
    resolve_task,
    scale_intensity,
    seeded_split,
    with_structures,
)

HU_WINDOW = (-1024.0, 600.0)


def _structures(structures, chosen, every: tuple[int, ...], name: str) -> tuple[int, ...] | None:
    """The labels of ``structures`` (``"all"``: ``every``), refused beside a task or label ``chosen``."""
    if structures is None:
        return None
    if chosen is not None:
        raise ValueError(f"give a task or label ({chosen!r}) or structures ({structures!r}) of dataset {name!r}, "
                         "not both")
    if isinstance(structures, str):
        if structures != "all":
            raise ValueError(f"structures of dataset {name!r} must be 'all' or a list of labels, got {structures!r}")
        return every
    return check_structures(structures)


class LongCIU(MultiRaterDataset):
    """LongCIU: 90 axial lung CT slices of COVID-19 patients, three raters, two lesion labels.

    Layout::

        ROOT/longciu_img.nii.gz            the 90 slices stacked in one volume (slices on the last axis)
        ROOT/longciu_{1,2,3}_tgt.nii.gz    per-rater labels: 0 background, 1 ground-glass opacity,
                                           2 consolidation
        ROOT/longciu_splits.json           {"train": [slice indices], "val": [...], "test": [...]}

    Published: LongCIU (Lung CT with Inter-observer Uncertainty) on Zenodo, an extension of the MedSeg
    COVID-19 CT segmentation slices. ``task``: "ggo" (label 1), "consolidation" (2) or "any" (1 or 2);
    ``structures="all"`` reads both findings at once as rater label maps (1 ground glass, 2 consolidation;
    SPEC §11). Intensities: HU clipped to [-1024, 600] and scaled to [0, 1]. Items are 2D slices.
    Option ``slice_axis`` (default -1) picks the stacking axis.
    """

    name = "longciu"
    modality = "CT"
    published = "Zenodo (LongCIU: lung CT with inter-observer uncertainty; MedSeg COVID-19 CT slices)"
    layout = "longciu_img.nii.gz, longciu_{1,2,3}_tgt.nii.gz and longciu_splits.json"
    tasks = {"ggo": (1,), "consolidation": (2,), "any": (1, 2)}

    def __init__(self, root, split: str | None = None, task: str | None = None, slice_axis: int = -1,
                 transform: Callable | None = None, structures: str | Sequence[int] | None = None):
        self.structures = _structures(structures, task, (1, 2), self.name)
        self.task = None if self.structures else resolve_task(task, tuple(self.tasks), "any", self.name)
        root = check_root(root, self.name, self.published, self.layout)
        image_path = root / "longciu_img.nii.gz"
        volume = read_array(image_path)
        if volume.ndim != 3:
            raise ValueError(f"{image_path}: expected a 3D stack of slices, found shape {volume.shape}")
        self.volume = np.moveaxis(scale_intensity(volume, HU_WINDOW, str(image_path)), slice_axis, 0)
        self.labels = []
        for r in (1, 2, 3):
            path = root / f"longciu_{r}_tgt.nii.gz"
            if not path.is_file():
                raise FileNotFoundError(f"missing rater file {path}; expected {self.layout}")
            lab = read_array(path)
            check_same_shape(lab, volume.shape, str(path), str(image_path))
            read = (structure_map(lab, self.structures, str(path)) if self.structures
                    else label_mask(lab, self.tasks[self.task], (0, 1, 2), str(path)))
            self.labels.append(np.moveaxis(read, slice_axis, 0))
        n = self.volume.shape[0]
        cases = [Case(f"slice-{i:03d}", str(i), i) for i in range(n)]
        if split is not None:
            if split not in SPLITS:
                raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)} or None")
            split_path = root / "longciu_splits.json"
            if not split_path.is_file():
                raise FileNotFoundError(f"missing {split_path}; expected {self.layout}")
            try:
                splits = json.loads(split_path.read_text())
                index = [int(i) for i in splits[split]]
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{split_path}: expected keys train/val/test listing slice indices "
                                 f"({type(err).__name__}: {err})") from err
            bad = [i for i in index if not 0 <= i < n]
            if bad:
                raise ValueError(f"{split_path}: slice indices {bad[:5]} out of range 0..{n - 1}")
            cases = [cases[i] for i in index]
        super().__init__(cases, split, transform)

    def load_case(self, case: Case) -> dict:
        i = case.info
        return with_structures(make_item(self.volume[i][None], [lab[i] for lab in self.labels], case.id),
                               self.structures)


class Curvas(MultiRaterDataset):
    """CURVAS: 3D abdominal CT, three raters, pancreas / kidney / liver.

    Layout::

        ROOT/<case>/image.nii.gz
        ROOT/<case>/annotation_{1,2,3}.nii.gz   labels 0 background, 1 pancreas, 2 kidney, 3 liver

    (the published cases are named ``UKCHLL###``; any folder holding ``image.nii.gz`` is a case).
    Published: the CURVAS challenge (MICCAI 2024, https://curvas.grand-challenge.org; data on Zenodo).
    ``task``: "pancreas", "kidney" or "liver"; or ``label`` (an integer or a list read as one) for a file
    with other labels; or ``structures``, several at once as rater label maps (SPEC §11): ``"all"`` (1
    pancreas, 2 kidney, 3 liver) or a list of the file's labels. Intensities: HU in ``window`` (default
    (-200, 300)) scaled to [0, 1]. ``split``: seeded by case (``val_fraction``, ``test_fraction``, ``seed``).
    """

    name = "curvas"
    modality = "CT"
    published = "https://curvas.grand-challenge.org (CURVAS challenge, MICCAI 2024; data on Zenodo)"
    layout = "<case>/image.nii.gz with <case>/annotation_{1,2,3}.nii.gz (the published cases: UKCHLL###)"
    tasks = {"pancreas": 1, "kidney": 2, "liver": 3}

    def __init__(self, root, split: str | None = None, task: str | None = None,
                 window: tuple[float, float] = (-200.0, 300.0), num_raters: int = 3,
                 val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0,
                 transform: Callable | None = None, label: int | Sequence[int] | None = None,
                 structures: str | Sequence[int] | None = None):
        self.structures = _structures(structures, task if label is None else label, (1, 2, 3), self.name)
        if self.structures:
            self.task, self.label = None, None
        elif label is None:
            self.task = resolve_task(task, tuple(self.tasks), None, self.name)
            self.label: int | Sequence[int] = self.tasks[self.task]
        elif task is not None:
            raise ValueError(f"give the task ({task!r}) or label ({label!r}) of dataset 'curvas', not both")
        else:
            self.task, self.label = None, label
        root = check_root(root, self.name, self.published, self.layout)
        self.window, self.num_raters = tuple(window), int(num_raters)
        folders = sorted((d for d in root.iterdir() if (d / "image.nii.gz").is_file()),
                         key=lambda p: natural_key(p.name))
        cases = [Case(d.name, d.name, d) for d in folders]
        if not cases:
            raise FileNotFoundError(f"no case folder holding image.nii.gz under {root}; expected {self.layout}")
        super().__init__(seeded_split(cases, split, val_fraction, test_fraction, seed), split, transform)

    def image_path(self, index: int):
        return self.cases[index].info / "image.nii.gz"

    def load_case(self, case: Case) -> dict:
        image_path = case.info / "image.nii.gz"
        image = read_array(image_path)
        masks = []
        for r in range(1, self.num_raters + 1):
            path = case.info / f"annotation_{r}.nii.gz"
            if not path.is_file():
                raise FileNotFoundError(f"missing rater file {path}; expected {self.layout}")
            lab = read_array(path)
            check_same_shape(lab, image.shape, str(path), str(image_path))
            if self.structures:
                masks.append(structure_map(lab, self.structures, str(path)))
            else:  # a task: CURVAS's own labels only
                masks.append(label_mask(lab, (self.label,), (0, 1, 2, 3), str(path)) if self.task is not None
                             else select_labels(lab, self.label, str(path)))
        item = make_item(scale_intensity(image, self.window, str(image_path))[None], masks, case.id)
        item["spacing"] = torch.tensor(read_spacing(image_path), dtype=torch.float64)  # volumes in mL
        return with_structures(item, self.structures)

    @property
    def display_name(self) -> str:
        if self.structures:
            return f"curvas (structures {','.join(str(v) for v in self.structures)})"
        return super().display_name
