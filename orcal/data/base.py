"""What every multi-rater dataset shares: lazily loaded cases, seeded splits, mask checks.

An item is a dict with ``"image"`` (float32, ``(C, *S)``), ``"masks"`` (uint8 in {0, 1}, ``(R, *S)``),
``"id"`` (str) and optionally ``"valid"`` (bool, ``(*S)``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from orcal.io import binary_mask, natural_key, read_mask  # noqa: F401  (one rule for every reader)

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Case:
    """One item before loading: its id, the group kept whole by splits (a patient) and loader details."""

    id: str
    group: str
    info: Any = field(default=None, compare=False)


def check_root(root: str | Path | None, name: str, published: str, layout: str) -> Path:
    """The dataset root as a Path; a missing root says where the data is published and how to place it."""
    if root is None or str(root) in ("", "-"):
        raise ValueError(f"dataset {name!r} needs a root folder (argument 'root'). Expected layout: {layout}")
    path = Path(root).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"dataset root {path} does not exist. {name!r} is published at {published}; nothing is "
            f"downloaded: obtain it there and place it so that the root holds {layout}")
    return path


def resolve_task(task: str | None, valid: Sequence[str], default: str | None, name: str) -> str:
    """Check ``task`` against the dataset's tasks (the message lists the valid ones)."""
    if task is None:
        if default is None:
            raise ValueError(f"dataset {name!r} needs a task (argument 'task'); "
                             f"valid tasks: {', '.join(valid)}")
        return default
    if task not in valid:
        raise ValueError(f"unknown task {task!r} for dataset {name!r}; valid tasks: {', '.join(valid)}")
    return task


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for arg, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= float(value) < 1.0:
            raise ValueError(f"{arg} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be below 1, got {val_fraction + test_fraction}")


def _assign_groups(groups: Sequence[str], fractions: dict[str, float], seed: int) -> dict[str, str]:
    """Map each group to a split name: a seeded permutation of the sorted groups, cut by fractions."""
    unique = sorted(set(groups), key=natural_key)
    order = np.random.default_rng(seed).permutation(len(unique))
    out: dict[str, str] = {}
    start = 0
    names = list(fractions)
    for i, name in enumerate(names):
        if i == len(names) - 1:
            stop = len(unique)
        else:
            stop = start + int(round(fractions[name] * len(unique)))
            if fractions[name] > 0 and stop == start and len(unique) - start > 1:
                stop = start + 1  # a requested split is never silently empty when groups allow it
        for j in order[start:stop]:
            out[unique[j]] = name
        start = stop
    return out


def _check_split(split: str | None) -> None:
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)} or None for every case")


def seeded_split(cases: Sequence[Case], split: str | None, val_fraction: float = 0.1,
                 test_fraction: float = 0.2, seed: int = 0) -> list[Case]:
    """Cases of ``split`` for a dataset without an official split, whole groups (patients) kept together."""
    _check_split(split)
    _check_fractions(val_fraction, test_fraction)
    if split is None:
        return list(cases)
    assign = _assign_groups([c.group for c in cases],
                            {"test": test_fraction, "val": val_fraction, "train": 1.0}, seed)
    return [c for c in cases if assign[c.group] == split]


def official_split(cases: Sequence[Case], split: str | None, official: Callable[[Case], str],
                   val_fraction: float = 0.1, seed: int = 0) -> list[Case]:
    """Cases of ``split`` for a dataset with official train/test sets; val is carved from train by group."""
    _check_split(split)
    _check_fractions(val_fraction, 0.0)
    if split is None:
        return list(cases)
    if split == "test":
        return [c for c in cases if official(c) == "test"]
    train = [c for c in cases if official(c) == "train"]
    assign = _assign_groups([c.group for c in train], {"val": val_fraction, "train": 1.0}, seed)
    return [c for c in train if assign[c.group] == split]


def label_mask(arr: np.ndarray, labels: Sequence[int], allowed: Sequence[int], source: str) -> np.ndarray:
    """Foreground = voxels whose label is in ``labels``; labels outside ``allowed`` are an error."""
    arr = np.asarray(arr)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise ValueError(f"{source}: a label map must hold integer labels, found non-integer values")
        arr = arr.astype(np.int64)
    bad = np.setdiff1d(np.unique(arr), np.asarray(allowed))
    if bad.size:
        raise ValueError(f"{source}: unexpected labels {bad[:8].tolist()}; expected only {list(allowed)}")
    return np.isin(arr, np.asarray(labels)).astype(np.uint8)


def check_same_shape(mask: np.ndarray, shape: tuple[int, ...], source: str, image_source: str) -> None:
    """A rater mask must cover the image voxel for voxel."""
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{source}: rater mask shape {tuple(mask.shape)} differs from the image shape "
                         f"{tuple(shape)} of {image_source}")


class OriginalReads:
    """What :func:`original_intensities` counts: ``images``, the images a loader read in their own units."""

    def __init__(self) -> None:
        self.images = 0


_ORIGINAL: ContextVar[OriginalReads | None] = ContextVar("orcal_original_intensities", default=None)


@contextmanager
def original_intensities() -> Iterator[OriginalReads]:
    """Within this block the loaders deliver images in their files' own units (Hounsfield units for CT) as
    float32: :func:`scale_intensity` keeps its checks but not its rule. For tools that normalise images
    themselves and must see a new scan as they saw the training data (nnU-Net). Loaders must be opened
    inside the block (some read their images when opened). Yields the count of images read so: an item that
    leaves it unchanged came from a loader that does not scale through :func:`scale_intensity`.
    """
    reads = OriginalReads()
    token = _ORIGINAL.set(reads)
    try:
        yield reads
    finally:
        _ORIGINAL.reset(token)


