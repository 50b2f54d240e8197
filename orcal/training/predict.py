"""Prediction: whole images in 2D, blended sliding windows in 3D, probabilities of either head, and the
files ``orcal predict`` writes."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from orcal.heads import EXPECTED_K, Head
from orcal.models import as_tuple, probability
from orcal.training.config import AMP_MODES, TrainResult
from orcal.training.runtime import autocast, resolve_device


def infer_logits(model: nn.Module, image: torch.Tensor, spatial_dims: int, patch_size: tuple[int, ...] | None,
                  overlap: float, amp: str, device: torch.device, sw_batch: int = 2) -> torch.Tensor:
    """Logits for whole images: one forward pass in 2D (and small 3D), blended sliding windows in 3D."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        with autocast(amp, device):
            return model(x).float()

    needs_window = spatial_dims == 3 and patch_size is not None and \
        any(n > s for n, s in zip(image.shape[2:], patch_size))
    if not needs_window:
        return forward(image)
    from orcal.data.transforms import sliding_window_inference

    return sliding_window_inference(image, forward, patch_size, overlap=overlap, batch_size=sw_batch)


def _resolve(model_or_result, head, majority, patch_size):
    """Model, head, majority and 3D patch size from a :class:`TrainResult` or a model's ``orcal_spec``."""
    if isinstance(model_or_result, TrainResult):
        res = model_or_result
        if patch_size is None and res.spatial_dims == 3:
            patch_size = res.config.patch_size
        return res.model, head or res.head, res.config.majority if majority is None else majority, patch_size
    if isinstance(model_or_result, nn.Module):
        spec = getattr(model_or_result, "orcal_spec", {})
        head = head or spec.get("head")
        if head is None:
            raise ValueError("head must be given ('ordinal' or 'binary') for a model without orcal_spec")
        return model_or_result, head, spec.get("majority") if majority is None else majority, patch_size
    raise TypeError(f"model_or_result must be an nn.Module or a TrainResult, got {type(model_or_result).__name__}")


def raters_of(model_or_result) -> int | None:
    """``R`` of a model's ordinal head (its ``orcal_spec`` or :class:`TrainResult`), None where unknown."""
    if isinstance(model_or_result, TrainResult):
        return model_or_result.num_raters
    return getattr(model_or_result, "orcal_spec", {}).get("num_raters")


def structures_of(model_or_result) -> int | None:
    """``C`` of a model trained on several structures (SPEC §11), None for one."""
    if isinstance(model_or_result, TrainResult):
        return model_or_result.num_structures
    return getattr(model_or_result, "orcal_spec", {}).get("num_structures")


def _batches(dataset: Dataset, batch_size: int, progress: bool) -> Iterator[list[dict]]:
    """Items in runs of at most ``batch_size`` with one image and mask shape; 3D volumes one at a time."""
    it: Any = range(len(dataset))
    if progress:
        from orcal._progress import progress_bar

        it = progress_bar(it, desc="predict", unit="image")
    batch: list[dict] = []
    for i in it:
        item = dict(dataset[i])
        item.setdefault("id", i)
        if batch and (item["image"].shape != batch[0]["image"].shape or item["masks"].shape != batch[0]["masks"].shape
                      or item["masks"].ndim == 4):
            yield batch
            batch = []
        batch.append(item)
        if len(batch) == batch_size or item["masks"].ndim == 4:
            yield batch
            batch = []
    if batch:
        yield batch


