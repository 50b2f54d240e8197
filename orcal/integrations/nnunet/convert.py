"""Any orcal dataset in nnU-Net's raw layout (:func:`convert_dataset`), and the ``orcal`` block of the
``dataset.json`` it writes (:func:`read_orcal_meta`)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from orcal.integrations.nnunet.levels import joint_index, joint_levels


def _case_name(case_id: str) -> str:
    """An nnU-Net case identifier: letters, digits, ``-`` and ``_`` (``LIDC-IDRI-0001/nodule-0`` ->
    ``LIDC-IDRI-0001_nodule-0``)."""
    return re.sub(r"[^A-Za-z0-9-]+", "_", str(case_id)).strip("_") or "case"


def _volume(arr: np.ndarray) -> np.ndarray:
    """A 2D item as a one-slice volume (nnU-Net plans a 2D configuration for it); 3D as it is."""
    return arr[..., None] if arr.ndim == 2 else arr


def _json_value(value: Any, name: str) -> Any:
    """A loader option as its JSON type (tuples as lists), so that dataset.json reads back what was given."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list | tuple):
        return [_json_value(v, name) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _json_value(v, name) for k, v in value.items()}
    raise TypeError(f"option {name}={value!r} ({type(value).__name__}) cannot be stored in dataset.json; "
                    "give numbers, strings, booleans or lists of them")


#: What convert writes into a dataset folder (removed again by ``overwrite=True``).
_CONVERTED = ("imagesTr", "labelsTr", "imagesTs", "ratersTs", "dataset.json", "cases.json")


