"""orcal's streaming statistics as ``torchmetrics.Metric`` classes (``pip install torchmetrics``).

Every class keeps the same two states, the packed statistics of :func:`orcal.calibration_stats` summed over
batches and ranks (``dist_reduce_fx="sum"``), so a value is always the pooled one: ``self.log("val/mr_ece",
metric)`` in Lightning, the forward idiom (``metric(pred, target)`` each step returns that batch's value and
adds it to the pool) and ``compute()`` after many updates all equal one pass of
:class:`orcal.metrics.MultiRaterCalibration` over the same data (the same per-batch statistics,
:func:`orcal.metrics.batch_stats.batch_stats`). In a ``torchmetrics.MetricCollection``
the scalar metrics of one configuration fall into one compute group, so the statistics are computed once per
batch for all of them.

- :class:`MultiRaterECE` (``norm="l1" | "l2" | "max"``), :class:`MultiRaterAUROC`,
  :class:`MultiRaterBrier`, :class:`MultiRaterDice`: one scalar each.
- :class:`MultiRaterCalibrationMetric`: every metric of :mod:`orcal.metrics.registry` as a dict of scalars,
  for ``self.log_dict``.

``plot()`` without a value draws the reliability diagram of the pooled pairs (torchmetrics' ``(fig, ax)``
convention); with values it is torchmetrics' own plot of them.
"""

from __future__ import annotations

from typing import Any

import torch
import torchmetrics

import orcal.metrics.registry as registry
from orcal import ops
from orcal.metrics.batch_stats import batch_stats, check_options, check_raters, prepare
from orcal.metrics.pooled import calibration_metrics
from orcal.ops.stats import CalibrationStats

__all__ = ["MultiRaterAUROC", "MultiRaterBrier", "MultiRaterCalibrationMetric", "MultiRaterDice", "MultiRaterECE",
           "MultiRaterStatistics"]