def predict_logits(model_or_result: nn.Module | TrainResult, dataset: Dataset, device: str | torch.device = "auto",
                   patch_size: int | Sequence[int] | None = None, batch_size: int = 2, overlap: float = 0.5,
                   amp: str = "auto", progress: bool = False
                   ) -> Iterator[tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """The network's logits for every item of ``dataset``, a batch at a time.

    2D images of one shape go ``batch_size`` per forward pass; 3D volumes one at a time through blended
    sliding windows of ``patch_size`` (default: the training patch), ``batch_size`` tiles per pass. Arguments
    as :func:`predict`.

    Yields:
        ``(ids, logits (B, C, *S) float32 on the device, masks (B, R, *S) uint8, valid (B, *S) bool or None)``.
    """
    model, _, _, patch_size = _resolve(model_or_result, "any", None, patch_size)
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {AMP_MODES}, got {amp!r}")
    dev = resolve_device(device)
    model.to(dev).eval()
    for items in _batches(dataset, batch_size, progress):
        masks = torch.stack([it["masks"] for it in items])
        spatial_dims = masks.ndim - 2
        patch = as_tuple(patch_size, spatial_dims) if spatial_dims == 3 else None
        images = torch.stack([it["image"] for it in items]).to(dev)
        with torch.no_grad():
            logits = infer_logits(model, images, spatial_dims, patch, overlap, amp, dev, sw_batch=batch_size)
        valid = None
        if any(it.get("valid") is not None for it in items):
            valid = torch.stack([it["valid"] if it.get("valid") is not None
                                 else torch.ones(it["masks"].shape[1:], dtype=torch.bool) for it in items]).bool()
        yield [str(it["id"]) for it in items], logits, masks, valid


def predict_readouts(model_or_result: nn.Module | TrainResult, dataset: Dataset,
                     readouts: Sequence[str] = ("majority",), head: str | None = None, majority: int | None = None,
                     device: str | torch.device = "auto", patch_size: int | Sequence[int] | None = None,
                     batch_size: int = 2, overlap: float = 0.5, amp: str = "auto", progress: bool = False
                     ) -> Iterator[tuple[list[str], dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None]]:
    """Foreground probabilities of every item of ``dataset`` for several readouts from one forward pass
    (:func:`predict_logits`; arguments as :func:`predict`).

    Yields:
        ``(ids, {readout: p (B, *S) float32 on the CPU}, masks (B, R, *S) uint8, valid (B, *S) bool or None)``;
        ``p`` is ``(B, C, *S)`` and ``masks`` are rater label maps for a model of several structures.
    """
    _, head, majority, _ = _resolve(model_or_result, head, majority, patch_size)
    C = structures_of(model_or_result)
    for ids, logits, masks, valid in predict_logits(model_or_result, dataset, device, patch_size, batch_size,
                                                    overlap, amp, progress):
        probs = {r: probability(logits, head, readout=r, majority=Head(head).op_majority(r, majority),
                               num_structures=C).float().cpu() for r in readouts}
        yield ids, probs, masks, valid


def predict(model_or_result: nn.Module | TrainResult, dataset: Dataset, head: str | None = None,
            readout: str = "majority", majority: int | None = None, device: str | torch.device = "auto",
            patch_size: int | Sequence[int] | None = None, batch_size: int = 2, overlap: float = 0.5,
            amp: str = "auto", progress: bool = False
            ) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Foreground probabilities for every item of ``dataset``, yielded one image at a time.

    Args:
        model_or_result: a :class:`TrainResult` (head, majority and 3D patch size taken from it) or a model.
        dataset: items ``{"image", "masks", "id"[, "valid"]}``.
        head: ``"ordinal"`` or ``"binary"``; default from the result or ``model.orcal_spec``.
        readout: ``"majority"`` or ``"expected"`` (ordinal head).
        majority: majority threshold of the readout; default the training run's (``R // 2 + 1``).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...; the model is moved there.
        patch_size: sliding-window tile size for 3D (default: the training patch size); 2D images go
            through whole.
        batch_size: 2D images, or 3D sliding-window tiles, per forward pass.
        overlap: sliding-window overlap.
        amp: ``"auto"`` (bfloat16 on CUDA), ``"bf16"`` or ``"off"``.

    Yields:
        ``(id, p, masks, valid)``: ``p`` ``(*S)`` float32 on the CPU, ``masks`` ``(R, *S)`` uint8, ``valid``
        ``(*S)`` bool or None.
    """
    for ids, probs, masks, valid in predict_readouts(model_or_result, dataset, (readout,), head, majority, device,
                                                     patch_size, batch_size, overlap, amp, progress):
        for j, ident in enumerate(ids):
            yield ident, probs[readout][j], masks[j], None if valid is None else valid[j]


#: Output formats of :func:`write_predictions` (PNG: 2D only, probabilities as 0..255).
WRITE_FORMATS = {"nii.gz": ".nii.gz", "nii": ".nii", "npy": ".npy", "png": ".png"}


def _conformal_masks(conformal: dict | None, readout: str | None, readouts: Sequence[str], C: int | None) -> dict:
    """``{folder name: (readout, probs -> mask)}`` of the conformal masks to write beside the maps."""
    from orcal.metrics import ConformalVoxelSets
    from orcal.metrics.conformal_sets import masks_from_probabilities

    if not conformal:
        return {}
    if readout is None:
        if len(readouts) != 1:
            raise ValueError(f"--conformal-readout: say which of the readouts {', '.join(readouts)} the conformal "
                             "calibrators were fitted on")
        readout = readouts[0]
    if readout not in readouts:
        raise ValueError(f"--conformal-readout: {readout!r} is not among the readouts written ({', '.join(readouts)})")
    out = {}
    for name, cal in conformal.items():
        if not masks_from_probabilities(cal) or cal.thresholds is None:
            continue  # volume intervals, level sets (they read level probabilities) or never fitted: no mask
        if cal.num_structures != C:
            raise ValueError(f"--conformal: calibrator {name!r} has num_structures={cal.num_structures}, the model "
                             f"{C}; fit it on this model's maps of every structure (or a binary model's map)")
        if isinstance(cal, ConformalVoxelSets):
            out[f"{readout}_uncertain"] = (readout, lambda p, c=cal: c.predict(p).uncertain)
        else:
            out[f"{readout}_conformal"] = (readout, cal.predict)
    if not out:
        raise ValueError("--conformal: the file holds no fitted ConformalRiskControl or ConformalVoxelSets")
    return out


def write_predictions(model_or_result: nn.Module | TrainResult, dataset: Dataset, out_dir: str | os.PathLike,
                      readouts: Sequence[str] | None = None, fmt: str | None = None,
                      device: str | torch.device = "auto",
                      patch_size: int | Sequence[int] | None = None, batch_size: int = 2, overlap: float = 0.5,
                      amp: str = "auto", progress: bool = True, conformal: dict | None = None,
                      conformal_readout: str | None = None) -> dict[str, Path]:
    """Write every item's foreground probability, one file per case and readout, as ``orcal evaluate`` reads
    them: ``OUT/<readout>/<case><ext>``; for an ordinal head also ``OUT/expected_k/<case><ext>``, the predicted
    number of raters ``E[k]`` (float32). A model of several structures writes each structure ``c`` under
    ``OUT/<readout>/structure<c>/`` (structure ``c`` is the ``c``-th label the loader read: score it with
    ``orcal evaluate`` and that label's ``--label`` or ``--task``).

    With ``conformal`` (the fitted calibrators of :func:`orcal.metrics.load_conformal`, SPEC §12), the map of
    ``conformal_readout`` also gives uint8 masks (0/1; 0/255 in PNG): ``OUT/<readout>_conformal/``, the voxels
    ``p >= lambda`` of a ``ConformalRiskControl``, and ``OUT/<readout>_uncertain/``, the voxels whose
    ``ConformalVoxelSets`` set holds both labels.

    Args:
        readouts: default every readout of the head (:attr:`orcal.heads.Head.readouts`: ``majority`` and
            ``expected`` for an ordinal head, SPEC §2; ``sigmoid`` for a binary one).
        fmt: ``"nii.gz"``, ``"nii"``, ``"npy"`` or ``"png"``; default NIfTI where the dataset says an item came
            from a NIfTI file (``dataset.image_path(i)``; its affine and spacing are kept), else ``.npy``.
        conformal, conformal_readout: calibrators ``{name: calibrator}`` and the readout they were fitted on
            (default: the only readout written).
        other arguments: as :func:`predict`.

    Returns:
        ``{folder name: folder}`` of the folders written.
    """
    from orcal.io import file_format, write_array

    _, kind, majority, _ = _resolve(model_or_result, None, None, patch_size)
    C = structures_of(model_or_result)
    head = Head(kind, num_raters=raters_of(model_or_result) if kind == "ordinal" else None, num_structures=C or 1)
    readouts = head.readouts if readouts is None else tuple(head.readout(r) for r in readouts)
    if fmt is not None and fmt not in WRITE_FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(WRITE_FORMATS)}, got {fmt!r}")
    out = Path(out_dir)
    ids = getattr(dataset, "ids", None) or [str(dataset[i].get("id", i)) for i in range(len(dataset))]
    sources = {str(c): getattr(dataset, "image_path", lambda i: None)(i) for i, c in enumerate(ids)}
    names = (*readouts, EXPECTED_K) if EXPECTED_K in head.maps else readouts
    masks = _conformal_masks(conformal, None if conformal_readout is None else head.readout(conformal_readout),
                             readouts, C)
    names = (*names, *masks)
    folders = {name: out / name for name in names}
    if C is not None:
        folders = {f"{name}/structure{c}": out / name / f"structure{c}" for name in names for c in range(1, C + 1)}
    for batch_ids, logits, _, _ in predict_logits(model_or_result, dataset, device, patch_size, batch_size,
                                                      overlap, amp, progress):
        maps = {r: probability(logits, kind, head.op_readout(r), head.op_majority(r, majority),
                               num_structures=C).float().cpu() for r in readouts}
        if EXPECTED_K in names:
            R = logits.shape[1] // (C or 1) - 1
            maps[EXPECTED_K] = probability(logits, kind, "expected", num_structures=C).float().cpu() * R
        for name, (readout, make) in masks.items():
            maps[name] = make(maps[readout]).to(torch.uint8)
        if C is not None:  # (B, C, *S): one map per structure
            maps = {f"{name}/structure{c + 1}": m[:, c] for name, m in maps.items() for c in range(C)}
        for name, m in maps.items():  # NaN would be written as 0 in 8-bit files, and scored as a confident 0
            bad = ~torch.isfinite(m)
            if bad.any():
                case = batch_ids[int(bad.flatten(1).any(1).nonzero()[0])]
                raise ValueError(f"case {case}: the model gives {int(bad.sum())} NaN or infinite values in its "
                                 f"{name} map (a damaged checkpoint, or NaN in the input); nothing written for it")
        for j, case in enumerate(batch_ids):
            like = sources.get(case)
            like = like if like is not None and file_format(like) == "nifti" else None
            ext = WRITE_FORMATS[fmt] if fmt else (".nii.gz" if like is not None else ".npy")
            for name, m in maps.items():
                arr = m[j].numpy()
                if ext == ".png":
                    if arr.ndim != 2:
                        raise ValueError(f"PNG output needs 2D images, case {case} is {arr.ndim}D; use nii.gz or npy")
                    if name.startswith(EXPECTED_K):  # not a probability: kept exact
                        write_array(folders[name] / f"{case}.npy", arr)
                        continue
                    arr = np.rint(arr * 255.0).astype(np.uint8)
                write_array(folders[name] / f"{case}{ext}", arr, like=like)
    return folders
