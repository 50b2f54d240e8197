"""Conformal guarantees against a random rater (SPEC §12), calibrated on held-out images.

The label is ambiguous: each image has ``R`` raters. Both tools here treat the **images** as the exchangeable
units (never the voxels, which are correlated within an image) and guarantee, in expectation over a
calibration set of ``n`` images and one new image drawn from the same distribution, a property against a
rater drawn uniformly at random from the new image's raters. Finite-sample, distribution-free, per structure.

- :class:`ConformalRiskControl`: a threshold ``lambda`` per structure such that the mask ``p >= lambda``
  misses, in expectation, at most a fraction ``alpha`` of a random rater's foreground (false-negative rate),
  by conformal risk control (Angelopoulos et al.) on per-image loss curves over a fixed grid of thresholds.
- :class:`ConformalVolume`: an interval per structure for its volume, ``mu ± q sigma`` around the
  predicted volume distribution of :func:`~orcal.metrics.volume.volume_stats`, that holds a random rater's
  volume (or every rater's volume, ``rater="every"``) with probability at least ``1 - alpha``.

Both follow :class:`~orcal.metrics.TemperatureScaler`: ``update`` on calibration batches (bounded memory:
a ``(C, G)`` curve sum, or ``C x R`` scores per image), ``fit(alpha)``, then ``predict`` on new images::

    >>> import torch
    >>> from orcal.metrics import ConformalRiskControl
    >>> g = torch.Generator().manual_seed(0)
    >>> p = torch.rand(20, 8, 8, generator=g)
    >>> masks = torch.rand(20, 3, 8, 8, generator=g) < p[:, None]     # three raters, agreeing with p
    >>> crc = ConformalRiskControl()
    >>> crc.update(p, masks)
    >>> lam = crc.fit(alpha=0.2)                                         # one threshold per structure
    >>> crc.predict(p).shape
    torch.Size([20, 8, 8])
"""

from __future__ import annotations

import math

import torch

from orcal import distributed
from orcal.metrics.volume import VolumeStats, _voxel_volume, volume_stats
from orcal.ops.checks import check_choice, check_int, check_real, check_tensor, data_check
from orcal.ops.masks import rater_masks

__all__ = ["ConformalRiskControl", "ConformalVolume", "fnr_curves", "min_calibration_images",
           "nominal_volume_intervals"]

#: Points of the threshold grid ``0, 1/(G-1), ..., 1`` of :class:`ConformalRiskControl`.
GRID_POINTS = 1001
#: Who the volume interval must hold: a rater drawn at random, or every rater of the image at once.
RATERS = ("random", "every")
_TOL = 1e-12  # float slack in the certification inequality (its sides are ratios of small integers)


def min_calibration_images(alpha: float, bound: float = 1.0) -> int:
    """The fewest calibration images ``n`` for which a loss bounded by ``bound`` can be certified at level
    ``alpha``: the finite-sample term ``bound / (n + 1)`` alone must not exceed ``alpha``."""
    return max(1, math.ceil(bound / alpha - 1 - 1e-9))


def _check_alpha(alpha: float) -> float:
    a = check_real("alpha", alpha)
    if not 0 < a < 1:
        raise ValueError(f"alpha must lie in (0, 1) (the tolerated risk or miscoverage), got {alpha}")
    return a


def _certify(n: int, alpha: float) -> None:
    need = min_calibration_images(alpha)
    if n < need:
        raise ValueError(f"{n} calibration image(s) cannot certify alpha = {alpha}: the finite-sample term "
                         f"1/(n + 1) = {1 / (n + 1):.4g} exceeds alpha even for the most conservative answer; "
                         f"use at least {need} calibration images (n >= 1/alpha - 1) or a larger alpha")


