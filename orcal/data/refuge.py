"""REFUGE fundus photographs with seven raters for the optic disc and cup."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ._io import read_array
from .base import (
    Case,
    MultiRaterDataset,
    check_root,
    check_same_shape,
    make_item,
    natural_key,
    official_split,
    read_mask,
    resolve_task,
    scale_intensity,
    with_structures,
)


class Refuge(MultiRaterDataset):
    """REFUGE multi-rater (seven ophthalmologists per image), 2D RGB fundus images.

    Layout::

        ROOT/Training-400/<id>/<id>.jpg, <id>_seg_cup_{1..7}.png, <id>_seg_disc_{1..7}.png   (0/255 PNGs)
        ROOT/Test-400/<id>/...

    Published: the REFUGE challenge (https://refuge.grand-challenge.org) with the per-rater annotations
    released with Ji et al., "Learning calibrated medical image segmentation via multi-rater agreement
    modeling" (CVPR 2021). ``task`` is "disc" or "cup"; ``structures="all"`` reads both at once as rater label
    maps (SPEC §11) with one label per pixel: 1 the disc rim (disc outside the cup), 2 the cup, so that a
    rater's disc is labels 1 or 2 and the disc's vote count is ``k_1 + k_2``. ``split``: Training-400 is
    train (a seeded "val" carved out with ``val_fraction``, ``seed``), Test-400 is test. ``mask_channel``
    picks the channel of colour mask files (default: they must be grey).
    """

    name = "refuge"
    published = ("https://refuge.grand-challenge.org, per-rater masks from Ji et al. CVPR 2021 "
                 "(REFUGE multi-rater)")
    layout = "Training-400/<id>/<id>.jpg with <id>_seg_{cup,disc}_{1..7}.png, and Test-400/<id>/..."
    tasks = ("disc", "cup")
    folders = {"Training-400": "train", "Test-400": "test"}

    def __init__(self, root, split: str | None = None, task: str | None = None, num_raters: int = 7,
                 val_fraction: float = 0.1, seed: int = 0, transform: Callable | None = None,
                 mask_channel: int | None = None, structures: str | None = None):
        if structures is not None:
            if structures != "all" or task is not None:
                raise ValueError(f"structures of dataset 'refuge' must be 'all' (disc rim and cup), without a task; "
                                 f"got structures={structures!r}, task={task!r}")
        self.structures = ("rim", "cup") if structures else None
        self.task = None if structures else resolve_task(task, self.tasks, None, self.name)
        root = check_root(root, self.name, self.published, self.layout)
        self.num_raters, self.mask_channel = int(num_raters), mask_channel
        cases = []
        for folder, official in self.folders.items():
            for case_dir in sorted((root / folder).glob("*"), key=lambda p: natural_key(p.name)):
                if case_dir.is_dir():
                    image = case_dir / f"{case_dir.name}.jpg"
                    if not image.is_file():
                        raise FileNotFoundError(f"missing image {image}; expected {self.layout}")
                    cases.append(Case(case_dir.name, case_dir.name, (image, official)))
        if not cases:
            raise FileNotFoundError(f"no cases under {root}; expected {self.layout}")
        cases = official_split(cases, split, lambda c: c.info[1], val_fraction, seed)
        super().__init__(cases, split, transform)

    def load_case(self, case: Case) -> dict:
        image_path = case.info[0]
        image = read_array(image_path)
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        masks = []
        for r in range(1, self.num_raters + 1):
            read = {}
            for task in (self.task,) if self.task else self.tasks:
                path = image_path.parent / f"{case.id}_seg_{task}_{r}.png"
                if not path.is_file():
                    raise FileNotFoundError(f"missing rater file {path}; expected {self.layout}")
                read[task] = read_mask(path, self.mask_channel)
                check_same_shape(read[task], image.shape[:2], str(path), str(image_path))
            if self.task:
                masks.append(read[self.task])
            else:  # one label per pixel: the cup (2) wins over the disc (1), whose rim is what is left
                masks.append(np.where(read["cup"] > 0, 2, read["disc"]).astype(np.uint8))
        item = make_item(np.moveaxis(scale_intensity(image, source=str(image_path)), -1, 0), masks, case.id)
        return with_structures(item, self.structures)
