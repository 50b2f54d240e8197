"""Volume uncertainty (SPEC §11.4): the predicted volume's distribution against the raters' volumes.

Treating voxels as independent Bernoulli draws with the predicted probabilities ``p``, a structure's volume
has mean ``v * sum p`` and variance ``v^2 * sum p (1 - p)`` (``v`` the voxel volume); it is scored, as a
normal distribution, against each rater's volume: the CRPS, whether the rater falls inside the central
interval, and the error of the mean against the raters' mean. Every statistic is a sum over voxels, so
sliding-window chunks of one image add (``+``) and images concatenate (:meth:`VolumeStats.cat`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from orcal.metrics.pooled import per_structure
from orcal.ops.checks import check_int, check_real, check_tensor, data_check
from orcal.ops.masks import rater_masks

_FIELDS = ("mean", "var", "raters", "voxel_volume")


@dataclass
class VolumeStats:
    """Per image (and structure) sums, in voxels, image-major like :class:`~orcal.ops.stats.CalibrationStats`:

    - ``mean`` (N,) float64: ``sum p``; ``var`` (N,) float64: ``sum p (1 - p)``;
    - ``raters`` (N, R) float64: each rater's voxel count;
    - ``voxel_volume`` (N,) float64: the volume of one voxel in mm³ (1 without a spacing).
    """

    mean: torch.Tensor
    var: torch.Tensor
    raters: torch.Tensor
    voxel_volume: torch.Tensor
    num_structures: int = 1

    @property
    def n_images(self) -> int:
        return self.mean.shape[0] // self.num_structures

    def __add__(self, other: VolumeStats) -> VolumeStats:
        """The sums of two chunks of the same images (sliding windows that do not overlap)."""
        if self.raters.shape != other.raters.shape or self.num_structures != other.num_structures:
            raise ValueError("volume statistics of different images or raters cannot be added")
        if not torch.equal(self.voxel_volume, other.voxel_volume):
            raise ValueError("volume statistics with different voxel volumes cannot be added")
        return VolumeStats(self.mean + other.mean, self.var + other.var, self.raters + other.raters,
                           self.voxel_volume, self.num_structures)

    @staticmethod
    def cat(parts: Sequence[VolumeStats]) -> VolumeStats:
        """The rows of several batches of images."""
        if not parts or len({(p.raters.shape[1], p.num_structures) for p in parts}) != 1:
            raise ValueError("VolumeStats.cat needs parts with the same number of raters and structures")
        return VolumeStats(*(torch.cat([getattr(p, f) for p in parts]) for f in _FIELDS),
                           num_structures=parts[0].num_structures)


def _voxel_volume(spacing, batch: int, ndim: int) -> torch.Tensor:
    if spacing is None:
        return torch.ones(batch, dtype=torch.float64)
    sp = torch.as_tensor(spacing, dtype=torch.float64).cpu()
    if sp.ndim == 1:
        sp = sp.expand(batch, -1)
    if tuple(sp.shape) != (batch, ndim) or not bool(torch.isfinite(sp).all() and (sp > 0).all()):
        raise ValueError(f"spacing must be {ndim} positive sizes (one per spatial axis) or a ({batch}, {ndim}) "
                         f"array, one row per image; got {tuple(sp.shape)}")
    return sp.prod(1)


def volume_stats(prob: torch.Tensor, raters: torch.Tensor, spacing=None, valid: torch.Tensor | None = None,
                 num_structures: int | None = None) -> VolumeStats:
    """Volume statistics of a batch.

    Args:
        prob: foreground probabilities ``(B, *S)``, or ``(B, C, *S)`` with ``num_structures``.
        raters: rater masks ``(B, R, *S)``, or rater label maps ``(B, R, *S)`` (0..C) with ``num_structures``.
        spacing: voxel size in mm per spatial axis (one for all images, or ``(B, ndim)``); default 1.
        valid: optional ``(B, *S)`` bool mask of the voxels that count.
        num_structures: ``C`` structures (SPEC §11).
    """
    check_tensor("prob", prob)
    check_tensor("raters", raters)
    if not prob.dtype.is_floating_point:
        raise TypeError(f"prob must be a float tensor of probabilities, got {prob.dtype}")
    C = 1 if num_structures is None else check_int("num_structures", num_structures, 1, 255)
    if num_structures is None:
        raters = rater_masks(raters, "raters")
        prob = prob.unsqueeze(1)
    else:
        from orcal.ops.structures import check_labels

        check_labels(raters, C, "raters")
    B, S = raters.shape[0], tuple(raters.shape[2:])
    if tuple(prob.shape) != (B, C, *S):
        raise ValueError(f"prob {tuple(prob.shape)} must be {(B, *S) if num_structures is None else (B, C, *S)}"
                         f" for raters {tuple(raters.shape)}")
    if valid is not None and (tuple(valid.shape) != (B, *S) or valid.dtype != torch.bool):
        raise ValueError(f"valid must be a (B, *S) = {(B, *S)} bool tensor, got {tuple(valid.shape)} {valid.dtype}")
    # NaN or values outside [0, 1] would give a wrong volume and variance without a word (SPEC §8)
    counted = prob if valid is None else prob[valid.unsqueeze(1).expand_as(prob)]
    bad = torch.isnan(counted) | (counted < 0) | (counted > 1)
    data_check(~bad.any(), lambda: f"prob must hold probabilities in [0, 1]; found {counted[bad][0].item()} "
                                   f"({int(bad.sum())} bad values)")
    p = prob.double() if valid is None else torch.where(valid.unsqueeze(1), prob.double(), 0.0)
    counts = []
    for c in range(1, C + 1):  # one structure's (B, R, *S) masks at a time keeps the temporaries small
        votes = raters.bool() if num_structures is None else raters == c
        if valid is not None:
            votes = votes & valid.unsqueeze(1)
        counts.append(votes.flatten(2).sum(2))
    dims = tuple(range(2, p.ndim))
    return VolumeStats(
        mean=p.sum(dims).reshape(-1).cpu(), var=(p * (1 - p)).sum(dims).reshape(-1).cpu(),
        raters=torch.stack(counts, 1).reshape(B * C, raters.shape[1]).double().cpu(),  # B = 0 has no -1
        voxel_volume=_voxel_volume(spacing, B, len(S)).repeat_interleave(C), num_structures=C)


def _normal_cdf(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.erfc(-z / math.sqrt(2))


def gaussian_crps(mu: torch.Tensor, sd: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CRPS of a normal ``N(mu, sd^2)`` at observations ``y`` (``|y - mu|`` where ``sd`` is 0)."""
    safe = torch.where(sd > 0, sd, torch.ones_like(sd))
    z = (y - mu) / safe
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    crps = safe * (z * (2 * _normal_cdf(z) - 1) + 2 * pdf - 1 / math.sqrt(math.pi))
    return torch.where(sd > 0, crps, (y - mu).abs())


