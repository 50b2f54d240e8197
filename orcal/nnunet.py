"""nnU-Net v2 (``pip install "orcal[nnunet]"``): ORC trained the way nnU-Net users work.

With ``R`` raters, the label nnU-Net trains on is the vote count ``k`` (0..R, SPEC §1): nnU-Net plans an
``R + 1``-channel head for its ``R + 1`` "classes", which are exactly ORC's ordinal levels. With ``C``
structures (SPEC §11) the label is the joint vote count ``(k_1, ..., k_C)`` of a voxel, one nnU-Net class per
tuple with ``sum k_c <= R`` (:func:`joint_levels`): the head predicts their joint distribution, and the loss
is orcal's on each structure's marginal levels (:class:`JointOrdinalLoss`). Three pieces:

- :func:`convert_dataset` writes any orcal dataset in nnU-Net's raw layout (``imagesTr``, ``labelsTr`` with
  ``k``, ``imagesTs``, and ``ratersTs/<case>/rater<r>.nii.gz`` kept for evaluation) with its ``dataset.json``;
- :class:`nnUNetTrainerORC` trains that head with orcal's fused loss (BCE on the majority readout + λ·RPS)
  under nnU-Net's deep supervision and ignore label; its validation Dice is the majority readout's;
- :func:`export_probabilities` turns what ``nnUNetv2_predict --save_probabilities`` writes (the softmax over
  the ``R + 1`` levels, ``.npz``) into foreground-probability maps of both readouts and ``E[k]``, with the
  geometry of nnU-Net's own output, in the layout ``orcal evaluate --pred`` reads. nnU-Net's argmax over
  the levels means nothing for ORC and is left aside.

nnU-Net finds trainers by class name in its package or in the folders of ``nnUNet_extTrainer``;
:func:`write_trainer_module` (``orcal nnunet trainer DIR``) writes the one-line module that makes it find
this one. See docs/integrations.md for the commands in order.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

# and nnUNetTrainerORC with its epoch variants, defined when first asked for (they import nnU-Net)
__all__ = ["EPOCH_VARIANTS", "SMOKE_ITERATIONS", "TRAINER_MODULE", "JointOrdinalLoss", "convert_dataset",
           "export_probabilities", "joint_levels", "marginal_matrix", "read_orcal_meta", "write_trainer_module"]

#: The module :func:`write_trainer_module` writes into a ``nnUNet_extTrainer`` folder.
TRAINER_MODULE = "orcal_trainers.py"


def _nnunet():
    try:
        import nnunetv2  # noqa: F401
    except ImportError as err:
        raise ImportError('orcal.nnunet needs nnU-Net v2: pip install "orcal[nnunet]"') from err


def _case_name(case_id: str) -> str:
    """An nnU-Net case identifier: letters, digits, ``-`` and ``_`` (``LIDC-IDRI-0001/nodule-0`` ->
    ``LIDC-IDRI-0001_nodule-0``)."""
    return re.sub(r"[^A-Za-z0-9-]+", "_", str(case_id)).strip("_") or "case"


def joint_levels(num_structures: int, num_raters: int) -> torch.Tensor:
    """Every joint vote count ``(k_1, ..., k_C)`` with ``sum k_c <= R`` (each rater gives a voxel one label), in
    lexicographic order from the all-zero background: ``(N, C)`` uint8, row ``i`` the nnU-Net class ``i``."""
    rows = [t for t in itertools.product(range(num_raters + 1), repeat=num_structures) if sum(t) <= num_raters]
    return torch.tensor(rows, dtype=torch.uint8)


def joint_index(k: np.ndarray, num_raters: int) -> np.ndarray:
    """The nnU-Net class of each voxel's joint vote count: ``k (C, *S)`` -> ``(*S)`` (int16)."""
    C = k.shape[0]
    levels = joint_levels(C, num_raters).numpy().astype(np.int64)
    radix = (num_raters + 1) ** np.arange(C - 1, -1, -1)
    lut = np.full((num_raters + 1) ** C, -1, dtype=np.int16)
    lut[levels @ radix] = np.arange(len(levels))
    return lut[np.tensordot(radix, k.astype(np.int64), axes=1)]


