"""Foreground-probability maps of what ``nnUNetv2_predict --save_probabilities`` writes
(:func:`export_probabilities`), in the layout ``orcal evaluate --pred`` reads."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from orcal.heads import EXPECTED_K, Head
from orcal.integrations.nnunet.convert import read_orcal_meta
from orcal.integrations.nnunet.levels import joint_levels, marginal_matrix

#: What nnU-Net's levels give: an ordinal head's readouts and E[k].
ORDINAL = Head("ordinal")


def _readouts_of_levels(q: torch.Tensor, num_raters: int, majority: int | None) -> dict[str, torch.Tensor]:
    """The readouts and ``E[k]`` of level probabilities ``q (R+1, *S)``. The readouts of SPEC §2 take logits:
    ``log q`` are logits whose softmax is ``q``."""
    from orcal import ops
    from orcal.ops import reference

    logits = torch.log(q.double().clamp_min(1e-12))[None]
    m = ops.check_majority(num_raters, majority)  # 1..R, or the strict majority
    readouts = Head("ordinal", num_raters=num_raters).readouts  # the half-tie readout where R is even
    maps = {r: reference.foreground_probability(logits, r, m)[0] for r in readouts}  # float64
    return {**{r: p.float() for r, p in maps.items()}, EXPECTED_K: (maps["expected"] * num_raters).float()}


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
    ``out_dir/majority/<case>.nii.gz``, ``out_dir/expected/<case>.nii.gz``, ``out_dir/expected_k/<case>.nii.gz``
    and, for even ``R``, ``out_dir/half_tie/<case>.nii.gz``, with the geometry of nnU-Net's ``<case>.nii.gz``
    beside it. For several structures (the softmax over the joint classes; ``dataset.json`` says so) each
    structure's marginal levels give its maps, under ``out_dir/<readout>/structure<c>/``. Returns
    ``{folder name: folder}``.
    """
    import SimpleITK as sitk

    pred = Path(pred_dir)
    files = sorted(pred.glob("*.npz"))
    if not files:
        raise FileNotFoundError(f"{pred}: no <case>.npz; run nnUNetv2_predict with --save_probabilities")
    joint = _structures_of_prediction(pred)
    if majority is not None and joint is not None:
        from orcal.ops.checks import check_int

        check_int(f"majority (with R = {joint[1]} raters)", majority, 1, joint[1])
    names = ORDINAL.maps
    if joint is None:
        folders = {r: Path(out_dir) / r for r in names}
    else:
        folders = {f"{r}/structure{c}": Path(out_dir) / r / f"structure{c}" for r in names
                   for c in range(1, joint[0] + 1)}
    written: set[str] = set()
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
            folders[name].mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(img, str(folders[name] / f"{case}.nii.gz"))
            written.add(name)
    return {name: f for name, f in folders.items() if name in written}  # the half-tie maps only where R is even
