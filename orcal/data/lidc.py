"""LIDC-IDRI lung nodules with four readers: the slice-PNG layout and the crops pickle."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from ._io import read_array
from .base import (
    Case,
    MultiRaterDataset,
    binary_mask,
    check_root,
    check_same_shape,
    make_item,
    natural_key,
    read_mask,
    scale_intensity,
    seeded_split,
)
from .safe_pickle import safe_load

LIDC_PUBLISHED = ("The Cancer Imaging Archive (LIDC-IDRI, CC BY 3.0; cite Armato et al., Med. Phys. 38(2), "
                  "2011)")


def center_crop(arr: np.ndarray, size: int | None) -> np.ndarray:
    """Crop the last two axes to ``size`` x ``size`` around the centre (no-op for None)."""
    if size is None:
        return arr
    size = int(size)
    h, w = arr.shape[-2:]
    if not 1 <= size <= min(h, w):
        raise ValueError(f"crop must be in 1..{min(h, w)} for {h}x{w} slices, got {size}")
    top, left = (h - size) // 2, (w - size) // 2
    return arr[..., top:top + size, left:left + size]


class LIDCSlices(MultiRaterDataset):
    """LIDC-IDRI nodule slices as 2D PNG crops, four readers.

    Layout (the public "LIDC-IDRI-slices" layout)::

        ROOT/LIDC-IDRI-XXXX/nodule-N/images/slice-K.png         128x128 8-bit CT crop
        ROOT/LIDC-IDRI-XXXX/nodule-N/mask-{0,1,2,3}/slice-K.png  one mask per reader, 0/255

    Published: images and annotations from LIDC-IDRI on The Cancer Imaging Archive (CC BY 3.0); the slice
    crops are a community export of it. A blank mask is a reader who did not mark the nodule and is kept
    as an empty annotation; a missing mask file is an error. There is no official split: ``split`` is a
    seeded split by patient (``val_fraction``, ``test_fraction``, ``seed``), never by slice.
    Options: ``crop`` (centre crop size, e.g. 64), ``min_raters_foreground`` (keep only slices where at
    least that many readers marked something; reads every mask once), ``num_raters`` (4).
    """

    name = "lidc_slices"
    display_name = "LIDC-IDRI"
    published = LIDC_PUBLISHED
    layout = "LIDC-IDRI-XXXX/nodule-N/images/slice-K.png and LIDC-IDRI-XXXX/nodule-N/mask-{0..3}/slice-K.png"

    def __init__(self, root, split: str | None = None, task: str | None = None, crop: int | None = None,
                 min_raters_foreground: int = 0, num_raters: int = 4, val_fraction: float = 0.1,
                 test_fraction: float = 0.2, seed: int = 0, transform: Callable | None = None):
        if task not in (None, "nodule"):
            raise ValueError(f"unknown task {task!r} for dataset {self.name!r}; valid tasks: nodule")
        root = check_root(root, self.name, self.published, self.layout)
        if not 0 <= int(min_raters_foreground) <= int(num_raters):
            raise ValueError(f"min_raters_foreground must be in 0..{num_raters}, got {min_raters_foreground}")
        self.crop = crop
        self.num_raters = int(num_raters)
        cases = self._cases(root)
        if not cases:
            raise ValueError(f"no slices under {root}; expected {self.layout}")
        cases = seeded_split(cases, split, val_fraction, test_fraction, seed)
        if min_raters_foreground > 0:
            cases = self._filter(cases, int(min_raters_foreground))
        super().__init__(cases, split, transform)

    def _nodules(self, root: Path):
        """``(patient, nodule folder, slice files)`` of every nodule, each slice checked to have every mask."""
        for patient in sorted(root.glob("LIDC-IDRI-*"), key=lambda p: natural_key(p.name)):
            for nodule in sorted(patient.glob("nodule-*"), key=lambda p: natural_key(p.name)):
                slices = sorted((nodule / "images").glob("slice-*.png"), key=lambda p: natural_key(p.name))
                for r in range(self.num_raters):
                    present = {p.name for p in (nodule / f"mask-{r}").glob("slice-*.png")}
                    for s in slices:
                        if s.name not in present:
                            raise FileNotFoundError(f"missing rater file {nodule / f'mask-{r}' / s.name} "
                                                    f"(reader {r} of {s}); expected {self.layout}")
                if slices:
                    yield patient, nodule, slices

    def _cases(self, root: Path) -> list[Case]:
        """One case per slice, grouped by patient."""
        return [Case(f"{patient.name}/{nodule.name}/{s.stem}", patient.name, s)
                for patient, nodule, slices in self._nodules(root) for s in slices]

    def _filter(self, cases: list[Case], n: int) -> list[Case]:
        from orcal._progress import progress_bar

        keep = []
        for case in progress_bar(cases, desc=f"{self.name}: reading masks", unit="case", leave=False):
            item = self.load_case(case)
            if int(item["masks"].flatten(1).any(1).sum()) >= n:
                keep.append(case)
        return keep

    def _masks(self, image_path: Path, shape: tuple[int, ...]) -> list[np.ndarray]:
        nodule = image_path.parent.parent
        out = []
        for r in range(self.num_raters):
            path = nodule / f"mask-{r}" / image_path.name
            if not path.is_file():
                raise FileNotFoundError(f"missing rater file {path}; expected {self.layout}")
            m = read_mask(path)
            check_same_shape(m, shape, str(path), str(image_path))
            out.append(m)
        return out

    def _slice(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        """One slice's image ``(H, W)`` in [0, 1] and its masks ``(R, H, W)``."""
        image = read_array(path)
        if image.ndim == 3:  # a greyscale slice saved as RGB
            image = image[..., 0]
        return scale_intensity(image, source=str(path)), np.stack(self._masks(path, image.shape))

    def load_case(self, case: Case) -> dict:
        image, masks = self._slice(case.info)
        return make_item(center_crop(image[None], self.crop), center_crop(masks, self.crop), case.id)