def _largest_certified(total: torch.Tensor, n: int, alpha: float, grid: torch.Tensor) -> torch.Tensor:
    """Per row of ``total`` (``(C, G)``, the summed per-image loss curves, each nondecreasing on ``grid`` and 0
    at ``grid[0]``), the largest grid point with ``(n R_n + 1) / (n + 1) <= alpha`` (conformal risk control
    with a loss bounded by ``B = 1``); ``n >= min_calibration_images(alpha)`` makes ``grid[0]`` certified."""
    ok = (total + 1) / (n + 1) <= alpha + _TOL  # n R_n + B over n + 1, B = 1
    ok = ok.cumprod(1).bool()  # the loss is nondecreasing: keep the prefix that certifies
    return grid[ok.sum(1) - 1]


def _pooled_sum(total: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
    """``total`` and the image count ``n`` summed over every rank (a collective: each rank must call it)."""
    if distributed.world_size() == 1:
        return total, n
    flat = torch.cat([total.flatten(), torch.tensor([float(n)], dtype=torch.float64)])
    flat = distributed.all_reduce_sum(flat)
    return flat[:-1].view_as(total), int(flat[-1])


def _tensor(value, name: str) -> torch.Tensor | None:
    """A state-dict entry (a tensor, or the nested lists of a JSON file) as a float64 tensor."""
    if value is None:
        return None
    try:
        return torch.as_tensor(value, dtype=torch.float64).cpu()
    except (TypeError, ValueError) as err:
        raise ValueError(f"state_dict[{name!r}] must be numbers, got {type(value).__name__}") from err


def _check_state(state: dict, kind: str, keys: tuple[str, ...]) -> None:
    if not isinstance(state, dict) or state.get("kind", kind) != kind:
        got = state.get("kind") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"state_dict of a {got}, not of a {kind}")
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"{kind} state_dict lacks {', '.join(missing)}")


