"""MONAI's metric protocol over orcal's statistics: :class:`MultiRaterCalibrationMetric` (a
``CumulativeIterationMetric``), :class:`MultiRaterCalibrationHandler` (an engine handler) and the
``score_function`` / ``metric_cmp_fn`` that MONAI's checkpoint and early-stopping handlers take."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch

try:
    from monai.handlers import IgniteMetricHandler
    from monai.metrics import CumulativeIterationMetric
    from monai.utils.dist import evenly_divisible_all_gather
except ImportError as err:  # an optional extra: say how to get it
    raise ImportError('orcal.integrations.monai needs MONAI: pip install "orcal[monai]"') from err

import orcal.metrics.registry as registry
from orcal import distributed, ops
from orcal.metrics.batch_stats import batch_stats, check_options, check_raters, prepare
from orcal.metrics.pooled import bootstrap
from orcal.metrics.streaming import summarize
from orcal.ops.stats import CalibrationStats

__all__ = ["MultiRaterCalibrationHandler", "MultiRaterCalibrationMetric", "metric_cmp_fn", "score_function"]


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
            counts ``(B, C, *S)`` of ``ORCTargetd(num_structures=C)``; :meth:`aggregate` adds
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
        key: the orcal metric it holds (:mod:`orcal.metrics.registry`), which says its direction.
    """
    ops.check_choice("key", key, registry.keys())
    sign = 1.0 if registry.higher_is_better(key) else -1.0

    def score(engine: Any) -> float:
        return sign * float(engine.state.metrics[metric_name])

    score.__name__ = f"score_{metric_name}"
    return score


def metric_cmp_fn(key: str = "mr_ece") -> Callable[[float, float], bool]:
    """``metric_cmp_fn`` for MONAI's engines (``SupervisedEvaluator(..., metric_cmp_fn=...)``), which otherwise
    take a larger key metric as better when they track ``engine.state.best_metric``: ``current < best`` when
    lower is better for ``key`` (MR-ECE, Brier, NLL), ``current > best`` otherwise."""
    ops.check_choice("key", key, registry.keys())
    return operator.gt if registry.higher_is_better(key) else operator.lt


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
        ops.check_choice("key", key, registry.keys())
        self.key = key
        #: whether a larger value of ``key`` is better (False for MR-ECE, Brier and NLL)
        self.higher_is_better = registry.higher_is_better(key)
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
