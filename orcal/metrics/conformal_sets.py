"""Conformal prediction sets per voxel, with an uncertainty mask, against a random rater (SPEC §12.3–12.4).

Each voxel gets a *set* of plausible labels from one threshold ``t`` per structure: the label ``y`` is in the
set when its probability is at least ``t`` (``p`` for foreground, ``1 - p`` for background). A voxel whose set
holds both labels is **uncertain**; one whose set is ``{1}`` is surely foreground. The threshold is chosen by
conformal risk control, as :class:`~orcal.metrics.ConformalRiskControl` chooses its own, so that on a new
image exchangeable with the calibration images, the expected fraction of (voxel, rater) pairs whose rater's
label lies outside the voxel's set is at most ``alpha`` (the rater drawn uniformly from the image's raters).

- :class:`ConformalVoxelSets`: label sets ``{0, 1}`` per voxel from foreground probabilities.
- :class:`ConformalLevelSets`: for an ordinal head, sets of consensus levels ``{k : q_k >= t}`` from the level
  probabilities ``q = softmax(logits)``, bounding the expected fraction of voxels whose observed vote count
  ``k`` lies outside the set.

Both keep a ``(C, G)`` sum of per-image loss curves (bounded memory), pool it over ranks in :meth:`fit`, and
save and load with ``state_dict`` (:func:`save_conformal` / :func:`load_conformal` write several calibrators to
one ``.json`` or ``.pt`` file)::

    >>> import torch
    >>> from orcal.metrics import ConformalVoxelSets
    >>> g = torch.Generator().manual_seed(0)
    >>> p = torch.rand(20, 8, 8, generator=g)
    >>> masks = torch.rand(20, 3, 8, 8, generator=g) < p[:, None]     # three raters, agreeing with p
    >>> sets = ConformalVoxelSets()
    >>> sets.update(p, masks)
    >>> t = sets.fit(alpha=0.2)
    >>> out = sets.predict(p)                                           # lower, upper, uncertain, empty
    >>> bool((out.lower <= out.upper).all()), out.uncertain.shape
    (True, torch.Size([20, 8, 8]))
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

import torch

from orcal.metrics.conformal import (
    GRID_POINTS,
    ConformalRiskControl,
    ConformalVolume,
    _check_state,
    _inputs,
    _rater_masks,
)
from orcal.ops.checks import check_int, check_tensor, data_check

__all__ = ["ConformalLevelSets", "ConformalVoxelSets", "VoxelSets", "level_set_curves", "load_conformal",
           "masks_from_probabilities", "save_conformal", "voxel_set_curves"]


class VoxelSets(NamedTuple):
    """The voxel sets of :meth:`ConformalVoxelSets.predict`, bool masks the shape of ``probs``.

    ``upper``: foreground is in the set (``p >= t``), the voxels that may be foreground; ``lower``: the set is
    ``{1}``, the voxels that are foreground for sure (``lower`` lies inside ``upper``); ``uncertain``: the set
    is ``{0, 1}`` (``upper`` minus ``lower``); ``empty``: no label is in the set, possible only when ``t > 1/2``
    (a large ``alpha``), where the voxel counts as missed whatever its raters say.
    """

    lower: torch.Tensor
    upper: torch.Tensor
    uncertain: torch.Tensor
    empty: torch.Tensor


def _grid(grid_points: int, device) -> torch.Tensor:
    return torch.linspace(0, 1, check_int("grid_points", grid_points, 2, 1 << 20), dtype=torch.float64,
                          device=device)


def _valid(valid: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor | None:
    """The valid mask ``(B, *S)`` as bool, checked against the images' ``(B, *S)``."""
    if valid is None:
        return None
    check_tensor("valid", valid)
    if tuple(valid.shape) != shape:
        raise ValueError(f"valid must be (B, *S) = {shape}, one mask per image, got {tuple(valid.shape)}")
    return valid.bool()