def _inputs(probs: torch.Tensor, masks: torch.Tensor, num_structures: int | None
            ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Check one batch; returns the probabilities as ``(B, C, *S)``, the masks and ``C``."""
    check_tensor("probs", probs)
    check_tensor("masks", masks)
    if not probs.dtype.is_floating_point:
        raise TypeError(f"probs must be a float tensor of probabilities, got {probs.dtype}")
    if num_structures is None:
        masks = rater_masks(masks, "masks")
        C, probs = 1, probs.unsqueeze(1)
    else:
        from orcal.ops.structures import check_labels

        C = check_labels(masks, num_structures, "masks")
    want = (masks.shape[0], C, *masks.shape[2:])
    if tuple(probs.shape) != want:
        shown = want[:1] + want[2:] if num_structures is None else want
        raise ValueError(f"probs {tuple(probs.shape)} must be {shown} for masks {tuple(masks.shape)}")
    bad = torch.isnan(probs) | (probs < 0) | (probs > 1)
    data_check(~bad.any(), lambda: f"probs must hold probabilities in [0, 1]; found {int(bad.sum())} bad values")
    return probs, masks, C


def _rater_masks(masks: torch.Tensor, c: int, num_structures: int | None) -> torch.Tensor:
    """Structure ``c`` (0-based) of every rater: ``(B, R, *S)`` bool."""
    return masks.bool() if num_structures is None else masks == c + 1


def fnr_curves(probs: torch.Tensor, masks: torch.Tensor, num_structures: int | None = None,
               grid_points: int = GRID_POINTS) -> torch.Tensor:
    """Each image's loss against a random rater at every threshold of the grid: ``(B, C, G)`` float64.

    The loss of image ``i`` at threshold ``lambda`` is the mean over its raters of the false-negative rate
    ``1 - |{p >= lambda} ∩ rater| / |rater|`` (0 for a rater whose mask of the structure is empty), so it is
    nondecreasing in ``lambda``, lies in [0, 1], and is 0 at ``lambda = 0`` (the whole image).

    Args:
        probs: foreground probabilities ``(B, *S)``, or ``(B, C, *S)`` with ``num_structures``.
        masks: rater masks ``(B, R, *S)``, or rater label maps ``(B, R, *S)`` (0..C) with ``num_structures``.
        num_structures: ``C`` structures (SPEC §11).
        grid_points: ``G``, the thresholds ``j / (G - 1)``.
    """
    G = check_int("grid_points", grid_points, 2, 1 << 20)
    p, masks, C = _inputs(probs, masks, num_structures)
    B, R = masks.shape[:2]
    grid = torch.linspace(0, 1, G, dtype=torch.float64, device=p.device)
    # bin j of a voxel: the last threshold it reaches, so p >= grid[j] exactly when its bin is >= j
    bins = torch.bucketize(p.double().contiguous(), grid, right=True) - 1
    offset = (torch.arange(B, device=p.device) * G).view(B, *([1] * (p.ndim - 2)))
    out = torch.zeros(B, C, G, dtype=torch.float64)
    for c in range(C):
        key = bins[:, c] + offset  # (B, *S)
        rater = _rater_masks(masks, c, num_structures)
        for r in range(R):  # one rater at a time keeps the temporaries at one image batch's size
            hist = torch.bincount(key[rater[:, r]], minlength=B * G).view(B, G).double().cpu()
            covered = hist.flip(1).cumsum(1).flip(1)  # voxels of the rater with p >= grid[j]
            total = covered[:, :1]
            out[:, c] += torch.where(total > 0, 1 - covered / total.clamp_min(1), 0.0)
    return out / R


class ConformalRiskControl:
    """Thresholds that bound the expected false-negative rate against a random rater (SPEC §12.1).

    ``update`` adds the per-image loss curves of calibration images to a running sum (memory ``C x G``,
    whatever the number of images); :meth:`fit` picks, per structure, the largest grid threshold ``lambda``
    with ``(n R_n(lambda) + 1) / (n + 1) <= alpha``, ``R_n`` the calibration images' mean loss. Then, for a
    new exchangeable image and a rater drawn uniformly from its raters, ``E[FNR(p >= lambda)] <= alpha``.

    Args:
        num_structures: ``None`` for binary rater masks, or ``C`` for rater label maps (SPEC §11).
        grid_points: number of thresholds in [0, 1].
    """

    def __init__(self, num_structures: int | None = None, grid_points: int = GRID_POINTS) -> None:
        self.num_structures = None if num_structures is None else check_int("num_structures", num_structures, 1,
                                                                              255)
        self.grid = torch.linspace(0, 1, check_int("grid_points", grid_points, 2, 1 << 20), dtype=torch.float64)
        self.reset()

    def reset(self) -> None:
        """Forget the calibration images and the fitted thresholds."""
        self._sum = torch.zeros(self.num_structures or 1, self.grid.numel(), dtype=torch.float64)
        self.n = 0
        self.thresholds: torch.Tensor | None = None
        self.alpha: float | None = None

    def _curves(self, probs: torch.Tensor, masks: torch.Tensor, **kwargs) -> torch.Tensor:
        """The per-image loss curves ``(B, C, G)`` of one calibration batch."""
        return fnr_curves(probs, masks, self.num_structures, self.grid.numel())

    def update(self, probs: torch.Tensor, masks: torch.Tensor) -> None:
        """Add calibration images: ``probs`` ``(B, *S)`` / ``(B, C, *S)``, ``masks`` ``(B, R, *S)``."""
        self._add(self._curves(probs, masks))

    def _add(self, curves: torch.Tensor) -> None:
        self._sum += curves.sum(0)
        self.n += curves.shape[0]
        self.thresholds = None

    def _totals(self) -> tuple[torch.Tensor, int]:
        """The curve sum and the image count over every rank (each rank must call :meth:`fit`)."""
        return _pooled_sum(self._sum, self.n)

    def risk_curve(self) -> torch.Tensor:
        """The calibration images' mean loss at every threshold, ``(C, G)`` (all ranks pooled)."""
        total, n = self._totals()
        if n == 0:
            raise RuntimeError(f"{type(self).__name__} has no calibration image: call update() first")
        return total / n

    def fit(self, alpha: float) -> torch.Tensor:
        """The threshold of each structure, ``(C,)`` float64, stored in ``self.thresholds``.

        Raises ``ValueError`` when the calibration set is too small for ``alpha`` (``n < 1/alpha - 1``).
        """
        a = _check_alpha(alpha)
        total, n = self._totals()
        if n == 0:
            raise RuntimeError(f"{type(self).__name__} has no calibration image: call update() first")
        _certify(n, a)
        self.thresholds, self.alpha = _largest_certified(total, n, a, self.grid), a
        return self.thresholds

    def _check_predict(self, probs: torch.Tensor) -> torch.Tensor:
        """The thresholds shaped to broadcast against ``probs``, after checking both."""
        if self.thresholds is None:
            raise RuntimeError(f"{type(self).__name__}: call fit(alpha) before predict() (or load_state_dict)")
        check_tensor("probs", probs)
        C = self.num_structures
        if C is not None and (probs.ndim < 2 or probs.shape[1] != C):
            raise ValueError(f"probs must be (B, C = {C}, *S) for this calibrator's {C} structure(s), "
                             f"got {tuple(probs.shape)}")
        lam = self.thresholds.to(probs.device)
        return lam[0] if C is None else lam.view(1, C, *([1] * (probs.ndim - 2)))

    def predict(self, probs: torch.Tensor) -> torch.Tensor:
        """The thresholded masks ``p >= lambda_c``: bool, the shape of ``probs``."""
        return probs.double() >= self._check_predict(probs)

    apply = predict

    def state_dict(self) -> dict:
        """What :meth:`load_state_dict` needs to predict (and to refit): the thresholds, this rank's curve sum
        and image count, the settings. Tensors are float64; :func:`~orcal.metrics.save_conformal` writes it."""
        return {"kind": type(self).__name__, "num_structures": self.num_structures,
                "grid_points": self.grid.numel(), "alpha": self.alpha, "n": self.n, "sum": self._sum.clone(),
                "thresholds": None if self.thresholds is None else self.thresholds.clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` (tensors or JSON lists); settings must match this calibrator's."""
        _check_state(state, type(self).__name__, ("num_structures", "grid_points", "n", "sum", "thresholds"))
        if state["num_structures"] != self.num_structures or state["grid_points"] != self.grid.numel():
            raise ValueError(f"state_dict is for num_structures={state['num_structures']}, grid_points="
                             f"{state['grid_points']}; this {type(self).__name__} has {self.num_structures}, "
                             f"{self.grid.numel()}")
        total, lam = _tensor(state["sum"], "sum"), _tensor(state["thresholds"], "thresholds")
        if tuple(total.shape) != tuple(self._sum.shape) or (lam is not None and lam.shape != (total.shape[0],)):
            raise ValueError(f"state_dict sum {tuple(total.shape)} / thresholds must be {tuple(self._sum.shape)} / "
                             f"({total.shape[0]},)")
        self._sum, self.n, self.thresholds, self.alpha = total, int(state["n"]), lam, state.get("alpha")

    @classmethod
    def from_state_dict(cls, state: dict):
        """A calibrator built from a :meth:`state_dict`."""
        _check_state(state, cls.__name__, ("num_structures", "grid_points"))
        out = cls(num_structures=state["num_structures"], grid_points=state["grid_points"])
        out.load_state_dict(state)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_structures={self.num_structures}, n={self.n}, " \
               f"thresholds={self.thresholds})"


def _moments(stats: VolumeStats) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted volume mean and scale in mL, ``(N,)``; the scale is at least one voxel, so a confident
    prediction (``sum p (1 - p) = 0``) still gives finite scores."""
    ml = stats.voxel_volume / 1000.0
    return stats.mean * ml, stats.var.sqrt().clamp_min(1.0) * ml


def nominal_volume_intervals(stats: VolumeStats, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The uncalibrated central ``1 - alpha`` interval ``mu ± z sigma`` of the predicted volume's normal
    distribution (SPEC §11.4), ``z`` its ``1 - alpha/2`` quantile, on the scale of :class:`ConformalVolume`
    (mL, ``sigma`` at least one voxel, the lower bound at least 0): the interval whose ``z`` the conformal
    quantile ``q`` replaces. Returns ``(low, high)``, each ``(B, C)``."""
    a = _check_alpha(alpha)
    z = math.sqrt(2) * float(torch.erfinv(torch.tensor(1 - a, dtype=torch.float64)))
    C = stats.num_structures
    mu, sd = (t.view(-1, C) for t in _moments(stats))
    return (mu - z * sd).clamp_min(0), mu + z * sd


class ConformalVolume:
    """Volume intervals ``mu ± q sigma`` per structure with coverage of a rater's volume (SPEC §12.2).

    The score of image ``i`` and rater ``r`` is the normalised residual ``s_ir = |y_ir - mu_i| / sigma_i``
    (``mu``, ``sigma`` the predicted volume's mean and standard deviation of :func:`volume_stats`, ``sigma``
    at least one voxel). With ``rater="random"`` the image's loss at ``q`` is ``mean_r 1{s_ir > q}`` and ``q``
    is the smallest with ``(n R_n(q) + 1) / (n + 1) <= alpha``: a random rater's volume is covered with
    probability ``>= 1 - alpha``. With ``rater="every"`` the loss is ``1{max_r s_ir > q}`` (split conformal on
    the image's largest score): every rater of the image is covered at once with probability ``>= 1 - alpha``.

    Memory: ``C x R`` scores per calibration image (never voxels).
    """

    def __init__(self, num_structures: int | None = None, rater: str = "random") -> None:
        self.num_structures = None if num_structures is None else check_int("num_structures", num_structures, 1,
                                                                              255)
        check_choice("rater", rater, RATERS)
        self.rater = rater
        self.reset()

    def reset(self) -> None:
        """Forget the calibration scores and the fitted quantiles."""
        self._scores: list[torch.Tensor] = []  # (B, C, R) per update
        self.quantiles: torch.Tensor | None = None
        self.alpha: float | None = None

    def update(self, probs: torch.Tensor, masks: torch.Tensor, spacing=None) -> None:
        """Add calibration images (the arguments of :func:`volume_stats`)."""
        self.update_stats(volume_stats(probs, masks, spacing, num_structures=self.num_structures))

    def update_stats(self, stats: VolumeStats) -> None:
        """Add calibration images from their :class:`VolumeStats`."""
        C = self.num_structures or 1
        if stats.num_structures != C:
            raise ValueError(f"stats hold {stats.num_structures} structure(s), this calibrator {C}")
        if self._scores and stats.raters.shape[1] != self._scores[0].shape[2]:
            raise ValueError(f"every calibration image needs the same R = {self._scores[0].shape[2]} raters, "
                             f"got {stats.raters.shape[1]}")
        mu, sd = _moments(stats)
        y = stats.raters * (stats.voxel_volume / 1000.0)[:, None]
        self._scores.append(((y - mu[:, None]).abs() / sd[:, None]).view(-1, C, y.shape[1]))
        self.quantiles = None

    def scores(self) -> torch.Tensor:
        """The calibration scores ``(n, C, R)`` of every rank, rank order."""
        local = torch.cat(self._scores) if self._scores else None
        if distributed.world_size() == 1:
            if local is None:
                raise RuntimeError("ConformalVolume has no calibration image: call update() first")
            return local
        C = self.num_structures or 1
        # every rank with images has the same R; a rank without any learns it from the others
        R = int(distributed.all_gather_rows(torch.tensor([[0 if local is None else local.shape[2]]])).max())
        rows = distributed.all_gather_rows(torch.zeros(0, C * R, dtype=torch.float64) if local is None
                                           else local.flatten(1))
        return rows.view(-1, C, R)

    def fit(self, alpha: float) -> torch.Tensor:
        """The score quantile ``q`` of each structure, ``(C,)`` float64, stored in ``self.quantiles``."""
        a = _check_alpha(alpha)
        s = self.scores()
        n = s.shape[0]
        _certify(n, a)
        if self.rater == "every":
            s = s.amax(2, keepdim=True)
        R = s.shape[2]
        out = torch.empty(s.shape[1], dtype=torch.float64)
        for c in range(s.shape[1]):
            cand = s[:, c].flatten().sort().values
            above = cand.numel() - torch.searchsorted(cand, cand, right=True)  # scores > q, each q a candidate
            risk = above.double() / R  # n R_n(q): each image's fraction of raters outside, summed
            ok = (risk + 1) / (n + 1) <= a + _TOL  # holds at the largest score, where nothing lies outside
            out[c] = cand[ok.nonzero()[0, 0]]  # the smallest certified q (the loss is nonincreasing in q)
        self.quantiles, self.alpha = out, a
        return out

    def state_dict(self) -> dict:
        """The fitted quantiles, this rank's calibration scores ``(n, C, R)`` and the settings."""
        local = torch.cat(self._scores) if self._scores else None
        return {"kind": type(self).__name__, "num_structures": self.num_structures, "rater": self.rater,
                "alpha": self.alpha, "scores": local, "quantiles": None if self.quantiles is None
                else self.quantiles.clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` (tensors or JSON lists); settings must match this calibrator's."""
        _check_state(state, type(self).__name__, ("num_structures", "rater", "scores", "quantiles"))
        if state["num_structures"] != self.num_structures or state["rater"] != self.rater:
            raise ValueError(f"state_dict is for num_structures={state['num_structures']}, rater="
                             f"{state['rater']!r}; this ConformalVolume has {self.num_structures}, {self.rater!r}")
        C = self.num_structures or 1
        scores, q = _tensor(state["scores"], "scores"), _tensor(state["quantiles"], "quantiles")
        if (scores is not None and (scores.ndim != 3 or scores.shape[1] != C)) or (q is not None and q.shape != (C,)):
            raise ValueError(f"state_dict scores must be (n, {C}, R) and quantiles ({C},)")
        self._scores = [] if scores is None or scores.numel() == 0 else [scores]
        self.quantiles, self.alpha = q, state.get("alpha")

    @classmethod
    def from_state_dict(cls, state: dict) -> ConformalVolume:
        """A calibrator built from a :meth:`state_dict`."""
        _check_state(state, cls.__name__, ("num_structures", "rater"))
        out = cls(num_structures=state["num_structures"], rater=state["rater"])
        out.load_state_dict(state)
        return out

    def intervals(self, stats: VolumeStats) -> tuple[torch.Tensor, torch.Tensor]:
        """Lower and upper volume bounds (mL) ``(B, C)`` of the images of ``stats``; the lower at least 0."""
        if self.quantiles is None:
            raise RuntimeError("ConformalVolume: call fit(alpha) before predicting intervals")
        C = self.num_structures or 1
        mu, sd = (t.view(-1, C) for t in _moments(stats))
        half = self.quantiles[None] * sd
        return (mu - half).clamp_min(0), mu + half

    def predict(self, probs: torch.Tensor, spacing=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Intervals for new images ``probs`` ``(B, *S)`` / ``(B, C, *S)`` without raters: ``(low, high)``."""
        check_tensor("probs", probs)
        if not probs.dtype.is_floating_point:
            raise TypeError(f"probs must be a float tensor of probabilities, got {probs.dtype}")
        p = (probs.unsqueeze(1) if self.num_structures is None else probs).double()
        B, C = p.shape[:2]
        dims = tuple(range(2, p.ndim))
        stats = VolumeStats(mean=p.sum(dims).reshape(-1).cpu(), var=(p * (1 - p)).sum(dims).reshape(-1).cpu(),
                            raters=torch.zeros(B * C, 0, dtype=torch.float64),
                            voxel_volume=_voxel_volume(spacing, B, p.ndim - 2).repeat_interleave(C),
                            num_structures=C)
        return self.intervals(stats)

    apply = predict

    def __repr__(self) -> str:
        n = sum(t.shape[0] for t in self._scores)
        return f"ConformalVolume(num_structures={self.num_structures}, rater={self.rater!r}, n={n}, " \
               f"quantiles={self.quantiles})"