def volume_metrics(stats: VolumeStats, coverage: float = 0.9) -> dict[str, float]:
    """``volume_crps`` (mL), ``volume_coverage`` (fraction of raters' volumes inside the central ``coverage``
    interval), ``volume_error`` (mean |predicted mean - raters' mean|, mL) and ``volume_sd`` (mean predicted
    standard deviation, mL), each the mean over images (and raters); with several structures, pooled over
    them, with ``"/macro"`` and ``"/<label>"`` keys as in :func:`orcal.calibration_metrics`."""
    level = check_real("coverage", coverage)
    if not 0 < level < 1:
        raise ValueError(f"coverage must lie in (0, 1), got {coverage}")
    if stats.mean.shape[0] == 0:
        raise ValueError("volume_metrics needs statistics of at least one image")
    ml = stats.voxel_volume / 1000.0
    mu, sd = stats.mean * ml, stats.var.sqrt() * ml
    y = stats.raters * ml[:, None]
    half = math.sqrt(2) * torch.erfinv(torch.tensor(level, dtype=torch.float64)) * sd
    rows = {  # (N,) per image and structure
        "volume_crps": gaussian_crps(mu[:, None], sd[:, None], y).mean(1),
        "volume_coverage": ((y - mu[:, None]).abs() <= half[:, None]).double().mean(1),
        "volume_error": (mu - y.mean(1)).abs(),
        "volume_sd": sd,
    }
    C = stats.num_structures
    out = {key: float(v.mean()) for key, v in rows.items()}
    if C > 1:
        means = {key: v.reshape(-1, C).mean(0) for key, v in rows.items()}
        out.update({key: float(v[0]) for key, v in per_structure(means, C).items()})
    return out
