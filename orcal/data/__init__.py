"""Multi-rater datasets: a synthetic generator, loaders for published layouts, joint transforms.

>>> ds = load_dataset("synthetic", split="train", n=32)
>>> item = ds[0]   # {"image": (C, *S) float32, "masks": (R, *S) uint8, "id": str[, "valid": (*S) bool]}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from torch.utils.data import Dataset

from .agreement import AgreementAccumulator, agreement_stats
from .base import SPLITS, Case, MultiRaterDataset, collate, original_intensities
from .cocahis import CoCaHis
from .ct import Curvas, LongCIU
from .folder import FolderDataset
from .lidc import LIDCPickle, LIDCSlices, LIDCVolumes
from .qubiq import QUBIQ
from .refuge import Refuge
from .safe_pickle import RestrictedUnpickler, UnsafePickleError, safe_load
from .synthetic import SyntheticBatch, SyntheticConfig, SyntheticMultiRater, make_synthetic
from .transforms import (
    CenterCrop,
    Compose,
    IntensityScale,
    RandomCrop,
    RandomFlip,
    RandomPatch,
    RandomRot90,
    SlidingWindow,
    augment_2d,
    sliding_window_inference,
)

_REGISTRY: dict[str, type[MultiRaterDataset]] = {}

#: The registered loaders, ``{name: class}`` in registration order: a read-only, live view (names accepted by
#: :func:`load_dataset` and ``--dataset``); change it with :func:`register_dataset`.
DATASETS: Mapping[str, type[MultiRaterDataset]] = MappingProxyType(_REGISTRY)


def register_dataset(name: str, cls: type[MultiRaterDataset], *, replace: bool = False) -> type[MultiRaterDataset]:
    """Add a loader: ``load_dataset(name, root, split=..., task=..., transform=..., **options)`` then builds
    ``cls(root, split=split, task=task, transform=transform, **options)``, as do ``orcal train/experiment
    --dataset name``. Returns ``cls``."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a dataset name must be an identifier (it is a --dataset value), got {name!r}")
    if not isinstance(cls, type) or not issubclass(cls, Dataset):
        raise TypeError(f"cls of dataset {name!r} must be a Dataset class (a MultiRaterDataset subclass), got {cls!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"dataset {name!r} is already registered; pass replace=True to replace it")
    _REGISTRY[name] = cls
    return cls


def unregister_dataset(name: str) -> None:
    """Remove a loader added with :func:`register_dataset`."""
    dataset_class(name)
    del _REGISTRY[name]


def dataset_class(name: str) -> type[MultiRaterDataset]:
    """The loader class registered under ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
    return _REGISTRY[name]


for _name, _cls in (("synthetic", SyntheticMultiRater), ("lidc_slices", LIDCSlices), ("lidc_volumes", LIDCVolumes),
                    ("lidc", LIDCPickle), ("cocahis", CoCaHis), ("refuge", Refuge), ("longciu", LongCIU),
                    ("qubiq", QUBIQ), ("curvas", Curvas), ("folder", FolderDataset)):
    register_dataset(_name, _cls)
del _name, _cls


def load_dataset(name: str, root=None, split: str | None = None, task: str | None = None,
                 transform: Callable[[dict], dict] | None = None, **options) -> Dataset:
    """Open dataset ``name`` stored under ``root`` (nothing is downloaded).

    ``split`` is "train", "val", "test" or None (every case); ``task`` picks the structure where a dataset
    has several; ``options`` go to the loader class (see its docstring for the layout, the publication
    and options such as ``val_fraction``, ``test_fraction``, ``seed``, ``crop``).
    """
    cls = dataset_class(name)
    try:
        return cls(root, split=split, task=task, transform=transform, **options)
    except TypeError as err:
        if "unexpected keyword argument" in str(err):
            raise TypeError(f"dataset {name!r}: {err}; see help(orcal.data.{cls.__name__})") from err
        raise


__all__ = [
    "DATASETS", "SPLITS", "AgreementAccumulator", "Case", "CenterCrop", "CoCaHis", "Compose", "Curvas",
    "FolderDataset", "IntensityScale", "LIDCPickle", "LIDCSlices", "LIDCVolumes", "LongCIU", "MultiRaterDataset",
    "QUBIQ",
    "RandomCrop", "RandomFlip", "RandomPatch", "RandomRot90", "Refuge", "RestrictedUnpickler",
    "SlidingWindow", "SyntheticBatch", "SyntheticConfig", "SyntheticMultiRater", "UnsafePickleError",
    "agreement_stats", "augment_2d", "collate", "dataset_class", "load_dataset", "make_synthetic",
    "original_intensities", "register_dataset", "safe_load", "sliding_window_inference", "unregister_dataset",
]
