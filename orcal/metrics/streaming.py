"""Streaming multi-rater calibration metric (SPEC §4–5): one pass, O(bins) memory, distributed sync.

:class:`MultiRaterCalibration` accumulates the statistics of :func:`orcal.calibration_stats` over any
number of updates. Only the summed totals are kept (a few thousand numbers whatever the size of the test
set), plus, on request, one row per image for the bootstrap (``per_image=True``) and the per-score counts of
the exact AUC (``exact_auc=True``). Under ``torch.distributed`` :meth:`MultiRaterCalibration.compute` sums
the statistics of every rank; integer counts stay exact.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import numpy as np
import torch

from orcal import distributed, ops
from orcal.metrics.batch_stats import batch_stats, check_options, check_raters, prepare
from orcal.metrics.pooled import auc_from_sorted_counts, bin_table, bootstrap, calibration_metrics, merge_scores
from orcal.ops import reference
from orcal.ops.stats import CalibrationStats

__all__ = ["MultiRaterCalibration", "agreement_table", "summarize"]

#: Voxels per chunk when accumulating the confidence-vs-agreement table (bounds its temporary memory).
_AGREEMENT_CHUNK = 1 << 22


def agreement_table(sum_p: dict[int, torch.Tensor], count: dict[int, torch.Tensor]) -> dict[str, np.ndarray]:
    """Mean predicted probability per normalised rater agreement ``k / R`` (levels of equal ``k/R`` merged).

    Args:
        sum_p: ``{R: (R+1,) float64}`` summed probability of the voxels with ``k`` votes out of ``R``.
        count: ``{R: (R+1,) int64}`` number of those voxels.

    Returns:
        ``{"agreement", "confidence", "count"}`` arrays sorted by agreement; levels with no voxel are dropped.
    """
    merged: dict[Fraction, list[float]] = {}
    for R in sorted(sum_p):
        for k in range(R + 1):
            c = int(count[R][k])
            if c == 0:
                continue
            entry = merged.setdefault(Fraction(k, R), [0.0, 0])
            entry[0] += float(sum_p[R][k])
            entry[1] += c
    keys = sorted(merged)
    return {
        "agreement": np.array([float(f) for f in keys], dtype=np.float64),
        "confidence": np.array([merged[f][0] / merged[f][1] for f in keys], dtype=np.float64),
        "count": np.array([merged[f][1] for f in keys], dtype=np.int64),
    }


def summarize(total: CalibrationStats, n_images: int) -> dict[str, Any]:
    """The result of :meth:`MultiRaterCalibration.compute` from pooled statistics: every metric of
    :mod:`orcal.metrics.registry` as a float, the reliability table ``bins``, ``n_pairs`` and ``n_images``."""
    total = total.total()
    out: dict[str, Any] = dict(calibration_metrics(total))
    out["bins"] = bin_table(total)
    out["n_pairs"] = int(total.n.sum())
    out["n_images"] = int(n_images)
    return out


class MultiRaterCalibration:
    """Streaming multi-rater calibration metrics: MR-ECE (l1, l2, max), AUC, Brier, NLL and Dice.

    Every statistic is a sum over voxel–rater pairs (SPEC §4), so updates may have any batch size, image
    size and number of raters ``R``; the result equals one pass over all the data at once.

    Args:
        n_bins: equal-width ECE bins on [0, 1].
        auc_bins: score bins of the streaming AUC (its error bound is reported).
        per_image: also keep one statistics row per image (needed by :meth:`stats` and the bootstrap;
            costs ``O(images x (n_bins + auc_bins))`` memory).
        exact_auc: also keep the positive / negative pair count of every distinct score, so that
            :meth:`compute` returns the exact AUC (memory grows with the number of distinct scores).
        kind: ``"prob"`` (probabilities), ``"logit"`` (binary logits) or ``"ordinal"`` (ordinal logits
            ``(B, R+1, *S)``); :meth:`update` may override it.
        readout: ordinal readout, ``"majority"`` or ``"expected"``.
        majority: majority threshold for the readout and Dice; default ``R // 2 + 1``.
        agreement: accumulate the confidence-vs-agreement table (mean ``p`` per vote count ``k``). It costs
            one extra read of the prediction and the target per update (and, for ordinal logits, one
            readout to a probability map).
        backend: kernel backend of :func:`orcal.calibration_stats` (``"auto"`` picks the fastest).
        num_structures: ``C`` structures at once (SPEC §11): predictions ``(B, C, *S)`` or ordinal logits
            ``(B, C * (R+1), *S)``, targets rater label maps or vote counts ``(B, C, *S)``; :meth:`compute`
            then adds ``"<metric>/macro"`` and ``"<metric>/<c>"`` keys, and the agreement table and the exact
            AUC (one structure's) are not kept.
        num_raters: ``R`` when targets are vote counts ``k`` (``(B, *S)`` or ``(B, 1, *S)``, as
            ``ORCTargetd`` writes them); None: targets are rater masks ``(B, R, *S)``. The same place as in
            the torchmetrics and MONAI forms; :meth:`update` may repeat it, not contradict it.
        sync: whether :meth:`compute` and :meth:`stats` sum the state over the ranks of ``torch.distributed``:
            ``"auto"`` (when a process group of several ranks is initialised), ``True`` (it must be), or
            ``False`` (this process only: evaluation on rank 0 alone, which would otherwise wait for the
            other ranks forever).
    """

    def __init__(self, n_bins: int = 15, auc_bins: int = 4096, per_image: bool = False, exact_auc: bool = False,
                 kind: str = "prob", readout: str = "majority", majority: int | None = None,
                 agreement: bool = True, backend: str = "auto", sync: bool | str = "auto",
                 num_structures: int | None = None, num_raters: int | None = None) -> None:
        if sync not in (True, False, "auto"):
            raise ValueError(f"sync must be True, False or 'auto', got {sync!r}")
        self.sync = sync
        n_bins, auc_bins, majority = check_options(n_bins, auc_bins, kind, readout, majority, backend)
        self.n_bins, self.auc_bins = n_bins, auc_bins
        self.num_structures = None if num_structures is None else ops.check_int("num_structures", num_structures, 1)
        if self.num_structures is not None and exact_auc:
            raise ValueError("exact_auc keeps the scores of one structure; it cannot be used with num_structures")
        agreement = agreement and self.num_structures is None
        self.per_image, self.exact_auc, self.agreement = bool(per_image), bool(exact_auc), bool(agreement)
        self.kind, self.readout, self.majority, self.backend = kind, readout, majority, backend
        self.num_raters = check_raters(None, num_raters)
        self.reset()

    # --- state -------------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every update."""
        C = self.num_structures or 1
        self._total = CalibrationStats.empty(self.n_bins, self.auc_bins, rows=C, num_structures=C)
        self._n_images = 0
        self._rows: list[CalibrationStats] = []
        self._sum_p: dict[int, torch.Tensor] = {}
        self._count: dict[int, torch.Tensor] = {}
        empty_i64 = torch.zeros(0, dtype=torch.int64)
        self._scores = (torch.zeros(0, dtype=torch.float64), empty_i64, empty_i64.clone())

    def update(self, pred: torch.Tensor, target: torch.Tensor, num_raters: int | None = None,
               valid: torch.Tensor | None = None, kind: str | None = None) -> None:
        """Add a batch.

        Args:
            pred: probabilities or binary logits ``(B, *S)`` / ``(B, 1, *S)``, or ordinal logits
                ``(B, R+1, *S)``, as set by ``kind``.
            target: rater masks ``(B, R, *S)``, or vote counts ``k`` ``(B, *S)`` or ``(B, 1, *S)`` with
                ``num_raters``.
            num_raters: ``R`` when ``target`` holds vote counts, if not given to the constructor (then ``R``
                may differ between updates); given there too, it must be the same.
            valid: optional ``(B, *S)`` bool mask of the voxels that count.
            kind: overrides the ``kind`` given at construction for this update.

        An empty batch (``B = 0`` in both ``pred`` and ``target``, with shapes that agree) adds nothing.
        """
        kind = self.kind if kind is None else kind
        num_raters = check_raters(self.num_raters, num_raters)
        pred, target, valid = prepare(pred, target, valid, num_raters, kind, self.num_structures)
        st = batch_stats(pred, target, num_raters=num_raters, valid=valid, kind=kind, readout=self.readout,
                         majority=self.majority, n_bins=self.n_bins, auc_bins=self.auc_bins,
                         backend=self.backend, device="cpu",
                         num_structures=self.num_structures)  # validates the batch, even an empty one
        if st.n_images == 0:
            return
        R = target.shape[1] if num_raters is None else int(num_raters)
        if self.agreement or self.exact_auc:
            self._accumulate_votes(pred, target, num_raters, R, valid, kind)
        self._total = CalibrationStats.cat([self._total, st]).total()
        self._n_images += st.n_images
        if self.per_image:
            self._rows.append(st)

    def _accumulate_votes(self, pred, target, num_raters, R, valid, kind) -> None:
        """Per-vote-level sums of ``p`` (agreement table) and per-score pair counts (exact AUC).

        Works chunk by chunk over the flattened voxels, so its temporaries stay small whatever the backend.
        """
        m = reference.majority_threshold(R, self.majority)
        B = target.shape[0]
        if kind == "ordinal":
            pred = ops.foreground_probability(pred, self.readout, m, backend=self.backend)
        p = pred.reshape(B, -1)  # a (B, 1, *S) prediction flattens the same way
        votes = target.reshape(B, R, -1) if num_raters is None else target.reshape(B, -1)
        keep = None if valid is None else valid.reshape(B, -1)
        sum_p = torch.zeros(R + 1, dtype=torch.float64)
        count = torch.zeros(R + 1, dtype=torch.int64)
        parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        step = max(1, _AGREEMENT_CHUNK // max(B, 1))
        for start in range(0, p.shape[1], step):
            cols = slice(start, start + step)
            pc = p[:, cols].reshape(-1)
            if kind == "logit":
                pc = torch.sigmoid(pc.float())
            # R <= 255 votes fit uint8; bincount reads uint8 directly (no int64 copy)
            kc = (votes[:, :, cols].sum(1, dtype=torch.uint8) if num_raters is None else votes[:, cols]).reshape(-1)
            if keep is not None:
                kk = keep[:, cols].reshape(-1)
                pc, kc = pc[kk], kc[kk]
            pd = pc.double()
            if self.agreement:
                sum_p += torch.bincount(kc, weights=pd, minlength=R + 1).cpu()[: R + 1]
                count += torch.bincount(kc, minlength=R + 1).cpu()[: R + 1]
            if self.exact_auc:
                kl = kc.long()
                parts.append(tuple(t.cpu() for t in merge_scores(pd, kl, R - kl)))
        if parts:  # one merge per update keeps the cost O(distinct scores) per update
            old = self._scores
            self._scores = merge_scores(torch.cat([old[0], *(q[0] for q in parts)]),
                                         torch.cat([old[1], *(q[1] for q in parts)]),
                                         torch.cat([old[2], *(q[2] for q in parts)]))
        if self.agreement:
            self._sum_p[R] = self._sum_p.get(R, torch.zeros(R + 1, dtype=torch.float64)) + sum_p
            self._count[R] = self._count.get(R, torch.zeros(R + 1, dtype=torch.int64)) + count

    # --- synchronisation ---------------------------------------------------------------------------------

    def _synced(self) -> dict[str, Any]:
        """This process's state, or the sum over every rank of an initialised process group."""
        state = {"total": self._total, "n_images": self._n_images, "rows": self._rows,
                 "sum_p": dict(self._sum_p), "count": dict(self._count), "scores": self._scores}
        if self.sync is True and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise RuntimeError("MultiRaterCalibration(sync=True) needs an initialised torch.distributed process "
                               "group; use sync='auto' or False for a single process")
        if self.sync is False or distributed.world_size() == 1:
            return state
        dist = torch.distributed
        C = self.num_structures or 1
        counts, sums = self._total.pack()
        images = torch.full((counts.shape[0], 1), self._n_images, dtype=counts.dtype)  # one per structure row
        counts = distributed.all_reduce_sum(torch.cat([counts, images], dim=1))
        state["total"] = CalibrationStats.unpack(counts[:, :-1], distributed.all_reduce_sum(sums), self.n_bins,
                                                 self.auc_bins, C)
        state["n_images"] = int(counts[0, -1])
        if self.per_image:
            local = (CalibrationStats.cat(self._rows) if self._rows
                     else CalibrationStats.empty(self.n_bins, self.auc_bins, num_structures=C))
            row_counts, row_sums = local.pack()
            rows = CalibrationStats.unpack(distributed.all_gather_rows(row_counts),
                                           distributed.all_gather_rows(row_sums), self.n_bins, self.auc_bins, C)
            state["rows"] = [rows]
        if self.agreement:
            raters: list[list[int]] = [[] for _ in range(dist.get_world_size())]
            dist.all_gather_object(raters, sorted(self._sum_p))
            every = sorted({R for part in raters for R in part})
            zeros_f = {R: torch.zeros(R + 1, dtype=torch.float64) for R in every}
            zeros_i = {R: torch.zeros(R + 1, dtype=torch.int64) for R in every}
            if every:
                flat_p = distributed.all_reduce_sum(torch.cat([self._sum_p.get(R, zeros_f[R]) for R in every]))
                flat_c = distributed.all_reduce_sum(torch.cat([self._count.get(R, zeros_i[R]) for R in every]))
                sizes = [R + 1 for R in every]
                state["sum_p"] = dict(zip(every, flat_p.split(sizes)))
                state["count"] = dict(zip(every, flat_c.split(sizes)))
        if self.exact_auc:
            scores = distributed.all_gather_rows(self._scores[0])
            pos, neg = distributed.all_gather_rows(self._scores[1]), distributed.all_gather_rows(self._scores[2])
            state["scores"] = merge_scores(scores, pos, neg)
        return state

    # --- results -----------------------------------------------------------------------------------------

    def compute(self) -> dict[str, Any]:
        """The metrics of everything seen so far (summed over ranks under ``torch.distributed``).

        Returns:
            ``mr_ece`` (l1), ``mr_ece_l2``, ``mr_mce``, ``auc`` (streaming, with ``auc_error_bound``; exact
            with ``exact_auc=True``, then the binned value is ``auc_binned``), ``brier``, ``nll``, ``dice``,
            ``bins`` (the reliability table of :func:`orcal.metrics.bin_table`), ``agreement`` (the
            confidence-vs-agreement table, when accumulated), ``n_pairs`` and ``n_images``. Metrics that are
            undefined on the data (e.g. AUC without a negative pair) are NaN.

        Raises:
            RuntimeError: nothing was accumulated (on any rank).
        """
        state = self._synced()
        if state["n_images"] == 0:
            raise RuntimeError("MultiRaterCalibration.compute() called before any non-empty update")
        out = summarize(state["total"], state["n_images"])
        if self.exact_auc:
            out["auc_binned"] = out["auc"]
            out["auc"] = auc_from_sorted_counts(state["scores"][1], state["scores"][2])
        if self.agreement:
            out["agreement"] = agreement_table(state["sum_p"], state["count"])
        return out

    def totals(self) -> CalibrationStats:
        """The summed statistics (one row, or one per structure; summed over ranks under ``torch.distributed``)."""
        return self._synced()["total"]

    def stats(self) -> CalibrationStats:
        """Per-image statistics in the form :func:`orcal.bootstrap` takes (needs ``per_image=True``)."""
        if not self.per_image:
            raise RuntimeError("stats() needs MultiRaterCalibration(per_image=True)")
        rows = self._synced()["rows"]
        if not rows:
            return CalibrationStats.empty(self.n_bins, self.auc_bins, num_structures=self.num_structures or 1)
        return CalibrationStats.cat(rows)

    def bootstrap(self, n_boot: int = 1000, fraction: float = 0.6, seed: int = 0, count: int | None = None,
                  groups=None) -> dict[str, dict[str, float]]:
        """Bootstrap confidence intervals over the images seen (SPEC §5), or over their ``groups`` (one id per
        image in update order, e.g. the patient: whole groups are resampled); needs ``per_image=True``."""
        return bootstrap(self.stats(), n_boot=n_boot, fraction=fraction, seed=seed, count=count, groups=groups)

    # --- persistence -------------------------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        config = {"n_bins": self.n_bins, "auc_bins": self.auc_bins, "per_image": self.per_image,
                  "exact_auc": self.exact_auc, "agreement": self.agreement}
        return config if self.num_structures is None else {**config, "num_structures": self.num_structures}

    def state_dict(self) -> dict[str, Any]:
        """This process's accumulated state (tensors, ints and strings; loadable with ``weights_only=True``)."""
        rows = CalibrationStats.cat(self._rows) if self._rows else None
        return {
            "config": self._config(),
            "total": self._total.as_dict(),
            "n_images": self._n_images,
            "rows": None if rows is None else rows.as_dict(),
            "agreement": {str(R): {"sum_p": self._sum_p[R], "count": self._count[R]} for R in self._sum_p},
            "scores": {"score": self._scores[0], "pos": self._scores[1], "neg": self._scores[2]},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the bin counts and options must match this metric's."""
        if not isinstance(state, dict) or "config" not in state:
            raise TypeError("state must be a dict made by MultiRaterCalibration.state_dict()")
        if state["config"] != self._config():
            raise ValueError(f"state was saved with {state['config']}, but this metric has {self._config()}")
        self._total = CalibrationStats.from_dict(state["total"])
        self._n_images = int(state["n_images"])
        self._rows = [] if state["rows"] is None else [CalibrationStats.from_dict(state["rows"])]
        self._sum_p = {int(R): v["sum_p"].clone() for R, v in state["agreement"].items()}
        self._count = {int(R): v["count"].clone() for R, v in state["agreement"].items()}
        s = state["scores"]
        self._scores = (s["score"].clone(), s["pos"].clone(), s["neg"].clone())

    def __repr__(self) -> str:
        return (f"MultiRaterCalibration(n_bins={self.n_bins}, auc_bins={self.auc_bins}, per_image={self.per_image}, "
                f"exact_auc={self.exact_auc}, kind={self.kind!r}, images={self._n_images})")
