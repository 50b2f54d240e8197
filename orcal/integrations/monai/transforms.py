"""MONAI dictionary transforms for multi-rater data.

- :class:`StackRatersd`: several raters' label maps ``(1, *S)`` (as ``LoadImaged(ensure_channel_first=True)``
  gives them) → one ``(R, *S)`` uint8 rater stack of a label, plus their union ``(1, *S)`` for
  ``RandCropByPosNegLabeld(label_key="union")``.
- :class:`ORCTargetd`: the rater stack → the vote count ``k`` ``(1, *S)`` uint8, the target of
  :class:`orcal.OrdinalLoss`.
- :class:`ORCReadoutd`: ordinal logits → foreground probability maps of a readout.

MetaTensors keep their metadata through the transforms.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

try:
    from monai.config import KeysCollection
    from monai.data import MetaTensor
    from monai.transforms import MapTransform
    from monai.utils import TransformBackends
except ImportError as err:  # an optional extra: say how to get it
    raise ImportError('orcal.integrations.monai needs MONAI: pip install "orcal[monai]"') from err

from orcal import ops
from orcal.heads import EXPECTED_K
from orcal.metrics.batch_stats import check_raters, warn_if_post_processed
from orcal.ops.checks import integer_range
from orcal.ops.masks import check_structures
from orcal.ops.structures import check_labels

__all__ = ["ORCReadoutd", "ORCTargetd", "StackRatersd"]

#: How far two raters' affines may differ (in the affine's units, mm) and still describe the same grid.
AFFINE_ATOL = 1e-4


def _as_tensor(value: Any, where: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.as_tensor(value)
    raise TypeError(f"{where} must be a tensor or numpy array, got {type(value).__name__}")


def _affine(x: torch.Tensor) -> torch.Tensor | None:
    meta = getattr(x, "meta", None)
    affine = None if meta is None else meta.get("affine")
    return None if affine is None else torch.as_tensor(affine, dtype=torch.float64)


def _check_one_label(x: torch.Tensor, where: str) -> None:
    """Refuse a label map with several non-zero labels where one structure is assumed (say which one)."""
    x = ops.plain_tensor(x)
    found = x[x != 0]
    if found.numel() and bool(found.min() != found.max()):
        labels = [int(v) if float(v).is_integer() else float(v) for v in torch.unique(found)[:8].tolist()]
        raise ValueError(f"{where} holds several labels {labels}, where one structure is assumed: say which: "
                         f"StackRatersd(label={labels[0]}) for one, label={labels} for their union as one "
                         f"structure, or structures={labels} with ORCTargetd(num_structures={len(labels)}) for one "
                         "vote count per structure")


class StackRatersd(MapTransform):
    """Stack several raters' label maps into one ``(R, *S)`` uint8 rater stack of one label.

    Args:
        keys: the raters' keys, in rater order; each holds a channel-first label map ``(1, *S)`` of any dtype.
        name: key of the stack ``(R, *S)`` (1 where the rater gave the voxel the label).
        label: which label is the structure: None (the one non-zero label of binary maps; maps holding several
            labels are refused, since one structure is assumed), an int, or a sequence of ints (a voxel with
            any of them: ``label=[1, 2, 3]`` asks for their union explicitly).
        structures: several structures at once (SPEC §11), instead of ``label``: the labels to keep, in
            order; the stack then holds rater label maps, the voxels of ``structures[i]`` labelled ``i + 1``
            and the rest 0 (so ``ORCTargetd(num_structures=len(structures))`` gives ``k`` ``(C, *S)``).
        union_key: key of the union of the raters ``(1, *S)`` uint8 (1 where any rater marked the voxel), for
            ``RandCropByPosNegLabeld(label_key=union_key)``; None: not written.
        allow_missing_keys: skip absent keys (MONAI's convention); at least one must be present. ``R`` is then
            the number of raters present, in the order of ``keys``.

    The stack keeps the first rater's MetaTensor metadata. Raters must share the shape and, for MetaTensors,
    the affine (within :data:`AFFINE_ATOL`). Crop the stack (or ``k``) with the image and delete what is left
    at full size (the raters' maps, the union) before batching: ``DeleteItemsd``.
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, keys: KeysCollection, name: str = "masks", label: int | Sequence[int] | None = None,
                 union_key: str | None = "union", allow_missing_keys: bool = False,
                 structures: Sequence[int] | None = None) -> None:
        super().__init__(keys, allow_missing_keys)
        if structures is not None:
            if label is not None:
                raise ValueError("StackRatersd: give label (one structure) or structures (several), not both")
            structures = list(check_structures(structures, "StackRatersd: structures"))
        self.structures = structures
        if not isinstance(name, str) or not name:
            raise ValueError(f"StackRatersd: name must be a non-empty key, got {name!r}")
        if union_key is not None and (not isinstance(union_key, str) or union_key == name):
            raise ValueError(f"StackRatersd: union_key must be a key other than name={name!r}, got {union_key!r}")
        if label is not None:
            labels = [label] if isinstance(label, int | np.integer) else label if isinstance(label, Sequence) else []
            if not labels or not all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in labels):
                raise TypeError(f"StackRatersd: label must be None, an int or a sequence of ints, got {label!r}")
            label = [int(v) for v in labels]
        self.name, self.label, self.union_key = name, label, union_key

    def _select(self, x: torch.Tensor) -> torch.Tensor:
        if self.structures is not None:  # labels are distinct, so a voxel matches one at most
            out = (x == self.structures[0]).to(torch.uint8)  # derived from x: a MetaTensor keeps its metadata
            for i, value in enumerate(self.structures[1:], start=2):
                out = out + (x == value).to(torch.uint8) * i
            return out
        if self.label is None:
            return x != 0  # binary maps only: __call__ refused several labels
        selected = x == self.label[0]  # a label the dtype cannot hold matches nothing (no overflow)
        for value in self.label[1:]:
            selected = selected | (x == value)
        return selected

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        present = list(self.key_iterator(d))
        if not present:
            raise KeyError(f"StackRatersd: none of the rater keys {list(self.keys)} is in the data "
                           f"(keys: {list(d)})")
        maps = [_as_tensor(d[key], f"StackRatersd: data[{key!r}]") for key in present]
        first, first_key = maps[0], present[0]
        for key, x in zip(present, maps):
            if x.ndim < 3 or x.shape[0] != 1:
                raise ValueError(f"StackRatersd: data[{key!r}] must be a channel-first label map (1, *S), got "
                                 f"shape {tuple(x.shape)}; load it with LoadImaged(..., ensure_channel_first=True)")
            if x.shape != first.shape:
                raise ValueError(f"StackRatersd: raters {first_key!r} and {key!r} have different shapes "
                                 f"{tuple(first.shape)} and {tuple(x.shape)}")
            if x.is_floating_point():  # NaN would be a vote, 1.5 (interpolated) a label invented
                ops.integer_valued(ops.plain_tensor(x), f"StackRatersd: data[{key!r}]", "label map", -32768, 32767)
            a, b = _affine(first), _affine(x)
            if a is not None and b is not None and not torch.allclose(a, b, atol=AFFINE_ATOL, rtol=0):
                raise ValueError(f"StackRatersd: raters {first_key!r} and {key!r} have different affines (the "
                                 f"label maps are on different grids; resample one onto the other first):\n"
                                 f"{a.numpy()}\nvs\n{b.numpy()}")
        if self.label is None and self.structures is None:
            for key, x in zip(present, maps):
                _check_one_label(x, f"StackRatersd: data[{key!r}]")
        # torch ops on MetaTensors keep the first operand's metadata
        stack = torch.cat([self._select(x) for x in maps], dim=0).to(torch.uint8)
        d[self.name] = stack
        if self.union_key is not None:
            d[self.union_key] = (stack.amax(dim=0, keepdim=True) > 0).to(torch.uint8)
        return d