class LIDCVolumes(LIDCSlices):
    """LIDC-IDRI nodules as 3D volumes: each nodule's consecutive axial slices stacked, four readers.

    The same files as ``lidc_slices`` (its layout and options); one case is one nodule, a ``(1, D, H, W)``
    volume of its ``D`` slices (1 to 42 in the public export, most 2 to 6) in slice order, with the readers'
    masks ``(R, D, H, W)``. Split by patient. ``crop`` crops ``H`` and ``W``; ``min_raters_foreground`` keeps
    nodules that at least that many readers marked on some slice.
    """

    name = "lidc_volumes"
    display_name = "LIDC-IDRI 3D"

    def _cases(self, root: Path) -> list[Case]:
        return [Case(f"{patient.name}/{nodule.name}", patient.name, tuple(slices))
                for patient, nodule, slices in self._nodules(root)]

    def load_case(self, case: Case) -> dict:
        images, masks = zip(*(self._slice(path) for path in case.info))
        shapes = {im.shape for im in images}
        if len(shapes) > 1:
            raise ValueError(f"the slices of nodule {case.id} differ in size: {sorted(shapes)}")
        image = np.stack(images)[None]                  # (1, D, H, W)
        masks = np.stack(masks, axis=1)                 # (R, D, H, W)
        return make_item(center_crop(image, self.crop), center_crop(masks, self.crop), case.id)


class LIDCPickle(MultiRaterDataset):
    """LIDC-IDRI 128x128 nodule crops from the probabilistic U-Net pickle, four readers.

    Layout: one pickle file (ROOT is the file, or a folder holding exactly one ``*.pickle``/``*.pkl``)::

        {key: {"image": 128x128 float, "masks": [4 x 128x128], "series_uid": str, ...}}

    Published: the crops of LIDC-IDRI (The Cancer Imaging Archive) distributed with the probabilistic
    U-Net's reimplementations. The pickle is read with a restricted unpickler that rebuilds numpy arrays
    and plain Python data only. ``split``: seeded by ``series_uid`` (``val_fraction``, ``test_fraction``,
    ``seed``). Option ``crop`` as for ``lidc_slices``.
    """

    name = "lidc"
    published = LIDC_PUBLISHED + "; the crops pickle ships with probabilistic U-Net reimplementations"
    layout = "a pickle {key: {'image', 'masks' (4 masks), 'series_uid'}} (ROOT is the file or its folder)"

    def __init__(self, root, split: str | None = None, task: str | None = None, crop: int | None = None,
                 val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0,
                 transform: Callable | None = None):
        if task not in (None, "nodule"):
            raise ValueError(f"unknown task {task!r} for dataset 'lidc'; valid tasks: nodule")
        path = check_root(root, self.name, self.published, self.layout)
        if path.is_dir():
            found = sorted(path.glob("*.pickle")) + sorted(path.glob("*.pkl"))
            if len(found) != 1:
                raise FileNotFoundError(f"expected exactly one *.pickle or *.pkl file in {path}, found "
                                        f"{len(found)}; layout: {self.layout}")
            path = found[0]
        data = safe_load(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a dict of cases, found {type(data).__name__}")
        self.crop = crop
        self.records = {}
        cases = []
        for key in sorted(data, key=natural_key):
            rec = data[key]
            if not isinstance(rec, dict) or not {"image", "masks", "series_uid"} <= set(rec):
                raise ValueError(f"{path}: entry {key!r} must be a dict with 'image', 'masks' and "
                                 "'series_uid'")
            self.records[str(key)] = rec
            cases.append(Case(str(key), str(rec["series_uid"]), str(key)))
        self.path = path
        super().__init__(seeded_split(cases, split, val_fraction, test_fraction, seed), split, transform)

    @property
    def display_name(self) -> str:
        """The pickle's file name: the layout is shared by other multi-rater crops (e.g. QUBIQ's)."""
        return self.path.stem

    def load_case(self, case: Case) -> dict:
        rec = self.records[case.info]
        source = f"{self.path} entry {case.id!r}"
        image = np.asarray(rec["image"], dtype=np.float32)
        masks = [binary_mask(np.asarray(m), f"{source} mask {r}") for r, m in enumerate(rec["masks"])]
        if not masks:
            raise ValueError(f"{source}: no masks")
        for r, m in enumerate(masks):
            check_same_shape(m, image.shape, f"{source} mask {r}", source)
        image = scale_intensity(image, "none" if image.min() >= 0 and image.max() <= 1 else "percentile", source)
        masks = center_crop(np.stack(masks), self.crop)
        return make_item(center_crop(image[None], self.crop), masks, case.id)