def _clear(folder: Path, overwrite: bool) -> None:
    """An existing dataset folder is an error unless ``overwrite``: then what convert wrote there is removed."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise FileExistsError(f"{folder} is a file; choose another --out, id or name")
    found = [n for n in _CONVERTED if (folder / n).exists()]
    if found and not overwrite:
        raise FileExistsError(f"{folder} already holds an nnU-Net dataset ({', '.join(found)}); pass --overwrite "
                              "(overwrite=True) to replace it, or choose another id or name")
    import shutil

    for n in found:
        path = folder / n
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def convert_dataset(name: str, root: str | os.PathLike | None, out: str | os.PathLike, dataset_id: int,
                    dataset_name: str, task: str | None = None, channel_names: Mapping[int, str] | None = None,
                    progress: bool = True, overwrite: bool = False, **options) -> Path:
    """Write orcal dataset ``name`` in nnU-Net v2's raw layout under ``out`` (your ``nnUNet_raw``).

    The ``train`` and ``val`` splits become ``imagesTr``/``labelsTr`` (nnU-Net cross-validates them itself),
    the ``test`` split ``imagesTs`` with its rater masks in ``ratersTs/<case>/rater<r>.nii.gz`` for ``orcal
    evaluate``. Labels are the vote counts ``k`` (``dataset.json``: ``background`` 0, ``k=1`` ... ``k=R``);
    for a dataset of several structures (``structures="all"``) the joint vote counts (``k=1/0/2`` ...,
    :func:`joint_levels`), with the raters' label maps kept. NIfTI images keep their affine where the dataset
    names its file (``image_path``); otherwise the affine is the identity. ``options`` go to
    :func:`orcal.data.load_dataset` (e.g. ``label=2``, ``crop=64``, ``structures="all"``).

    Images keep their original intensities (:func:`orcal.data.original_intensities`; HU for CT), not orcal's
    window scaling: nnU-Net normalises them itself, and must see a new scan given to ``nnUNetv2_predict`` in
    the units it was trained on. The channel is named after the loader's ``modality`` ("CT" for CURVAS and
    LongCIU: nnU-Net's CT normalisation), else ``channel<c>`` (nnU-Net's z-scoring); ``channel_names``
    overrides it, e.g. ``{0: "CT"}`` for a folder of CT scans in HU. A loader whose original intensities are
    unknown is refused.

    Returns:
        the dataset folder, ``out/Dataset<id>_<dataset_name>``. An existing one is an error unless
        ``overwrite``.
    """
    from orcal._progress import progress_bar
    from orcal.data import SyntheticMultiRater, load_dataset, original_intensities
    from orcal.io import file_format, write_array
    from orcal.ops import orc_targets

    if not 1 <= int(dataset_id) <= 999:
        raise ValueError(f"dataset_id must lie in 1..999 (nnU-Net's dataset ids), got {dataset_id}")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", dataset_name or ""):
        raise ValueError(f"dataset_name must hold letters, digits, '-' or '_', got {dataset_name!r}")
    if "transform" in options:
        raise ValueError("convert writes the loader's own images; a transform would change what nnU-Net learns "
                         "from what it is given at prediction: leave transform out (nnU-Net augments itself)")
    stored_options = {k: _json_value(v, k) for k, v in options.items()}
    folder = Path(out) / f"Dataset{int(dataset_id):03d}_{dataset_name}"
    _clear(folder, overwrite)
    R = channels = C = None
    modality = ""
    cases: dict[str, dict[str, Any]] = {}
    for split, images, labels in (("train", "imagesTr", "labelsTr"), ("val", "imagesTr", "labelsTr"),
                                  ("test", "imagesTs", None)):
        with original_intensities() as reads:  # nnU-Net normalises: it must see the files' own units
            try:
                ds = load_dataset(name, root, split=split, task=task, **options)
            except ValueError as err:
                if "is empty" in str(err):  # a layout without a validation (or test) split
                    continue
                raise
            modality = getattr(ds, "modality", "")
            for i in progress_bar(range(len(ds)), desc=f"{name} {split} -> nnU-Net", unit="case",
                                  enabled=progress):
                read = reads.images
                item = ds[i]
                if reads.images == read and not isinstance(ds, SyntheticMultiRater):
                    raise ValueError(f"dataset {name!r} does not deliver its images through orcal's intensity rule, "
                                     "so their original intensities are unknown; nnU-Net needs them (it normalises "
                                     "itself): write the images in nnU-Net's layout yourself")
                case = _case_name(item["id"])
                if case in cases:
                    raise ValueError(f"cases {cases[case]['id']!r} and {item['id']!r} both become {case!r}")
                masks, image = item["masks"].numpy(), item["image"].numpy()
                if R is not None and (masks.shape[0] != R or image.shape[0] != channels
                                      or item.get("num_structures") != C):
                    raise ValueError(f"case {item['id']}: {masks.shape[0]} raters and {image.shape[0]} channels, "
                                     f"the others have {R} and {channels}; nnU-Net needs one label set")
                R, channels, C = masks.shape[0], image.shape[0], item.get("num_structures")
                source = ds.image_path(i) if hasattr(ds, "image_path") else None
                like = source if source is not None and file_format(source) == "nifti" else None
                for c in range(channels):
                    write_array(folder / images / f"{case}_{c:04d}.nii.gz", _volume(image[c]).astype(np.float32),
                                like)
                if labels is not None:
                    if C is None:
                        label = masks.sum(0).astype(np.uint8)
                    else:  # several structures: the joint vote count's class
                        label = joint_index(orc_targets(item["masks"][None], num_structures=C)[0].numpy(), R)
                    write_array(folder / labels / f"{case}.nii.gz", _volume(label), like)
                else:
                    for r in range(R):
                        write_array(folder / "ratersTs" / case / f"rater{r + 1}.nii.gz", _volume(masks[r]), like)
                cases[case] = {"id": item["id"], "split": split}
    n_train = sum(c["split"] != "test" for c in cases.values())
    if not n_train:
        raise ValueError(f"dataset {name!r} has no training case to convert")
    names = dict(channel_names or {})
    bad = sorted(set(names) - set(range(channels)))
    if bad:
        raise ValueError(f"channel_names names channels {bad}, but the images have {channels} (0..{channels - 1})")
    meta = {
        "channel_names": {str(c): names.get(c, modality or f"channel{c}") for c in range(channels)},
        "labels": ({"background": 0, **{f"k={k}": k for k in range(1, R + 1)}} if C is None else
                   {"background": 0, **{"k=" + "/".join(str(int(v)) for v in row): i
                                        for i, row in enumerate(joint_levels(C, R)) if i}}),
        "numTraining": n_train,
        "file_ending": ".nii.gz",
        "name": dataset_name,
        "description": f"orcal dataset {name!r}: the label is the number of raters (of {R}) who marked the voxel"
                       + ("" if C is None else f", per structure (of {C}), as one joint class")
                       + "; images in their original intensities",
        "orcal": {"num_raters": R, "num_structures": C, "source": name, "task": task, "intensities": "original",
                  "options": stored_options},
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset.json").write_text(json.dumps(meta, indent=1))
    (folder / "cases.json").write_text(json.dumps(cases, indent=1))
    return folder


def read_orcal_meta(dataset_json: Mapping[str, Any] | str | os.PathLike, source: str | None = None
                    ) -> tuple[int | None, int | None]:
    """``(R, C)`` recorded by :func:`convert_dataset` in a ``dataset.json`` (a path, or its contents with
    ``source`` naming the file): ``C`` is None for one structure, both are None for a dataset orcal did not
    write. Numbers stored as strings by older versions are read too; anything else names the file."""
    if not isinstance(dataset_json, Mapping):
        path = Path(dataset_json)
        source = str(path)
        try:
            dataset_json = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not a readable dataset.json ({type(err).__name__}: {err}); "
                             "rewrite it with orcal nnunet convert") from err
    source = source or "dataset.json"
    meta = dataset_json.get("orcal") if isinstance(dataset_json, Mapping) else None
    if meta is None:
        return None, None
    if not isinstance(meta, Mapping):
        raise ValueError(f"{source}: 'orcal' must be an object, got {type(meta).__name__}")

    def count(key: str, low: int, high: int) -> int | None:
        value = meta.get(key)
        if value is None:
            return None
        try:
            number = int(str(value).strip()) if isinstance(value, str) else value
            if isinstance(number, bool) or not isinstance(number, int) or not low <= number <= high:
                raise ValueError
        except ValueError:
            raise ValueError(f"{source}: orcal.{key} must be an integer in {low}..{high}, got {value!r}; "
                             "rewrite it with orcal nnunet convert") from None
        return number

    from orcal.ops import MAX_RATERS

    return count("num_raters", 1, MAX_RATERS), count("num_structures", 1, 255)
