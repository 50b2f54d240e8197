"""A generic folder of cases: one image and one file per rater in each case folder."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from orcal.io import EXTENSIONS, rater_files
from orcal.ops.masks import check_structures

from ._io import read_array
from .base import (
    Case,
    MultiRaterDataset,
    channels_first,
    check_root,
    check_same_shape,
    make_item,
    natural_key,
    read_mask,
    scale_intensity,
    seeded_split,
    with_structures,
)


class FolderDataset(MultiRaterDataset):
    """Any multi-rater data arranged as one folder per case.

    Layout::

        ROOT/<case>/image.<ext>              the image (2D or 3D; channels last or first are accepted)
        ROOT/<case>/<rater pattern>.<ext>    one binary mask per rater (0/1 or 0/255), e.g. rater1.png

    ``<ext>`` is NIfTI (.nii/.nii.gz), PNG/JPG/TIFF or .npy. Options: ``rater_glob`` (default "rater*",
    matched against file names, sorted naturally), ``intensity`` ("auto": uint8 / 255, other types by
    0.5/99.5 percentiles; "percentile", "none" or a (low, high) window), ``mask_channel`` (the channel of colour
    mask images that holds the annotation; default: masks must be grey), ``label`` (the structure to read from
    multi-label rater maps, one integer or a list read as one; default: masks must be binary), ``structures`` (a
    list of labels read at once as rater label maps 0..C, SPEC §11). ``split``: seeded by case
    (``val_fraction``, ``test_fraction``, ``seed``). Published: your own data.
    """

    name = "folder"
    published = "your own data (no public source)"
    layout = "<case>/image.<ext> with <case>/rater*.<ext> (NIfTI, PNG/JPG or .npy)"

    def __init__(self, root, split: str | None = None, task: str | None = None, rater_glob: str = "rater*",
                 intensity: str | tuple[float, float] = "auto", val_fraction: float = 0.1,
                 test_fraction: float = 0.2, seed: int = 0, transform: Callable | None = None,
                 mask_channel: int | None = None, label: int | Sequence[int] | None = None,
                 structures: Sequence[int] | None = None):
        if task not in (None, "default"):
            raise ValueError(f"unknown task {task!r} for dataset 'folder'; valid tasks: default")
        if structures is not None and label is not None:
            raise ValueError("give label (one structure) or structures (several) of dataset 'folder', not both")
        self.structures = None if structures is None else check_structures(structures)
        root = check_root(root, self.name, self.published, self.layout)
        self.rater_glob, self.intensity, self.mask_channel, self.label = rater_glob, intensity, mask_channel, label
        cases = []
        for d in sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: natural_key(p.name)):
            images = [p for p in d.iterdir() if p.name.lower().startswith("image.")
                      and p.name.lower().endswith(EXTENSIONS)]
            if len(images) != 1:
                raise FileNotFoundError(f"expected exactly one image.<ext> in {d}, found {len(images)}; "
                                        f"layout: {self.layout}")
            raters = rater_files(d, rater_glob, exclude=(images[0],))
            if not raters:
                raise FileNotFoundError(f"missing rater file: no file matching {rater_glob!r} in {d}; "
                                        f"layout: {self.layout}")
            cases.append(Case(d.name, d.name, (images[0], raters)))
        if not cases:
            raise FileNotFoundError(f"no case folders under {root}; layout: {self.layout}")
        counts = {len(c.info[1]) for c in cases}
        if len(counts) > 1:
            fewest = min(cases, key=lambda c: len(c.info[1]))
            raise FileNotFoundError(f"missing rater file: case {fewest.id} has {len(fewest.info[1])} files "
                                    f"matching {rater_glob!r}, others have up to {max(counts)}")
        super().__init__(seeded_split(cases, split, val_fraction, test_fraction, seed), split, transform)

    def image_path(self, index: int):
        return self.cases[index].info[0]

    def load_case(self, case: Case) -> dict:
        image_path, rater_paths = case.info
        masks = [read_mask(path, self.mask_channel, self.label, self.structures) for path in rater_paths]
        for path, m in zip(rater_paths[1:], masks[1:]):
            check_same_shape(m, masks[0].shape, str(path), str(rater_paths[0]))
        image = channels_first(read_array(image_path), masks[0].shape, str(image_path))
        return with_structures(make_item(scale_intensity(image, self.intensity, str(image_path)), masks, case.id),
                               self.structures)