class ORCTargetd(MapTransform):
    """The ORC target: the vote count ``k`` ``(1, *S)`` uint8 of a rater stack ``(R, *S)`` (SPEC §1).

    Args:
        keys: keys of rater stacks ``(R, *S)`` (as :class:`StackRatersd` writes them), values 0/1 (a float
            stack holding integers, as MONAI's resampling leaves it, too).
        name: output key, or one per key (default ``"k"``).
        allow_missing_keys: skip absent keys.
        num_structures: several structures (SPEC §11): the stacks hold rater label maps 0..C and ``k`` is
            ``(C, *S)``, one vote count per structure (the loss and metrics then see ``(B, C, *S)``). Without
            it a stack holding labels above 1 (several structures) is refused: say ``num_structures``, or pick
            one structure with ``StackRatersd(label=...)``.
        num_raters: the number of raters ``R`` the stack must hold (checked; None: any).
        union_key: also write, under this key, the voxels any rater gave any structure ``(1, *S)`` uint8: the
            ``label_key`` for ``RandCropByPosNegLabeld``, which reads a label of several channels as one-hot and
            drops channel 0 as background, so cropping on ``k`` ``(C, *S)`` never centres on structure 1.
        num_classes: deprecated name of ``num_structures`` (warns; removed in the next release).
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, keys: KeysCollection = "masks", name: str | Sequence[str] = "k",
                 allow_missing_keys: bool = False, num_structures: int | None = None, num_raters: int | None = None,
                 union_key: str | None = None, *, num_classes: int | None = None) -> None:
        super().__init__(keys, allow_missing_keys)
        num_structures = ops.renamed("num_structures", num_structures, "num_classes", num_classes, "ORCTargetd")
        self.num_structures = None if num_structures is None else \
            ops.check_int("num_structures", num_structures, 1, 255)
        self.num_raters = check_raters(None, num_raters)
        names = [name] if isinstance(name, str) else list(name)
        if len(names) != len(self.keys):
            raise ValueError(f"ORCTargetd: {len(self.keys)} keys need as many names, got {names}")
        self.names = dict(zip(self.keys, names))
        if union_key is not None and (not isinstance(union_key, str) or union_key in names or len(names) != 1):
            raise ValueError(f"ORCTargetd: union_key must be a key other than name, with one input key; got "
                             f"union_key={union_key!r}, name={name!r}")
        self.union_key = union_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            where = f"ORCTargetd: data[{key!r}]"
            masks = _as_tensor(d[key], where)
            if masks.ndim < 3:
                raise ValueError(f"{where} must be a rater stack (R, *S), got shape {tuple(masks.shape)}")
            if masks.shape[0] > ops.MAX_RATERS:
                raise ValueError(f"{where} has {masks.shape[0]} raters; at most {ops.MAX_RATERS} fit a uint8 "
                                 "vote count")
            if self.num_raters is not None and masks.shape[0] != self.num_raters:
                raise ValueError(f"{where} holds {masks.shape[0]} raters (channels), but num_raters = "
                                 f"{self.num_raters}")
            top = self.num_structures or 1
            if masks.is_floating_point():  # torch ops on the MetaTensor keep its metadata
                ops.integer_valued(ops.plain_tensor(masks), where, "rater stack", 0, 255)
                masks = masks.round().to(torch.uint8)
            lo, hi = (int(v) for v in integer_range(ops.plain_tensor(masks))) if masks.numel() else (0, 0)
            if lo < 0:
                raise ValueError(f"{where} must hold 0/1 masks or labels 0..C, found {lo}")
            if hi > top:
                said = "no num_structures" if self.num_structures is None else f"num_structures={self.num_structures}"
                raise ValueError(f"{where} holds labels up to {hi}: rater label maps of several structures, but "
                                 f"{said} counts labels 1..{top} only; pass num_structures={hi} for one vote count per "
                                 "structure, or select one structure with StackRatersd(label=...)")
            if self.num_structures is None:
                k = (masks != 0).sum(dim=0, keepdim=True, dtype=torch.uint8)
            else:
                C = check_labels(ops.plain_tensor(masks)[None], self.num_structures, where)
                k = torch.stack([(masks == c).sum(dim=0, dtype=torch.uint8) for c in range(1, C + 1)])
            d[self.names[key]] = k
            if self.union_key is not None:
                d[self.union_key] = (k.amax(dim=0, keepdim=True) > 0).to(torch.uint8)
        return d


class ORCReadoutd(MapTransform):
    """Ordinal logits ``(R+1, *S)`` (one image, channel-first, as MONAI's post transforms and image
    handlers see it) → a map to look at: the foreground probability ``(1, *S)`` or the expected vote count.

    TensorBoard image handlers and ``plot_2d_or_3d_image`` show channel 0 of what they get, which for the raw
    ordinal head is the level-0 logit; give them this transform's output instead.

    Args:
        keys: keys of ordinal logits ``(R+1, *S)`` (``(C * (R+1), *S)`` with ``num_structures``).
        readout: ``"majority"`` (probability that at least ``majority`` raters vote foreground), ``"expected"``
            (expected fraction of raters voting foreground, in [0, 1]), ``"half_tie"`` (a tie of ``R/2`` votes
            counted half, SPEC §2) or ``"expected_k"`` (expected vote count ``E[k]`` in [0, R]), as
            ``orcal nnunet export`` names its maps.
        name: output key, or one per key; None: replace the logits.
        majority: majority threshold of the ``"majority"`` readout; default ``R // 2 + 1``.
        num_structures: ``C`` structures (SPEC §11): the output is ``(C, *S)``.
        allow_missing_keys: skip absent keys.

    A ``MetaTensor`` input gives a ``MetaTensor`` with its metadata (affine included), so the map can be saved
    with ``SaveImaged``.
    """

    backend = [TransformBackends.TORCH]
    READOUTS = (*ops.READOUTS, EXPECTED_K)

    def __init__(self, keys: KeysCollection = "pred", readout: str = "expected",
                 name: str | Sequence[str] | None = None, majority: int | None = None,
                 num_structures: int | None = None, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        ops.check_choice("readout", readout, self.READOUTS)
        self.readout = readout
        self.majority = None if majority is None else ops.check_int("majority", majority, 1, ops.MAX_RATERS)
        if readout == "half_tie":
            ops.check_no_majority(readout, majority)
        self.num_structures = None if num_structures is None else ops.check_int("num_structures", num_structures, 1)
        names = list(self.keys) if name is None else [name] if isinstance(name, str) else list(name)
        if len(names) != len(self.keys):
            raise ValueError(f"ORCReadoutd: {len(self.keys)} keys need as many names, got {names}")
        self.names = dict(zip(self.keys, names))

    def readout_map(self, logits: torch.Tensor) -> torch.Tensor:
        """One image's logits ``(C * (R+1), *S)`` → its map ``(C, *S)`` (float, the logits' dtype)."""
        x = ops.plain_tensor(logits)
        warn_if_post_processed(x, "ordinal", "ORCReadoutd's input")
        readout = "expected" if self.readout == EXPECTED_K else self.readout
        with torch.no_grad():
            p = ops.foreground_probability(x[None].detach(), readout, self.majority,
                                           num_structures=self.num_structures)
        p = p[0] if self.num_structures else p  # (C, *S), or (1, *S) for one structure
        if self.readout == EXPECTED_K:
            p = p * (x.shape[0] // (self.num_structures or 1) - 1)
        if isinstance(logits, MetaTensor):
            p = MetaTensor(p, meta=logits.meta, applied_operations=logits.applied_operations)
        return p

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            x = _as_tensor(d[key], f"ORCReadoutd: data[{key!r}]")
            if x.ndim < 3:
                raise ValueError(f"ORCReadoutd: data[{key!r}] must be one image's ordinal logits (R+1, *S), got "
                                 f"shape {tuple(x.shape)}; decollate a batch first (decollate_batch)")
            d[self.names[key]] = self.readout_map(x)
        return d