class MultiRaterStatistics(torchmetrics.Metric):
    """The shared state and update of orcal's torchmetrics classes (the base of the scalar metrics).

    Args:
        n_bins: equal-width ECE bins on [0, 1].
        auc_bins: score bins of the streaming AUC.
        kind: ``"prob"``, ``"logit"`` or ``"ordinal"`` (ordinal logits ``(B, R+1, *S)``).
        readout: ordinal readout, ``"majority"`` or ``"expected"``.
        majority: majority threshold for the readout and Dice; default ``R // 2 + 1``.
        num_raters: ``R`` when targets are vote counts ``k`` (``(B, *S)`` or ``(B, 1, *S)``); ``None``: targets
            are rater masks ``(B, R, *S)``. :meth:`update` may repeat it, not contradict it.
        backend: kernel backend of :func:`orcal.calibration_stats`.
        num_structures: ``C`` structures at once (SPEC §11): predictions ``(B, C, *S)`` or ordinal logits
            ``(B, C * (R+1), *S)``, targets rater label maps or vote counts ``(B, C, *S)``; the state keeps a
            row per structure.
        average: with several structures, as torchmetrics' multiclass metrics: ``"micro"`` (the voxel–rater
            pairs of every structure pooled), ``"macro"`` (the mean of the structures' values) or ``"none"``
            (a ``(C,)`` tensor).
        kwargs: ``torchmetrics.Metric`` options (``sync_on_compute``, ``process_group``, ...).
    """

    is_differentiable = False
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    def __init__(self, n_bins: int = 15, auc_bins: int = 4096, kind: str = "prob", readout: str = "majority",
                 majority: int | None = None, num_raters: int | None = None, backend: str = "auto",
                 num_structures: int | None = None, average: str = "micro", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.n_bins, self.auc_bins, self.majority = check_options(n_bins, auc_bins, kind, readout, majority, backend)
        self.kind, self.readout, self.backend = kind, readout, backend
        self.num_raters = check_raters(None, num_raters)
        ops.check_choice("average", average, ("micro", "macro", "none"))
        if num_structures is None and average != "micro":
            raise ValueError(f"average={average!r} averages several structures: give num_structures as well")
        self.num_structures = None if num_structures is None else ops.check_int("num_structures", num_structures, 1)
        self.average = average
        C = self.num_structures or 1
        counts, sums = CalibrationStats.empty(self.n_bins, self.auc_bins, rows=C, num_structures=C).pack()
        # one structure keeps the 1-D state of earlier versions (their state_dicts load unchanged)
        self.add_state("counts", default=counts if num_structures else counts[0], dist_reduce_fx="sum")
        self.add_state("sums", default=sums if num_structures else sums[0], dist_reduce_fx="sum")

    def _fit_state(self, name: str, value: Any, source: str) -> Any:
        """``value`` for state ``name`` if it was made with this metric's bins and structure count (one
        structure's state may be 1-D or ``(1, X)``: earlier versions), else a ``ValueError``: adding the
        packed statistics of another layout would give wrong values without a word."""
        want = self._defaults[name].shape
        if isinstance(value, torch.Tensor) and value.ndim in (1, 2):
            if value.shape == want:
                return value
            if self.num_structures in (None, 1) and value.numel() == want.numel() and value.shape[0] == 1:
                return value.reshape(want)
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{type(self).__name__}: the {source} state {name!r} has shape {got}, but this metric "
                         f"(n_bins={self.n_bins}, auc_bins={self.auc_bins}, num_structures={self.num_structures}) "
                         f"keeps {tuple(want)}: it was made with other bins or another number of structures")

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        for name in ("counts", "sums"):
            if prefix + name in state_dict:
                state_dict[prefix + name] = self._fit_state(name, state_dict[prefix + name], "loaded")
        super()._load_from_state_dict(state_dict, prefix, *args)

    def merge_state(self, incoming_state: dict[str, Any] | torchmetrics.Metric) -> None:
        """torchmetrics' ``merge_state``, refusing a state of other bins or another structure count."""
        if isinstance(incoming_state, MultiRaterStatistics):
            theirs = (incoming_state.n_bins, incoming_state.auc_bins, incoming_state.num_structures)
            mine = (self.n_bins, self.auc_bins, self.num_structures)
            if theirs != mine:
                raise ValueError(f"{type(self).__name__}.merge_state: the incoming metric has n_bins, auc_bins, "
                                 f"num_structures = {theirs}, this one {mine}")
        elif isinstance(incoming_state, dict):
            incoming_state = {k: self._fit_state(k, v, "merged") if k in ("counts", "sums") else v
                              for k, v in incoming_state.items()}
        super().merge_state(incoming_state)

    def update(self, pred: torch.Tensor, target: torch.Tensor, num_raters: int | None = None,
               valid: torch.Tensor | None = None, kind: str | None = None) -> None:
        """Add a batch; arguments as :meth:`orcal.metrics.MultiRaterCalibration.update` (``num_raters``
        belongs to the constructor; an update may repeat it)."""
        kind = self.kind if kind is None else kind
        num_raters = check_raters(self.num_raters, num_raters)
        pred, target, valid = prepare(pred, target, valid, num_raters, kind, self.num_structures)
        st = batch_stats(pred, target, num_raters=num_raters, valid=valid, kind=kind, readout=self.readout,
                         majority=self.majority, n_bins=self.n_bins, auc_bins=self.auc_bins, backend=self.backend,
                         num_structures=self.num_structures)
        counts, sums = st.total().pack()  # on the prediction's device: no host round trip per step
        self.counts += counts.reshape(self.counts.shape).to(self.counts.device)
        self.sums += sums.reshape(self.sums.shape).to(self.sums.device)

    def totals(self) -> CalibrationStats:
        """The pooled statistics (one row, or one per structure) of every update so far, on the CPU (this
        rank's, unless called inside ``compute``, where torchmetrics has already summed the ranks)."""
        C = self.num_structures or 1
        return CalibrationStats.unpack(self.counts.reshape(C, -1).cpu(), self.sums.reshape(C, -1).cpu(),
                                       self.n_bins, self.auc_bins, C)

    def _metric(self, key: str) -> torch.Tensor:
        totals, metric = self.totals(), registry.METRICS[key]
        if self.num_structures is None or self.average == "micro":
            value = metric.from_totals(totals.pooled())[0]
        else:
            per = metric.from_totals(totals)  # (C,)
            value = per if self.average == "none" else per.nanmean()
        return value.float().to(self.device)

    def plot(self, val: torch.Tensor | list[torch.Tensor] | None = None, ax: Any = None) -> tuple[Any, Any]:
        """Without ``val``: the reliability diagram of the pooled voxel–rater pairs on ``ax`` (a new figure when
        None). With ``val`` (values returned by ``compute``/``forward``): torchmetrics' plot of them.

        Returns:
            ``(figure, axes)``.
        """
        if val is not None:
            return self._plot(val, ax)
        from orcal.metrics.plots import draw_reliability

        if ax is None:
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(5, 4.5))
        else:
            fig = ax.get_figure()
        # the pairs of every rank, synchronised as compute() does it (the metric's own dist_sync_fn)
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync,
                               should_unsync=self._should_unsync):
            totals = self.totals()
        draw_reliability({type(self).__name__: totals}, ax)
        return fig, ax