def marginal_matrix(num_structures: int, num_raters: int) -> torch.Tensor:
    """``(C (R+1), N)`` 0/1: row ``c (R+1) + j`` sums the joint classes whose structure ``c`` has ``k_c = j``."""
    levels = joint_levels(num_structures, num_raters).long()
    M = torch.zeros(num_structures * (num_raters + 1), len(levels))
    for c in range(num_structures):
        M[c * (num_raters + 1) + levels[:, c], torch.arange(len(levels))] = 1
    return M


def marginal_logits(logits: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """Joint-class logits ``(B, N, *S)`` as the log-probabilities of each structure's levels,
    ``(B, C (R+1), *S)``: logits whose softmax per structure is that structure's marginal distribution."""
    q = torch.softmax(logits.float(), 1)
    marginal = torch.einsum("mn,bn...->bm...", M.to(q), q)
    return torch.log(marginal.clamp_min(1e-30))


class JointOrdinalLoss(torch.nn.Module):
    """orcal's ordinal loss (SPEC §3, §11) of every structure on the marginals of a joint-class head:
    ``loss(logits (B, N, *S), target (B, 1, *S) joint class)``, nnU-Net's ``ignore_index`` voxels left out."""

    def __init__(self, num_structures: int, num_raters: int, rps_weight: float = 1.0, majority: int | None = None,
                 ignore_index: int | None = None) -> None:
        super().__init__()
        self.rps_weight, self.majority, self.ignore_index = rps_weight, majority, ignore_index
        self.register_buffer("levels", joint_levels(num_structures, num_raters), persistent=False)
        self.register_buffer("M", marginal_matrix(num_structures, num_raters), persistent=False)

    def votes(self, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(k (B, C, *S), valid (B, *S) or None)`` of a joint-class target ``(B, 1, *S)``."""
        t = target[:, 0].long()
        valid = None
        if self.ignore_index is not None:
            valid = t != self.ignore_index
            t = torch.where(valid, t, torch.zeros((), dtype=t.dtype, device=t.device))
        return self.levels.to(t.device)[t].movedim(-1, 1), valid

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from orcal.ops import ordinal_loss

        k, valid = self.votes(target)
        return ordinal_loss(marginal_logits(logits, self.M), k, self.rps_weight, self.majority, valid=valid)


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
                        label = joint_index(orc_targets(item["masks"][None], num_classes=C)[0].numpy(), R)
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


def write_trainer_module(folder: str | os.PathLike) -> Path:
    """Write the module that lets nnU-Net find :class:`nnUNetTrainerORC` by name: point
    ``nnUNet_extTrainer`` at ``folder`` (for ``nnUNetv2_train`` and ``nnUNetv2_predict`` alike)."""
    path = Path(folder) / TRAINER_MODULE
    path.parent.mkdir(parents=True, exist_ok=True)
    names = "".join(f"    {n},\n" for n in ["nnUNetTrainerORC", *_variants()])
    path.write_text('"""nnU-Net trainers of orcal: found by class name through nnUNet_extTrainer."""\n\n'
                    f"from orcal.nnunet import (  # noqa: F401\n{names})\n")
    return path


def _readouts_of_levels(q: torch.Tensor, num_raters: int, majority: int | None) -> dict[str, torch.Tensor]:
    """Both readouts and ``E[k]`` of level probabilities ``q (R+1, *S)``. The readouts of SPEC §2 take logits:
    ``log q`` are logits whose softmax is ``q``."""
    from orcal import ops, reference

    logits = torch.log(q.double().clamp_min(1e-12))[None]
    m = ops._majority(num_raters, majority)  # 1..R, or the strict majority
    expected = reference.foreground_probability(logits, "expected", m)[0]
    return {"majority": reference.foreground_probability(logits, "majority", m)[0].float(),
            "expected": expected.float(), "expected_k": (expected * num_raters).float()}


def _structures_of_prediction(pred: Path) -> tuple[int, int] | None:
    """``(C, R)`` of a several-structure dataset, from the dataset.json nnU-Net writes beside its predictions."""
    path = pred / "dataset.json"
    if not path.is_file():
        import warnings

        warnings.warn(f"{path} is missing (nnUNetv2_predict writes it): reading the probabilities as the levels of "
                      "one structure", stacklevel=3)
        return None
    R, C = read_orcal_meta(path)
    if C is not None and R is None:
        raise ValueError(f"{path}: orcal.num_structures is set but orcal.num_raters is missing; rewrite it with "
                         "orcal nnunet convert")
    return None if C is None else (C, R)


def export_probabilities(pred_dir: str | os.PathLike, out_dir: str | os.PathLike, majority: int | None = None
                         ) -> dict[str, Path]:
    """Foreground-probability maps from ``nnUNetv2_predict ... --save_probabilities`` output.

    For each ``<case>.npz`` (the softmax over the ``R + 1`` levels) in ``pred_dir``, writes
    ``out_dir/majority/<case>.nii.gz``, ``out_dir/expected/<case>.nii.gz`` and ``out_dir/expected_k/<case>.nii.gz``
    with the geometry of nnU-Net's ``<case>.nii.gz`` beside it. For several structures (the softmax over the
    joint classes; ``dataset.json`` says so) each structure's marginal levels give its maps, under
    ``out_dir/<readout>/structure<c>/``. Returns ``{folder name: folder}``.
    """
    import SimpleITK as sitk

    pred = Path(pred_dir)
    files = sorted(pred.glob("*.npz"))
    if not files:
        raise FileNotFoundError(f"{pred}: no <case>.npz; run nnUNetv2_predict with --save_probabilities")
    joint = _structures_of_prediction(pred)
    if majority is not None and joint is not None:
        from orcal.checks import check_int

        check_int(f"majority (with R = {joint[1]} raters)", majority, 1, joint[1])
    names = ("majority", "expected", "expected_k")
    if joint is None:
        folders = {r: Path(out_dir) / r for r in names}
    else:
        folders = {f"{r}/structure{c}": Path(out_dir) / r / f"structure{c}" for r in names
                   for c in range(1, joint[0] + 1)}
    for f in folders.values():
        f.mkdir(parents=True, exist_ok=True)
    for path in files:
        case = path.stem
        with np.load(path) as z:
            if "probabilities" not in z:
                raise ValueError(f"{path}: no 'probabilities' array (is it nnU-Net's --save_probabilities output?)")
            q = torch.from_numpy(np.asarray(z["probabilities"], dtype=np.float32))
        seg_path = pred / f"{case}.nii.gz"
        if not seg_path.is_file():
            raise FileNotFoundError(f"{seg_path}: nnU-Net's segmentation of {case}, whose geometry the maps take")
        reference_image = sitk.ReadImage(str(seg_path))
        if joint is None:
            maps = _readouts_of_levels(q, q.shape[0] - 1, majority)
        elif q.shape[0] != len(joint_levels(*joint)):
            raise ValueError(f"{path}: {q.shape[0]} classes, but dataset.json describes the "
                             f"{len(joint_levels(*joint))} joint vote counts of {joint[0]} structures and "
                             f"{joint[1]} raters")
        else:
            C, R = joint
            marginal = torch.einsum("mn,n...->m...", marginal_matrix(C, R), q.double().float())
            maps = {f"{name}/structure{c + 1}": m for c in range(C) for name, m in
                    _readouts_of_levels(marginal[c * (R + 1):(c + 1) * (R + 1)], R, majority).items()}
        for name, m in maps.items():
            arr = m.numpy()
            if arr.shape != sitk.GetArrayViewFromImage(reference_image).shape:
                raise ValueError(f"{path}: probabilities of shape {tuple(arr.shape)} do not match {seg_path}")
            img = sitk.GetImageFromArray(arr)
            img.CopyInformation(reference_image)
            sitk.WriteImage(img, str(folders[name] / f"{case}.nii.gz"))
    return folders


def _trainer_class():
    """Define :class:`nnUNetTrainerORC` on nnU-Net's trainer (imported only when it is asked for)."""
    _nnunet()
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from orcal import ops
    from orcal.losses import OrdinalLoss

    class nnUNetTrainerORC(nnUNetTrainer):  # noqa: N801  (nnU-Net's naming)
        """nnU-Net's trainer with the ``R + 1``-level head trained by orcal's fused ordinal loss (SPEC §3).

        The dataset's labels must be the vote counts ``0..R`` (:func:`convert_dataset`), with nnU-Net's
        optional ignore label last. Class attributes to subclass: ``rps_weight`` (λ, default 1) and
        ``majority`` (the majority threshold, default ``R // 2 + 1``). Deep supervision weights the scales
        as nnU-Net does (halving, the lowest scale left out). Validation reports the Dice of the majority
        readout ``P(k >= m) >= 0.5`` against ``k >= m``, which nnU-Net's checkpoint selection then tracks;
        the final validation (summary.json) scores the region ``k >= m`` of each structure. Shorter
        schedules: ``nnUNetTrainerORC_1epoch``, ``_5epochs`` ... (:data:`EPOCH_VARIANTS`), and
        ``nnUNetTrainerORC_smoke`` (:data:`SMOKE_ITERATIONS` iterations) to check the path.
        """

        rps_weight: float = 1.0
        majority: int | None = None

        def _orcal_meta(self) -> tuple[int | None, int | None]:
            """``(R, C)`` from the dataset.json nnU-Net was given (its copy in nnUNet_preprocessed named)."""
            source = os.path.join(self.preprocessed_dataset_folder_base, "dataset.json")
            return read_orcal_meta(self.dataset_json, source)

        @property
        def num_structures(self) -> int | None:
            """``C`` of a dataset of several structures (joint classes), from its dataset.json."""
            return self._orcal_meta()[1]

        @property
        def num_raters(self) -> int:
            labels = sorted(int(v) for v in self.label_manager.all_labels)
            if self.label_manager.has_regions or labels != list(range(len(labels))) or len(labels) < 2:
                raise ValueError(f"nnUNetTrainerORC needs the labels 0..R (vote counts), got {labels}; convert the "
                                 "data with orcal nnunet convert")
            R, C = self._orcal_meta()
            if C is None:
                return len(labels) - 1
            if R is None or len(labels) != len(joint_levels(C, R)):
                raise ValueError(f"{len(labels)} labels are not the joint vote counts of {C} structures and {R} "
                                 "raters; convert the data with orcal nnunet convert")
            return R

        @property
        def majority_threshold(self) -> int:
            """``m``: the class attribute ``majority`` checked against ``R``, or the strict majority."""
            return ops._majority(self.num_raters, self.majority)

        def majority_regions(self) -> list[tuple[int, ...]]:
            """Per structure, the nnU-Net classes whose vote count reaches the majority (``k_c >= m``)."""
            R, m = self.num_raters, self.majority_threshold
            if self.num_structures is None:
                return [tuple(range(m, R + 1))]
            levels = joint_levels(self.num_structures, R)
            return [tuple(int(i) for i in torch.nonzero(levels[:, c] >= m)[:, 0]) for c in range(levels.shape[1])]

        def perform_actual_validation(self, *args, **kwargs):  # its arguments differ between nnU-Net versions
            """nnU-Net's final validation, scored per structure on the majority region ``k_c >= m`` of its
            exported segmentation (summary.json: one Dice per structure, ``foreground_mean`` their mean).
            Scored per class, the vote counts (joint ones above all) that neither the reference nor the
            prediction holds make nnU-Net's mean Dice NaN."""
            labels, regions = self.label_manager, self.majority_regions()
            self.label_manager = _MajorityRegions(labels, regions)  # read only by the scoring of the exports
            try:
                super().perform_actual_validation(*args, **kwargs)
            finally:
                self.label_manager = labels

        def _ordinal_loss(self) -> torch.nn.Module:
            ignore = self.label_manager.ignore_label
            if self.num_structures is not None:
                return JointOrdinalLoss(self.num_structures, self.num_raters, self.rps_weight, self.majority, ignore)
            return OrdinalLoss(self.rps_weight, self.majority, ignore_index=ignore)

        def _build_loss(self):
            self.num_raters  # noqa: B018  (the labels are checked before training starts)
            loss = self.loss_module = self._ordinal_loss()
            if not self.enable_deep_supervision:
                return loss
            n = len(self._get_deep_supervision_scales())
            weights = np.array([0.5 ** i for i in range(n)])
            weights[-1] = 1e-6 if self.is_ddp else 0.0  # the coarsest output is not trained (DDP needs a grad)
            return DeepSupervisionWrapper(loss, weights / weights.sum())

        def validation_step(self, batch: dict) -> dict:
            data = batch["data"].to(self.device, non_blocking=True)
            target = batch["target"]
            target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
                else target.to(self.device, non_blocking=True)
            with torch.no_grad():
                output = self.network(data)
                loss = self.loss(output, target)
                if self.enable_deep_supervision:
                    output, target = output[0], target[0]
                C, m = self.num_structures, self.majority_threshold
                if C is None:
                    k = target[:, 0].long()
                    valid = torch.ones_like(k, dtype=torch.bool)
                    if self.label_manager.ignore_label is not None:
                        valid = k != self.label_manager.ignore_label
                    k, logits = k[:, None], output.float()
                else:  # each structure's marginal levels
                    k, valid = self.loss_module.votes(target)
                    valid = torch.ones_like(k[:, 0], dtype=torch.bool) if valid is None else valid
                    logits = marginal_logits(output, self.loss_module.M)
                pred = ops.foreground_probability(logits, readout="majority", majority=m,
                                                  num_structures=C or 1) >= 0.5  # (B, C, *S)
                truth, valid = k >= m, valid[:, None]
                dims = (0, *range(2, pred.ndim))  # per structure: nnU-Net averages its classes' Dice
                tp = (pred & truth & valid).sum(dims).double().cpu().numpy()
                fp = (pred & ~truth & valid).sum(dims).double().cpu().numpy()
                fn = (~pred & truth & valid).sum(dims).double().cpu().numpy()
            return {"loss": loss.detach().cpu().numpy(), "tp_hard": tp, "fp_hard": fp, "fn_hard": fn}

    nnUNetTrainerORC.__module__ = __name__
    return nnUNetTrainerORC


class _MajorityRegions:
    """nnU-Net's label manager, with the majority region of each structure as the regions its validation
    scores (nnU-Net evaluates a region as the union of its classes)."""

    has_regions = True

    def __init__(self, labels: Any, regions: list[tuple[int, ...]]) -> None:
        self._labels, self.foreground_regions = labels, regions

    def __getattr__(self, name: str) -> Any:
        return getattr(self._labels, name)


#: nnUNetTrainerORC_<n>epochs (and _1epoch): shorter schedules, named the way nnU-Net's own variants are.
EPOCH_VARIANTS = (1, 5, 10, 20, 50, 100, 250)
#: The smoke-test variant: one epoch of this many training (and 2 validation) iterations, which checks the
#: whole path in minutes on a CPU and trains nothing useful.
SMOKE_ITERATIONS = 10


def _variants() -> dict[str, tuple[int, int | None]]:
    """``{class name: (epochs, iterations per epoch or None for nnU-Net's)}`` of the variants."""
    names = {f"nnUNetTrainerORC_{e}epoch" + ("" if e == 1 else "s"): (e, None) for e in EPOCH_VARIANTS}
    return {**names, "nnUNetTrainerORC_smoke": (1, SMOKE_ITERATIONS)}


def _variant(base: type, name: str, epochs: int, iterations: int | None) -> type:
    """``nnUNetTrainerORC`` with a shorter schedule, with nnU-Net's ``__init__`` signature (nnU-Net stores a
    trainer's arguments by name)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008  (nnU-Net's signature)
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        self.num_epochs = epochs
        if iterations is not None:
            self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = iterations, 2

    doc = f"nnUNetTrainerORC for {epochs} epoch(s)" + ("" if iterations is None else f" of {iterations} iterations")
    return type(name, (base,), {"__init__": __init__, "__module__": __name__, "__doc__": doc + "."})


def __getattr__(name: str):
    # nnU-Net is imported only when a trainer is asked for
    if name == "nnUNetTrainerORC":
        cls = globals()[name] = _trainer_class()
        return cls
    variants = _variants()
    if name in variants:
        from orcal.nnunet import nnUNetTrainerORC as base

        cls = globals()[name] = _variant(base, name, *variants[name])
        return cls
    raise AttributeError(f"module 'orcal.nnunet' has no attribute {name!r}")