def _misses(score: torch.Tensor, keep: torch.Tensor | None, grid: torch.Tensor) -> torch.Tensor:
    """Per image, how many voxels (inside ``keep``) have ``score < grid[j]``, for every ``j``: ``(B, G)`` float64.

    ``score`` ``(B, *S)`` float64 in [0, 1]. The bin of a voxel is the last grid point it reaches, so
    ``score < grid[j]`` exactly when its bin is below ``j``: the counts are a shifted cumulative histogram.
    """
    B, G = score.shape[0], grid.numel()
    bins = torch.bucketize(score.contiguous(), grid, right=True) - 1
    key = bins + (torch.arange(B, device=score.device) * G).view(B, *([1] * (score.ndim - 1)))
    if keep is not None:
        key = key[keep]
    hist = torch.bincount(key.flatten(), minlength=B * G).view(B, G).double().cpu()
    return torch.nn.functional.pad(hist.cumsum(1)[:, :-1], (1, 0))


def _per_voxel(count: torch.Tensor, voxels: torch.Tensor) -> torch.Tensor:
    """Counts ``(B, G)`` over the images' voxel counts ``(B,)``; an image without a valid voxel loses 0."""
    voxels = voxels.double().cpu()[:, None]
    return torch.where(voxels > 0, count / voxels.clamp_min(1), 0.0)


def voxel_set_curves(probs: torch.Tensor, masks: torch.Tensor, num_structures: int | None = None,
                     valid: torch.Tensor | None = None, grid_points: int = GRID_POINTS) -> torch.Tensor:
    """Each image's voxel-set loss at every threshold of the grid: ``(B, C, G)`` float64.

    The loss of image ``i`` at ``t`` is the fraction of its (valid voxel, rater) pairs whose rater label is
    outside the voxel's set, i.e. whose label's probability (``p`` for a foreground vote, ``1 - p`` for a
    background one) is below ``t``: a random rater's miscoverage. It is nondecreasing in ``t``, in [0, 1], and
    0 at ``t = 0`` (every set is ``{0, 1}``).

    Args:
        probs: foreground probabilities ``(B, *S)``, or ``(B, C, *S)`` with ``num_structures``.
        masks: rater masks ``(B, R, *S)``, or rater label maps ``(B, R, *S)`` (0..C) with ``num_structures``.
        num_structures: ``C`` structures (SPEC §11).
        valid: ``(B, *S)`` voxels that count (default: all).
        grid_points: ``G``, the thresholds ``j / (G - 1)``.
    """
    p, masks, C = _inputs(probs, masks, num_structures)
    grid = _grid(grid_points, p.device)
    B, R = masks.shape[:2]
    keep = _valid(valid, (B, *masks.shape[2:]))
    voxels = keep.flatten(1).sum(1) if keep is not None else torch.full((B,), masks[0, 0].numel())
    out = torch.zeros(B, C, grid.numel(), dtype=torch.float64)
    for c in range(C):
        pc = p[:, c].double()
        rater = _rater_masks(masks, c, num_structures)
        for r in range(R):  # one rater at a time keeps the temporaries at one image batch's size
            out[:, c] += _misses(torch.where(rater[:, r], pc, 1 - pc), keep, grid)
    return _per_voxel(out, voxels[:, None] * R)