class MultiRaterECE(MultiRaterStatistics):
    """Multi-rater expected calibration error over voxel–rater pairs (SPEC §4): ``norm="l1"`` (MR-ECE),
    ``"l2"`` (root mean square gap) or ``"max"`` (MR-MCE). Other arguments: see :class:`MultiRaterStatistics`."""

    higher_is_better = registry.higher_is_better("mr_ece")
    _NORMS = {"l1": "mr_ece", "l2": "mr_ece_l2", "max": "mr_mce"}

    def __init__(self, norm: str = "l1", **kwargs: Any) -> None:
        ops.check_choice("norm", norm, tuple(self._NORMS))
        super().__init__(**kwargs)
        self.norm = norm

    def compute(self) -> torch.Tensor:
        return self._metric(self._NORMS[self.norm])


class MultiRaterAUROC(MultiRaterStatistics):
    """Multi-rater AUC over voxel–rater pairs, streaming in ``auc_bins`` score bins (its error bound is
    ``MultiRaterCalibrationMetric``'s ``auc_error_bound``). Arguments: see :class:`MultiRaterStatistics`."""

    higher_is_better = registry.higher_is_better("auc")

    def compute(self) -> torch.Tensor:
        return self._metric("auc")


class MultiRaterBrier(MultiRaterStatistics):
    """Brier score over voxel–rater pairs. Arguments: see :class:`MultiRaterStatistics`."""

    higher_is_better = registry.higher_is_better("brier")

    def compute(self) -> torch.Tensor:
        return self._metric("brier")


class MultiRaterDice(MultiRaterStatistics):
    """Dice of the majority-thresholded prediction against the majority of the raters, pooled over voxels.
    Arguments: see :class:`MultiRaterStatistics`."""

    higher_is_better = registry.higher_is_better("dice")

    def compute(self) -> torch.Tensor:
        return self._metric("dice")


class MultiRaterCalibrationMetric(MultiRaterStatistics):
    """Every metric of :mod:`orcal.metrics.registry` (``mr_ece``, ``mr_ece_l2``, ``mr_mce``, ``auc``,
    ``auc_error_bound``, ``brier``, ``nll``, ``dice``) as a dict of scalar tensors, for Lightning's
    ``self.log_dict``. The metrics point different ways, so ``higher_is_better`` is None; the scalar classes
    say which way each one is better. Arguments: see :class:`MultiRaterStatistics`."""

    higher_is_better = None
    plot_upper_bound = None  # NLL is unbounded

    def compute(self) -> dict[str, torch.Tensor]:
        """Every metric as a scalar; with several structures also ``"<metric>/macro"`` and ``"<metric>/<c>"``
        (as :func:`orcal.calibration_metrics`)."""
        values = calibration_metrics(self.totals())
        return {key: torch.tensor(value, dtype=torch.float32, device=self.device) for key, value in values.items()}
