"""MONAI building blocks for multi-rater data (``pip install "orcal[monai]"``).

- :class:`StackRatersd`: several raters' label maps ``(1, *S)`` (as ``LoadImaged(ensure_channel_first=True)``
  gives them) → one ``(R, *S)`` uint8 rater stack of a label, plus their union ``(1, *S)`` for
  ``RandCropByPosNegLabeld(label_key="union")``.
- :class:`ORCTargetd`: the rater stack → the vote count ``k`` ``(1, *S)`` uint8, the target of
  :class:`orcal.OrdinalLoss`.
- :class:`MultiRaterCalibrationMetric`: a ``monai.metrics.CumulativeIterationMetric`` over orcal's
  statistics (``metric(y_pred, y)`` on batches or decollated lists, ``aggregate()``, ``reset()``, MONAI's
  gather across ranks), equal to :class:`orcal.metrics.MultiRaterCalibration` on the same data.
- :class:`MultiRaterCalibrationHandler`: that metric as a MONAI/ignite engine handler (one value, e.g. the
  MR-ECE, for ``key_val_metric``).

MetaTensors keep their metadata through the transforms; the metric and :mod:`orcal.ops` read them as plain
tensors. See docs/integrations.md for a whole 3D loop.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

try:
    from monai.config import KeysCollection
    from monai.data import MetaTensor
    from monai.handlers import IgniteMetricHandler
    from monai.metrics import CumulativeIterationMetric
    from monai.transforms import MapTransform
    from monai.utils import TransformBackends
    from monai.utils.dist import evenly_divisible_all_gather
except ImportError as err:  # an optional extra: say how to get it
    raise ImportError('orcal.monai needs MONAI: pip install "orcal[monai]"') from err

from orcal import distributed, metric_table, ops
from orcal.batch_stats import batch_stats, check_options, check_raters, prepare, warn_if_post_processed
from orcal.metrics import summarize
from orcal.ops import bootstrap
from orcal.ops.checks import integer_range
from orcal.ops.masks import check_structures
from orcal.ops.structures import check_labels
from orcal.stats import CalibrationStats

__all__ = ["MultiRaterCalibrationHandler", "MultiRaterCalibrationMetric", "ORCReadoutd", "ORCTargetd", "StackRatersd",
           "metric_cmp_fn", "score_function"]

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
                         f"structure, or structures={labels} with ORCTargetd(num_classes={len(labels)}) for one "
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
            and the rest 0 (so ``ORCTargetd(num_classes=len(structures))`` gives ``k`` ``(C, *S)``).
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
        num_classes: several structures (SPEC §11): the stacks hold rater label maps 0..C and ``k`` is
            ``(C, *S)``, one vote count per structure (the loss and metrics then see ``(B, C, *S)``). Without
            it a stack holding labels above 1 (several structures) is refused: say ``num_classes``, or pick
            one structure with ``StackRatersd(label=...)``.
        num_raters: the number of raters ``R`` the stack must hold (checked; None: any).
        union_key: also write, under this key, the voxels any rater gave any structure ``(1, *S)`` uint8: the
            ``label_key`` for ``RandCropByPosNegLabeld``, which reads a label of several channels as one-hot and
            drops channel 0 as background, so cropping on ``k`` ``(C, *S)`` never centres on structure 1.
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, keys: KeysCollection = "masks", name: str | Sequence[str] = "k",
                 allow_missing_keys: bool = False, num_classes: int | None = None, num_raters: int | None = None,
                 union_key: str | None = None) -> None:
        super().__init__(keys, allow_missing_keys)
        self.num_classes = None if num_classes is None else ops.check_int("num_classes", num_classes, 1, 255)
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
            top = self.num_classes or 1
            if masks.is_floating_point():  # torch ops on the MetaTensor keep its metadata
                ops.integer_valued(ops.plain_tensor(masks), where, "rater stack", 0, 255)
                masks = masks.round().to(torch.uint8)
            lo, hi = (int(v) for v in integer_range(ops.plain_tensor(masks))) if masks.numel() else (0, 0)
            if lo < 0:
                raise ValueError(f"{where} must hold 0/1 masks or labels 0..C, found {lo}")
            if hi > top:
                said = "no num_classes" if self.num_classes is None else f"num_classes={self.num_classes}"
                raise ValueError(f"{where} holds labels up to {hi}: rater label maps of several structures, but "
                                 f"{said} counts labels 1..{top} only; pass num_classes={hi} for one vote count per "
                                 "structure, or select one structure with StackRatersd(label=...)")
            if self.num_classes is None:
                k = (masks != 0).sum(dim=0, keepdim=True, dtype=torch.uint8)
            else:
                check_labels(ops.plain_tensor(masks)[None], self.num_classes, where)
                k = torch.stack([(masks == c).sum(dim=0, dtype=torch.uint8) for c in range(1, self.num_classes + 1)])
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
            (expected fraction of raters voting foreground, in [0, 1]) or ``"expected_k"`` (expected vote count
            ``E[k]`` in [0, R]), as ``orcal nnunet export`` names its maps.
        name: output key, or one per key; None: replace the logits.
        majority: majority threshold of the ``"majority"`` readout; default ``R // 2 + 1``.
        num_structures: ``C`` structures (SPEC §11): the output is ``(C, *S)``.
        allow_missing_keys: skip absent keys.

    A ``MetaTensor`` input gives a ``MetaTensor`` with its metadata (affine included), so the map can be saved
    with ``SaveImaged``.
    """

    backend = [TransformBackends.TORCH]
    READOUTS = ("majority", "expected", "expected_k")

    def __init__(self, keys: KeysCollection = "pred", readout: str = "expected",
                 name: str | Sequence[str] | None = None, majority: int | None = None,
                 num_structures: int | None = None, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        ops.check_choice("readout", readout, self.READOUTS)
        self.readout = readout
        self.majority = None if majority is None else ops.check_int("majority", majority, 1, ops.MAX_RATERS)
        self.num_structures = None if num_structures is None else ops.check_int("num_structures", num_structures, 1)
        names = list(self.keys) if name is None else [name] if isinstance(name, str) else list(name)
        if len(names) != len(self.keys):
            raise ValueError(f"ORCReadoutd: {len(self.keys)} keys need as many names, got {names}")
        self.names = dict(zip(self.keys, names))

    def readout_map(self, logits: torch.Tensor) -> torch.Tensor:
        """One image's logits ``(C * (R+1), *S)`` → its map ``(C, *S)`` (float, the logits' dtype)."""
        x = ops.plain_tensor(logits)
        warn_if_post_processed(x, "ordinal", "ORCReadoutd's input")
        readout = "majority" if self.readout == "majority" else "expected"
        with torch.no_grad():
            p = ops.foreground_probability(x[None].detach(), readout, self.majority,
                                           num_structures=self.num_structures)
        p = p[0] if self.num_structures else p  # (C, *S), or (1, *S) for one structure
        if self.readout == "expected_k":
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


class MultiRaterCalibrationMetric(CumulativeIterationMetric):
    """MR-ECE, AUC, Brier, NLL and Dice over voxel–rater pairs, in MONAI's metric protocol.

    ``metric(y_pred, y)`` takes batch-first tensors or lists of channel-first ones (``decollate_batch``);
    each call adds one statistics row per image to MONAI's buffers, which ``aggregate()`` gathers across
    ranks (MONAI's ``Cumulative``) and pools into the dict of :meth:`orcal.metrics.MultiRaterCalibration.compute`
    (without the agreement table).

    ``aggregate()`` returns a **dict** of Python floats, not a tensor as MONAI's ``DiceMetric`` does:
    ``metric.aggregate()["mr_ece"]`` (or ``metric.aggregate("mr_ece")``), never ``.item()``. Lower MR-ECE is
    better: see :class:`MultiRaterCalibrationHandler` for the best-model and early-stopping handlers.

    Give it the network's raw output: a segmentation tutorial's ``Activations(sigmoid=True)`` /
    ``AsDiscrete(threshold=0.5)`` post-processing turns ordinal logits into 0/1 maps that still parse as
    logits (a warning says so); use :class:`ORCReadoutd` for what a person looks at.

    Args:
        kind: what ``y_pred`` holds: ``"prob"`` (probabilities ``(B, 1, *S)``), ``"logit"`` (binary logits) or
            ``"ordinal"`` (ordinal logits ``(B, R+1, *S)``).
        num_raters: None: ``y`` is the rater stack ``(B, R, *S)``; an int ``R``: ``y`` is the vote count
            ``k`` ``(B, 1, *S)`` (as :class:`ORCTargetd` writes it; uint8, or float32 holding integers as
            ``Spacingd(mode="nearest")`` leaves it).
        readout, majority, n_bins, auc_bins, backend: as :class:`orcal.metrics.MultiRaterCalibration`.
        num_structures: ``C`` structures at once (SPEC §11): ``y_pred`` ``(B, C, *S)`` or ordinal logits
            ``(B, C * (R+1), *S)``, ``y`` rater label maps ``(B, R, *S)`` or, with ``num_raters``, the vote
            counts ``(B, C, *S)`` of ``ORCTargetd(num_classes=C)``; :meth:`aggregate` adds
            ``"<metric>/macro"`` and ``"<metric>/<c>"``. Each image's buffer row holds its ``C`` rows.

    Keyword arguments of the call: ``valid`` (``(B, *S)`` bool, or one ``(*S)`` mask per image with lists), as
    in :meth:`orcal.metrics.MultiRaterCalibration.update`. Rows stay on the prediction's device (NCCL gathers
    them there); an empty batch adds nothing, and a rank that saw no image still joins the gather.
    """

    def __init__(self, kind: str = "prob", num_raters: int | None = None, readout: str = "majority",
                 majority: int | None = None, n_bins: int = 15, auc_bins: int = 4096,
                 backend: str = "auto", num_structures: int | None = None) -> None:
        super().__init__()
        self.n_bins, self.auc_bins, self.majority = check_options(n_bins, auc_bins, kind, readout, majority, backend)
        self.kind, self.readout, self.backend = kind, readout, backend
        self.num_raters = check_raters(None, num_raters)
        self.num_structures = None if num_structures is None else ops.check_int("num_structures", num_structures, 1)
        self._C = self.num_structures or 1

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None,  # type: ignore[override]
                        **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if y is None:
            raise ValueError("MultiRaterCalibrationMetric needs the raters: call metric(y_pred, y)")
        pred, target, valid = prepare(y_pred, y, kwargs.get("valid"), self.num_raters, self.kind, self.num_structures)
        st = batch_stats(pred, target, num_raters=self.num_raters, valid=valid, kind=self.kind,
                         readout=self.readout, majority=self.majority, n_bins=self.n_bins, auc_bins=self.auc_bins,
                         backend=self.backend, num_structures=self.num_structures)
        # one row per image, its structures side by side: MONAI's batch-first buffers
        return tuple(t.reshape(st.n_images, self._C * t.shape[1]) for t in st.pack())

    def _compute_list(self, y_pred, y=None, **kwargs: Any):  # type: ignore[override]
        if y is not None and len(y) != len(y_pred):  # MONAI zips the lists: the extra images would be dropped
            raise ValueError(f"MultiRaterCalibrationMetric: {len(y_pred)} predictions need as many targets, "
                             f"got {len(y)}")
        valid = kwargs.pop("valid", None)
        if valid is None:
            return super()._compute_list(y_pred, y, **kwargs)
        return self._per_image(y_pred, y, list(valid))  # a (B, *S) mask or a list of (*S) masks: one per image

    def _per_image(self, y_pred, y, valid):
        if y is None or len(valid) != len(y_pred) or len(y) != len(y_pred):
            raise ValueError(f"MultiRaterCalibrationMetric: {len(y_pred)} predictions need as many targets and "
                             f"valid masks, got {0 if y is None else len(y)} and {len(valid)}")
        rows = [self._compute_tensor(p[None], t[None], valid=v[None]) for p, t, v in zip(y_pred, y, valid)]
        return [torch.cat(part) for part in zip(*rows)]

    def extend(self, *data: Any) -> None:
        if data and isinstance(data[0], torch.Tensor) and data[0].shape[0] == 0:
            return  # an empty batch: no row (MONAI's buffers cannot hold a zero-row batch)
        super().extend(*data)

    def _sync(self) -> None:
        if self._buffers is None and not self._synced and distributed.world_size() > 1:
            # a rank that saw no image must still take part in the gather, or the others wait for it forever
            counts, sums = (t.new_zeros(0, t.shape[1] * self._C)
                            for t in CalibrationStats.empty(self.n_bins, self.auc_bins).pack())
            device = distributed.comm_device()
            self._synced_tensors = [evenly_divisible_all_gather(t.to(device), concat=True) for t in (counts, sums)]
            self._synced = True
            return
        super()._sync()

    def stats(self) -> CalibrationStats:
        """Per-image statistics of every call so far (gathered across ranks), for :func:`orcal.bootstrap`."""
        buffers = self.get_buffer()  # None before any row, else [counts, sums]
        if buffers is None:
            return CalibrationStats.empty(self.n_bins, self.auc_bins, num_structures=self._C)
        counts, sums = (b.cpu().reshape(b.shape[0] * self._C, -1) for b in buffers)
        return CalibrationStats.unpack(counts, sums, self.n_bins, self.auc_bins, self._C)

    def aggregate(self, key: str | None = None) -> Any:  # type: ignore[override]
        """The pooled metrics of every call so far, as a dict: ``mr_ece``, ``mr_ece_l2``, ``mr_mce``, ``auc``
        (binned), ``auc_error_bound``, ``brier``, ``nll``, ``dice`` (Python floats), ``bins``, ``n_pairs``,
        ``n_images`` (no agreement table or exact AUC: use :class:`orcal.metrics.MultiRaterCalibration` for
        those). With ``key``, that one entry (``aggregate("mr_ece")`` is ``aggregate()["mr_ece"]``).

        Raises:
            RuntimeError: nothing was accumulated.
        """
        st = self.stats()
        if st.n_images == 0:
            raise RuntimeError("MultiRaterCalibrationMetric.aggregate() called before any non-empty call")
        result = summarize(st, st.n_images)
        if key is None:
            return result
        ops.check_choice("key", key, tuple(result))
        return result[key]

    def bootstrap(self, n_boot: int = 1000, fraction: float = 0.6, seed: int = 0) -> dict[str, dict[str, float]]:
        """Bootstrap intervals over the images seen (SPEC §5)."""
        return bootstrap(self.stats(), n_boot=n_boot, fraction=fraction, seed=seed)


def score_function(metric_name: str, key: str = "mr_ece") -> Callable[[Any], float]:
    """A score for ignite's and MONAI's handlers that keep the *highest* score (``EarlyStopping``,
    ``Checkpoint``/``ModelCheckpoint``, MONAI's ``EarlyStopHandler``): ``engine.state.metrics[metric_name]``,
    negated when lower is better for ``key`` (MR-ECE, Brier, NLL; AUC and Dice are kept as they are).

    A Dice-era ``stopping_fn_from_metric(metric_name)`` reads MR-ECE the wrong way round: it stops while
    MR-ECE improves and keeps the worst checkpoint.

    Args:
        metric_name: the name the metric is attached under (the ``key_val_metric`` key, e.g. ``"val_mr_ece"``).
        key: the orcal metric it holds (:mod:`orcal.metric_table`), which says its direction.
    """
    ops.check_choice("key", key, metric_table.keys())
    sign = 1.0 if metric_table.higher_is_better(key) else -1.0

    def score(engine: Any) -> float:
        return sign * float(engine.state.metrics[metric_name])

    score.__name__ = f"score_{metric_name}"
    return score


def metric_cmp_fn(key: str = "mr_ece") -> Callable[[float, float], bool]:
    """``metric_cmp_fn`` for MONAI's engines (``SupervisedEvaluator(..., metric_cmp_fn=...)``), which otherwise
    take a larger key metric as better when they track ``engine.state.best_metric``: ``current < best`` when
    lower is better for ``key`` (MR-ECE, Brier, NLL), ``current > best`` otherwise."""
    ops.check_choice("key", key, metric_table.keys())
    return operator.gt if metric_table.higher_is_better(key) else operator.lt


class MultiRaterCalibrationHandler(IgniteMetricHandler):
    """:class:`MultiRaterCalibrationMetric` as a MONAI engine handler (``val_handlers``/``key_val_metric``):
    the engine's metric is one entry of the pooled result, by default the MR-ECE.

    **Lower MR-ECE is better**, where MONAI's and ignite's handlers keep the highest value unless told:
    give ``SupervisedEvaluator`` ``metric_cmp_fn=handler.metric_cmp_fn``, ``CheckpointSaver``
    ``key_metric_negative_sign=True``, and ignite's ``EarlyStopping`` / ``Checkpoint`` or MONAI's
    ``EarlyStopHandler`` ``score_function=handler.score_function`` (:attr:`higher_is_better` says the
    direction of ``key``).

    Args:
        key: which entry of :meth:`MultiRaterCalibrationMetric.aggregate` the handler reports.
        output_transform: engine output → ``(y_pred, y)``, as for MONAI's metric handlers.
        save_details: keep the per-image statistics rows in ``engine.state.metric_details``.
        kwargs: :class:`MultiRaterCalibrationMetric` options.
    """

    def __init__(self, key: str = "mr_ece", output_transform: Any = lambda x: x, save_details: bool = False,
                 **kwargs: Any) -> None:
        ops.check_choice("key", key, metric_table.keys())
        self.key = key
        #: whether a larger value of ``key`` is better (False for MR-ECE, Brier and NLL)
        self.higher_is_better = metric_table.higher_is_better(key)
        self.metric_cmp_fn = metric_cmp_fn(key)
        self._names: list[str] = []
        super().__init__(metric_fn=MultiRaterCalibrationMetric(**kwargs), output_transform=output_transform,
                         save_details=save_details)

    def attach(self, engine: Any, name: str, *args: Any, **kwargs: Any) -> None:
        self._names.append(name)  # for score_function
        super().attach(engine, name, *args, **kwargs)

    def score_function(self, engine: Any) -> float:
        """The value reported on ``engine``, negated when lower is better: for ``EarlyStopping``,
        ``Checkpoint`` and ``EarlyStopHandler`` (which keep the highest score). See :func:`score_function`."""
        if not self._names:
            raise RuntimeError("MultiRaterCalibrationHandler.score_function: the handler is attached to no engine "
                               "yet (give it to SupervisedEvaluator(key_val_metric=...) or call attach)")
        name = next((n for n in self._names if n in engine.state.metrics), self._names[-1])
        return score_function(name, self.key)(engine)

    def compute(self) -> float:
        from ignite.exceptions import NotComputableError

        try:
            result = super().compute()
        except RuntimeError as err:  # nothing accumulated: ignite's own error for that
            raise NotComputableError(str(err)) from err
        return result[self.key]