def _levels(q: torch.Tensor, k: torch.Tensor, num_structures: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Level probabilities as ``(B, C, L, *S)`` float64 and vote counts as ``(B, C, *S)`` long, checked."""
    check_tensor("level_probs", q)
    check_tensor("k", k)
    if not q.dtype.is_floating_point:
        raise TypeError(f"level_probs must be a float tensor (softmax of ordinal logits), got {q.dtype}")
    if num_structures is None:
        q, k = q.unsqueeze(1), k.unsqueeze(1)
    if q.ndim < 4 or tuple(k.shape) != (q.shape[0], q.shape[1], *q.shape[3:]):
        C = "" if num_structures is None else f"C = {num_structures}, "
        raise ValueError(f"level_probs must be (B, {C}L, *S) and k (B, {C}*S) on the same grid, got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    if num_structures is not None and q.shape[1] != num_structures:
        raise ValueError(f"level_probs must be (B, C = {num_structures}, L, *S), got {tuple(q.shape)}")
    bad = torch.isnan(q) | (q < 0) | (q > 1)
    data_check(~bad.any(), lambda: f"level_probs must hold probabilities in [0, 1]; found {int(bad.sum())} bad")
    L = q.shape[2]
    data_check(((k >= 0) & (k < L)).all() & (k == k.long()).all() if k.dtype.is_floating_point
               else ((k >= 0) & (k < L)).all(), lambda: f"k must hold vote counts 0..{L - 1} (L = {L} levels)")
    return q.double(), k.long()


def level_set_curves(level_probs: torch.Tensor, k: torch.Tensor, num_structures: int | None = None,
                     valid: torch.Tensor | None = None, grid_points: int = GRID_POINTS) -> torch.Tensor:
    """Each image's level-set loss at every threshold: ``(B, C, G)`` float64, the fraction of its valid voxels
    whose observed vote count ``k`` has ``q_k < t`` (is outside ``{k : q_k >= t}``).

    Args:
        level_probs: ``(B, L, *S)`` probabilities of the ``L = R + 1`` consensus levels (``softmax`` of ordinal
            logits over the channels), or ``(B, C, L, *S)`` with ``num_structures``.
        k: observed vote counts ``(B, *S)`` (``(B, C, *S)``), e.g. the ORC target of SPEC §1.
        num_structures, valid, grid_points: as for :func:`voxel_set_curves`.
    """
    q, kk = _levels(level_probs, k, num_structures)
    grid = _grid(grid_points, q.device)
    B, C = kk.shape[:2]
    keep = _valid(valid, (B, *kk.shape[2:]))
    voxels = keep.flatten(1).sum(1) if keep is not None else torch.full((B,), kk[0, 0].numel())
    out = torch.stack([_misses(q[:, c].gather(1, kk[:, c, None])[:, 0], keep, grid) for c in range(C)], 1)
    return _per_voxel(out, voxels[:, None])


class ConformalVoxelSets(ConformalRiskControl):
    """Voxel label sets with a bounded miscoverage against a random rater (SPEC §12.3).

    ``update`` adds per-image loss curves (:func:`voxel_set_curves`) to a running ``(C, G)`` sum; :meth:`fit`
    picks, per structure, the largest grid threshold ``t`` with ``(n R_n(t) + 1) / (n + 1) <= alpha`` (the rule
    of :class:`ConformalRiskControl`, pooled over ranks). Then, for a new exchangeable image and a rater drawn
    uniformly from its raters, the expected fraction of its voxels whose rater label is outside the voxel's set
    is at most ``alpha``. No per-voxel (conditional) coverage is claimed.

    Args:
        num_structures: ``None`` for binary rater masks, or ``C`` for rater label maps (SPEC §11).
        grid_points: number of thresholds in [0, 1].
    """

    def _curves(self, probs: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        return voxel_set_curves(probs, masks, self.num_structures, valid, self.grid.numel())

    def update(self, probs: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Add calibration images: ``probs`` ``(B, *S)`` / ``(B, C, *S)``, ``masks`` ``(B, R, *S)``, optional
        ``valid`` ``(B, *S)`` (voxels outside it count for nothing)."""
        self._add(self._curves(probs, masks, valid))

    def predict(self, probs: torch.Tensor) -> VoxelSets:
        """The sets of every voxel of ``probs`` (``(B, *S)`` / ``(B, C, *S)``) as :class:`VoxelSets` masks."""
        t = self._check_predict(probs)
        p = probs.double()
        one, zero = p >= t, (1 - p) >= t  # the same float64 arithmetic as the calibration curves
        return VoxelSets(lower=one & ~zero, upper=one, uncertain=one & zero, empty=~one & ~zero)

    apply = predict


class ConformalLevelSets(ConformalRiskControl):
    """Sets of consensus levels ``{k : q_k >= t}`` per voxel for an ordinal head (SPEC §12.4).

    With ``L = R + 1`` levels (``k`` raters of ``R`` vote foreground) and ``q = softmax(logits)``, :meth:`fit`
    picks the largest grid threshold ``t`` per structure with ``(n R_n(t) + 1) / (n + 1) <= alpha``, ``R_n`` the
    calibration images' mean fraction of voxels whose observed ``k`` lies outside their set. On a new
    exchangeable image (with the same ``R`` raters) the expected fraction of such voxels is at most ``alpha``.
    """

    def _curves(self, level_probs: torch.Tensor, k: torch.Tensor, valid: torch.Tensor | None = None
                ) -> torch.Tensor:
        return level_set_curves(level_probs, k, self.num_structures, valid, self.grid.numel())

    def update(self, level_probs: torch.Tensor, k: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Add calibration images: ``level_probs`` ``(B, L, *S)`` / ``(B, C, L, *S)``, vote counts ``k``
        ``(B, *S)`` / ``(B, C, *S)``, optional ``valid`` ``(B, *S)``."""
        self._add(self._curves(level_probs, k, valid))

    def predict(self, level_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sets, uncertain)``: ``sets`` bool the shape of ``level_probs`` (level ``k`` is in the voxel's set),
        ``uncertain`` bool ``(B, [C,] *S)``, the voxels whose set holds more than one level."""
        t = self._check_predict(level_probs)  # (1, C, 1, ...) broadcasts over the levels too
        sets = level_probs.double() >= t
        return sets, sets.sum(1 if self.num_structures is None else 2) > 1

    apply = predict


#: The calibrators :func:`load_conformal` rebuilds, by the ``kind`` of their state dict.
CALIBRATORS = {cls.__name__: cls for cls in (ConformalRiskControl, ConformalVolume, ConformalVoxelSets,
                                             ConformalLevelSets)}


def _plain(value):
    """A state-dict value as JSON: tensors become nested lists (float64 reprs round-trip exactly)."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def masks_from_probabilities(calibrator: object) -> bool:
    """Whether ``calibrator`` turns foreground probabilities into masks: a :class:`ConformalRiskControl` (the
    mask ``p >= lambda``) or a :class:`ConformalVoxelSets`, not the volume intervals or the level sets (which
    read an ordinal head's level probabilities)."""
    return isinstance(calibrator, ConformalRiskControl) and not isinstance(calibrator, ConformalLevelSets)


def save_conformal(path: str | os.PathLike, calibrators: dict[str, object]) -> Path:
    """Write fitted calibrators ``{name: calibrator}`` to ``path``: JSON for ``.json``, else ``torch.save``."""
    path = Path(path)
    state = {name: c.state_dict() for name, c in calibrators.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps(_plain(state)) + "\n")
    else:
        torch.save(state, path)
    return path


def load_conformal(path: str | os.PathLike) -> dict[str, object]:
    """The calibrators that :func:`save_conformal` wrote to ``path``, ``{name: calibrator}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no conformal calibrator file {path}: write one with orcal evaluate "
                                "--conformal ALPHA --calibration DIR --save-conformal FILE")
    try:
        state = json.loads(path.read_text()) if path.suffix.lower() == ".json" else \
            torch.load(path, map_location="cpu", weights_only=True)
    except (ValueError, RuntimeError, OSError) as err:
        raise ValueError(f"{path}: not a file of conformal calibrators ({err})") from err
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a file of conformal calibrators (a {type(state).__name__})")
    out = {}
    for name, s in state.items():
        kind = s.get("kind") if isinstance(s, dict) else None
        if kind not in CALIBRATORS:
            raise ValueError(f"{path}: entry {name!r} is not a calibrator state ({', '.join(CALIBRATORS)})")
        _check_state(s, kind, ("kind",))
        out[name] = CALIBRATORS[kind].from_state_dict(s)
    return out
