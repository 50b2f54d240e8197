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

# and nnUNetTrainerORC, defined when first asked for (it imports nnU-Net)
__all__ = ["TRAINER_MODULE", "JointOrdinalLoss", "convert_dataset", "export_probabilities", "joint_levels",
           "marginal_matrix", "write_trainer_module"]

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


def convert_dataset(name: str, root: str | os.PathLike | None, out: str | os.PathLike, dataset_id: int,
                    dataset_name: str, task: str | None = None, channel_names: Mapping[int, str] | None = None,
                    progress: bool = True, **options) -> Path:
    """Write orcal dataset ``name`` in nnU-Net v2's raw layout under ``out`` (your ``nnUNet_raw``).

    The ``train`` and ``val`` splits become ``imagesTr``/``labelsTr`` (nnU-Net cross-validates them itself),
    the ``test`` split ``imagesTs`` with its rater masks in ``ratersTs/<case>/rater<r>.nii.gz`` for ``orcal
    evaluate``. Labels are the vote counts ``k`` (``dataset.json``: ``background`` 0, ``k=1`` ... ``k=R``);
    for a dataset of several structures (``structures="all"``) the joint vote counts (``k=1/0/2`` ...,
    :func:`joint_levels`), with the raters' label maps kept. NIfTI images keep their affine where the dataset
    names its file (``image_path``); otherwise the affine is the identity. ``options`` go to
    :func:`orcal.data.load_dataset` (e.g. ``label=2``, ``crop=64``, ``structures="all"``).

    Returns:
        the dataset folder, ``out/Dataset<id>_<dataset_name>``.
    """
    from orcal._progress import progress_bar
    from orcal.data import load_dataset
    from orcal.io import file_format, write_array
    from orcal.ops import orc_targets

    if not 1 <= int(dataset_id) <= 999:
        raise ValueError(f"dataset_id must lie in 1..999 (nnU-Net's dataset ids), got {dataset_id}")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", dataset_name or ""):
        raise ValueError(f"dataset_name must hold letters, digits, '-' or '_', got {dataset_name!r}")
    folder = Path(out) / f"Dataset{int(dataset_id):03d}_{dataset_name}"
    if (folder / "dataset.json").exists():
        raise FileExistsError(f"{folder} already holds a dataset.json; remove it or choose another id or name")
    R = channels = C = None
    cases: dict[str, dict[str, Any]] = {}
    for split, images, labels in (("train", "imagesTr", "labelsTr"), ("val", "imagesTr", "labelsTr"),
                                  ("test", "imagesTs", None)):
        try:
            ds = load_dataset(name, root, split=split, task=task, **options)
        except ValueError as err:
            if "is empty" in str(err):  # a layout without a validation (or test) split
                continue
            raise
        for i in progress_bar(range(len(ds)), desc=f"{name} {split} -> nnU-Net", unit="case", enabled=progress):
            item = ds[i]
            case = _case_name(item["id"])
            if case in cases:
                raise ValueError(f"cases {cases[case]['id']!r} and {item['id']!r} both become {case!r}")
            masks, image = item["masks"].numpy(), item["image"].numpy()
            if R is not None and (masks.shape[0] != R or image.shape[0] != channels
                                  or item.get("num_structures") != C):
                raise ValueError(f"case {item['id']}: {masks.shape[0]} raters and {image.shape[0]} channels, the "
                                 f"others have {R} and {channels}; nnU-Net needs one label set")
            R, channels, C = masks.shape[0], image.shape[0], item.get("num_structures")
            source = ds.image_path(i) if hasattr(ds, "image_path") else None
            like = source if source is not None and file_format(source) == "nifti" else None
            for c in range(channels):
                write_array(folder / images / f"{case}_{c:04d}.nii.gz", _volume(image[c]).astype(np.float32), like)
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
    meta = {
        "channel_names": {str(c): names.get(c, "CT" if channels == 1 else f"channel{c}") for c in range(channels)},
        "labels": ({"background": 0, **{f"k={k}": k for k in range(1, R + 1)}} if C is None else
                   {"background": 0, **{"k=" + "/".join(str(int(v)) for v in row): i
                                        for i, row in enumerate(joint_levels(C, R)) if i}}),
        "numTraining": n_train,
        "file_ending": ".nii.gz",
        "name": dataset_name,
        "description": f"orcal dataset {name!r}: the label is the number of raters (of {R}) who marked the voxel"
                       + ("" if C is None else f", per structure (of {C}), as one joint class"),
        "orcal": {"num_raters": R, "num_structures": C, "source": name, "task": task,
                  "options": {k: str(v) for k, v in options.items()}},
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset.json").write_text(json.dumps(meta, indent=1))
    (folder / "cases.json").write_text(json.dumps(cases, indent=1))
    return folder


def write_trainer_module(folder: str | os.PathLike) -> Path:
    """Write the module that lets nnU-Net find :class:`nnUNetTrainerORC` by name: point
    ``nnUNet_extTrainer`` at ``folder`` (for ``nnUNetv2_train`` and ``nnUNetv2_predict`` alike)."""
    path = Path(folder) / TRAINER_MODULE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('"""nnU-Net trainers of orcal: found by class name through nnUNet_extTrainer."""\n\n'
                    "from orcal.nnunet import nnUNetTrainerORC  # noqa: F401\n")
    return path


def _readouts_of_levels(q: torch.Tensor, num_raters: int, majority: int | None) -> dict[str, torch.Tensor]:
    """Both readouts and ``E[k]`` of level probabilities ``q (R+1, *S)``. The readouts of SPEC §2 take logits:
    ``log q`` are logits whose softmax is ``q``."""
    from orcal import reference

    logits = torch.log(q.double().clamp_min(1e-12))[None]
    m = reference.majority_threshold(num_raters, majority)
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
    try:
        meta = json.loads(path.read_text()).get("orcal") or {}
        C = meta.get("num_structures")
        return None if C is None else (int(C), int(meta["num_raters"]))
    except (ValueError, TypeError, KeyError, AttributeError) as err:  # damaged: name the file
        raise ValueError(f"{path}: a damaged dataset.json ({type(err).__name__}: {err})") from err


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
        readout ``P(k >= m) >= 0.5`` against ``k >= m``, which nnU-Net's checkpoint selection then tracks.
        """

        rps_weight: float = 1.0
        majority: int | None = None

        @property
        def num_structures(self) -> int | None:
            """``C`` of a dataset of several structures (joint classes), from its dataset.json."""
            C = (self.dataset_json.get("orcal") or {}).get("num_structures")
            return None if C is None else int(C)

        @property
        def num_raters(self) -> int:
            labels = sorted(int(v) for v in self.label_manager.all_labels)
            if self.label_manager.has_regions or labels != list(range(len(labels))) or len(labels) < 2:
                raise ValueError(f"nnUNetTrainerORC needs the labels 0..R (vote counts), got {labels}; convert the "
                                 "data with orcal nnunet convert")
            if self.num_structures is None:
                return len(labels) - 1
            R = int(self.dataset_json["orcal"]["num_raters"])
            if len(labels) != len(joint_levels(self.num_structures, R)):
                raise ValueError(f"{len(labels)} labels are not the joint vote counts of {self.num_structures} "
                                 f"structures and {R} raters; convert the data with orcal nnunet convert")
            return R

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
                R, C = self.num_raters, self.num_structures
                m = R // 2 + 1 if self.majority is None else int(self.majority)
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


def __getattr__(name: str):
    if name == "nnUNetTrainerORC":  # nnU-Net is imported only when the trainer is asked for
        cls = _trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module 'orcal.nnunet' has no attribute {name!r}")