def scale_intensity(arr: np.ndarray, mode: str | tuple[float, float] = "auto", source: str = "image") -> np.ndarray:
    """Image intensities to float32: uint8 / 255, a (low, high) window to [0, 1], or 0.5-99.5 percentiles
    (within :func:`original_intensities`: unchanged).

    NaN or infinite intensities are an error naming ``source`` (one NaN would make every percentile, and so
    the whole image, NaN).
    """
    arr = np.asarray(arr)
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise ValueError(f"{source}: the image holds {bad} NaN or infinite values; fill or mask them first")
    reads = _ORIGINAL.get()
    if reads is not None:
        reads.images += 1
        return arr.astype(np.float32)
    if isinstance(mode, tuple | list):
        lo, hi = float(mode[0]), float(mode[1])
        if not hi > lo:
            raise ValueError(f"intensity window must have high > low, got {mode}")
        return ((np.clip(arr.astype(np.float32), lo, hi) - lo) / (hi - lo)).astype(np.float32)
    if mode == "none":
        return arr.astype(np.float32)
    if mode == "auto" and arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if mode in ("auto", "percentile"):
        a = arr.astype(np.float32)
        lo, hi = np.percentile(a, [0.5, 99.5]) if a.size else (0.0, 1.0)
        if hi <= lo:
            return np.zeros_like(a)
        return ((np.clip(a, lo, hi) - lo) / (hi - lo)).astype(np.float32)
    raise ValueError(f"unknown intensity mode {mode!r}; use 'auto', 'percentile', 'none' or (low, high)")


def make_item(image: np.ndarray, masks: Sequence[np.ndarray] | np.ndarray, case_id: str,
              valid: np.ndarray | None = None) -> dict:
    """The item dict: float32 image (C, *S), uint8 masks (R, *S), id and optional bool valid."""
    img = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    m = torch.from_numpy(np.ascontiguousarray(np.stack(list(masks)) if not isinstance(masks, np.ndarray)
                                              else masks, dtype=np.uint8))
    item = {"image": img, "masks": m, "id": case_id}
    if valid is not None:
        item["valid"] = torch.from_numpy(np.ascontiguousarray(valid, dtype=bool))
    return item


def with_structures(item: dict, structures: Sequence[int] | None) -> dict:
    """Mark an item whose ``masks`` are rater label maps of ``len(structures)`` structures (SPEC §11)."""
    if structures is not None:
        item["num_structures"] = len(structures)
    return item


class MultiRaterDataset(Dataset):
    """Base class: a list of :class:`Case` loaded lazily by :meth:`load_case`, an optional transform."""

    name = ""
    published = ""
    #: What the images' original intensities are (:func:`original_intensities`), for tools that normalise
    #: by modality: "CT" for Hounsfield units; "" where a loader does not know.
    modality = ""

    def __init__(self, cases: Sequence[Case], split: str | None, transform: Callable | None = None):
        if split is not None and not cases:
            raise ValueError(f"split {split!r} of dataset {self.name!r} is empty; check the root, the split "
                             "fractions or the options that filter cases")
        if not cases:
            raise ValueError(f"dataset {self.name!r} has no cases under its root")
        self.cases = list(cases)
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.cases)

    def image_path(self, index: int) -> Path | None:
        """The image file item ``index`` is read from, where there is one (predictions keep its NIfTI affine)."""
        return None

    @property
    def display_name(self) -> str:
        """How reports name this data: the loader's name and task (datasets that know better override it)."""
        task = getattr(self, "task", None)
        return f"{self.name}:{task}" if task else self.name

    def load_case(self, case: Case) -> dict:
        """Load one case into an item dict (implemented by each dataset)."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} cases")
        item = self.load_case(self.cases[index])
        return self.transform(item) if self.transform is not None else item

    @property
    def ids(self) -> list[str]:
        """Case ids in order."""
        return [c.id for c in self.cases]

    @property
    def groups(self) -> list[str]:
        """The group (patient) of each case, in order."""
        return [c.group for c in self.cases]


def channels_first(image: np.ndarray, spatial: tuple[int, ...], source: str) -> np.ndarray:
    """Image as ``(C, *spatial)``: no channel axis, channels last (RGB, multi-modal NIfTI) or first."""
    spatial = tuple(spatial)
    shape = tuple(image.shape)
    if shape == spatial:
        return image[None]
    squeezed = tuple(s for s in shape if s != 1)
    if squeezed == tuple(s for s in spatial if s != 1) and image.size == int(np.prod(spatial)):
        return image.reshape((1,) + spatial)  # singleton axes, e.g. a 2D slice stored as (H, W, 1)
    if image.ndim == len(spatial) + 1:
        if shape[:-1] == spatial:
            return np.moveaxis(image, -1, 0)
        if shape[1:] == spatial:
            return image
    raise ValueError(f"{source}: image shape {shape} does not match the rater masks' shape {spatial} "
                     "(with or without a channel axis)")


def collate(batch: Sequence[dict]) -> dict:
    """Stack items into a batch for a ``DataLoader``; items without ``valid`` count as all valid when any
    item of the batch has one (padding may add it to some items only). Other keys are kept as lists."""
    if not batch:
        raise ValueError("batch must hold at least one item")
    out: dict = {"image": torch.stack([b["image"] for b in batch]),
                 "masks": torch.stack([b["masks"] for b in batch])}
    if any("valid" in b for b in batch):
        out["valid"] = torch.stack([b["valid"] if "valid" in b
                                    else torch.ones(b["masks"].shape[1:], dtype=torch.bool) for b in batch])
    for key in batch[0]:
        if key not in out:
            values = [b.get(key) for b in batch]
            out[key] = torch.stack(values) if all(isinstance(v, torch.Tensor) for v in values) else values
    return out
