"""Joint transforms on item dicts: the image, every rater mask and ``valid`` move together.

Spatial transforms act on the trailing spatial axes (``masks.ndim - 1`` of them) and are exact (flips,
90-degree rotations, crops, zero padding), so masks are never interpolated. Randomness comes from the
``generator`` given to each transform (a :class:`torch.Generator`) or torch's global RNG.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

_SPATIAL_KEYS = ("image", "masks", "valid")


def _spatial(item: dict) -> tuple[int, ...]:
    if "masks" not in item:
        raise ValueError("item must hold 'masks' of shape (R, *S)")
    return tuple(item["masks"].shape[1:])


def _rand(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator))


def _randint(high: int, generator: torch.Generator | None) -> int:
    return int(torch.randint(0, max(int(high), 1), (), generator=generator))


def _map(item: dict, fn: Callable[[torch.Tensor, str], torch.Tensor]) -> dict:
    out = dict(item)
    for key in _SPATIAL_KEYS:
        if key in out:
            out[key] = fn(out[key], key)
    return out


def _patch(patch_size: Sequence[int] | int, dim: int, name: str = "patch_size") -> tuple[int, ...]:
    size = (int(patch_size),) * dim if isinstance(patch_size, int) else tuple(int(s) for s in patch_size)
    if len(size) != dim or min(size) < 1:
        raise ValueError(f"{name} must be a positive int or {dim} positive ints, got {patch_size}")
    return size


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable[[dict], dict]]):
        self.transforms = list(transforms)

    def __call__(self, item: dict) -> dict:
        for t in self.transforms:
            item = t(item)
        return item


class RandomFlip:
    """Flip each spatial axis independently with probability ``p``."""

    def __init__(self, p: float = 0.5, axes: Sequence[int] | None = None,
                 generator: torch.Generator | None = None):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p, self.axes, self.generator = p, axes, generator

    def __call__(self, item: dict) -> dict:
        dim = len(_spatial(item))
        axes = range(dim) if self.axes is None else self.axes
        flip = [a % dim for a in axes if _rand(self.generator) < self.p]
        if not flip:
            return dict(item)
        return _map(item, lambda t, key: torch.flip(t, [a - dim for a in flip]))


class RandomRot90:
    """Rotate by k x 90 degrees (k uniform in 0..3) in the plane of two spatial axes (default: last two)."""

    def __init__(self, axes: tuple[int, int] = (-2, -1), generator: torch.Generator | None = None):
        self.axes, self.generator = axes, generator

    def __call__(self, item: dict) -> dict:
        dim = len(_spatial(item))
        a, b = (x % dim - dim for x in self.axes)
        if a == b:
            raise ValueError(f"axes must name two different spatial axes, got {self.axes}")
        k = _randint(4, self.generator)
        return dict(item) if k == 0 else _map(item, lambda t, key: torch.rot90(t, k, (a, b)))


def pad_to(item: dict, size: Sequence[int], image_value: float = 0.0) -> dict:
    """Pad spatial axes symmetrically up to ``size``; padded voxels get ``valid = False``."""
    spatial = _spatial(item)
    size = _patch(size, len(spatial), "size")
    need = [max(s - n, 0) for s, n in zip(size, spatial)]
    if not any(need):
        return dict(item)
    pads: list[int] = []
    for n in reversed(need):  # F.pad lists the last axis first
        pads += [n // 2, n - n // 2]
    out = dict(item)
    if "valid" not in out:
        out["valid"] = torch.ones(spatial, dtype=torch.bool, device=item["masks"].device)
    values = {"image": image_value, "masks": 0, "valid": False}
    for key in _SPATIAL_KEYS:
        t = out[key] if key in out else None
        if t is None:
            continue
        if t.dtype == torch.bool:
            out[key] = F.pad(t.to(torch.uint8), pads, value=int(values[key])).bool()
        else:
            out[key] = F.pad(t, pads, value=values[key])
    return out


def crop_at(item: dict, start: Sequence[int], size: Sequence[int]) -> dict:
    """Crop every spatial tensor to ``size`` starting at ``start``."""
    dim = len(start)
    index = tuple(slice(int(s), int(s) + int(n)) for s, n in zip(start, size))
    return _map(item, lambda t, key: t[(Ellipsis,) + index] if t.dim() >= dim else t)


class RandomCrop:
    """Pad up to ``patch_size`` if needed, then crop a uniformly placed patch."""

    def __init__(self, patch_size: Sequence[int] | int, generator: torch.Generator | None = None):
        self.patch_size, self.generator = patch_size, generator

    def __call__(self, item: dict) -> dict:
        size = _patch(self.patch_size, len(_spatial(item)))
        item = pad_to(item, size)
        start = [_randint(n - s + 1, self.generator) for n, s in zip(_spatial(item), size)]
        return crop_at(item, start, size)


class CenterCrop:
    """Pad up to ``patch_size`` if needed, then crop the centre patch."""

    def __init__(self, patch_size: Sequence[int] | int):
        self.patch_size = patch_size

    def __call__(self, item: dict) -> dict:
        size = _patch(self.patch_size, len(_spatial(item)))
        item = pad_to(item, size)
        return crop_at(item, [(n - s) // 2 for n, s in zip(_spatial(item), size)], size)


class RandomPatch:
    """A patch centred, with probability ``fg_prob``, on a voxel some rater marked; otherwise uniform.

    Meant for volumes (3D), works in 2D. Images where no rater marked anything get a uniform patch.
    """

    def __init__(self, patch_size: Sequence[int] | int, fg_prob: float = 0.33,
                 generator: torch.Generator | None = None):
        if not 0.0 <= fg_prob <= 1.0:
            raise ValueError(f"fg_prob must be in [0, 1], got {fg_prob}")
        self.patch_size, self.fg_prob, self.generator = patch_size, fg_prob, generator

    def __call__(self, item: dict) -> dict:
        size = _patch(self.patch_size, len(_spatial(item)))
        item = pad_to(item, size)
        spatial = _spatial(item)
        start = None
        if _rand(self.generator) < self.fg_prob:
            fg = torch.nonzero(item["masks"].amax(dim=0) > 0)
            if len(fg):
                centre = fg[_randint(len(fg), self.generator)].tolist()
                start = [min(max(c - s // 2, 0), n - s) for c, s, n in zip(centre, size, spatial)]
        if start is None:
            start = [_randint(n - s + 1, self.generator) for n, s in zip(spatial, size)]
        return crop_at(item, start, size)


class IntensityScale:
    """``image * a + b`` with ``a`` uniform in ``scale`` and ``b`` uniform in ``shift`` (masks untouched)."""

    def __init__(self, scale: tuple[float, float] = (0.9, 1.1), shift: tuple[float, float] = (-0.1, 0.1),
                 generator: torch.Generator | None = None):
        self.scale, self.shift, self.generator = scale, shift, generator

    def __call__(self, item: dict) -> dict:
        a = self.scale[0] + (self.scale[1] - self.scale[0]) * _rand(self.generator)
        b = self.shift[0] + (self.shift[1] - self.shift[0]) * _rand(self.generator)
        out = dict(item)
        out["image"] = item["image"] * a + b
        return out


def augment_2d(patch_size: Sequence[int] | int | None = None,
               generator: torch.Generator | None = None) -> Compose:
    """A sensible default for 2D training: flips, 90-degree rotations, intensity scaling, optional crop."""
    steps: list[Callable] = [RandomFlip(generator=generator), RandomRot90(generator=generator),
                             IntensityScale(generator=generator)]
    if patch_size is not None:
        steps.insert(0, RandomCrop(patch_size, generator=generator))
    return Compose(steps)


# ---------------------------------------------------------------- sliding-window inference


def _gaussian_window(size: Sequence[int], sigma_scale: float = 0.125) -> torch.Tensor:
    """A separable Gaussian importance map (peak 1), floored so every voxel keeps some weight."""
    w = torch.ones((), dtype=torch.float64)
    for n in size:
        x = torch.arange(n, dtype=torch.float64) - (n - 1) / 2.0
        g = torch.exp(-0.5 * (x / max(n * sigma_scale, 1e-6)) ** 2)
        w = w.unsqueeze(-1) * g
    return torch.clamp(w / w.max(), min=1e-3)


class SlidingWindow:
    """Tiles of ``patch_size`` covering a volume, and blending weights that sum to exactly 1 per voxel.

    ``overlap`` in [0, 1) sets the step (``patch * (1 - overlap)``, at least 1); the last tile on each axis
    is aligned to the end so every voxel is covered. ``blend="gaussian"`` weights tile centres more,
    ``"constant"`` averages.
    """

    def __init__(self, patch_size: Sequence[int] | int, overlap: float = 0.5, blend: str = "gaussian"):
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        if blend not in ("gaussian", "constant"):
            raise ValueError(f"blend must be 'gaussian' or 'constant', got {blend!r}")
        self.patch_size, self.overlap, self.blend = patch_size, overlap, blend

    def tiles(self, spatial: Sequence[int]) -> list[tuple[slice, ...]]:
        """Tile slices over a (padded) spatial shape at least ``patch_size`` on every axis."""
        size = _patch(self.patch_size, len(spatial))
        starts = []
        for n, s in zip(spatial, size):
            if n < s:
                raise ValueError(f"spatial size {tuple(spatial)} is smaller than the patch {size}; pad first")
            step = max(1, int(math.floor(s * (1.0 - self.overlap))))
            axis = list(range(0, n - s + 1, step))
            if axis[-1] != n - s:
                axis.append(n - s)
            starts.append(axis)
        grid = torch.cartesian_prod(*[torch.tensor(a) for a in starts]).reshape(-1, len(spatial))
        return [tuple(slice(int(a), int(a) + b) for a, b in zip(row, size)) for row in grid]

    def window(self, spatial: Sequence[int]) -> torch.Tensor:
        """The un-normalised weight of one tile (float64)."""
        size = _patch(self.patch_size, len(spatial))
        return _gaussian_window(size) if self.blend == "gaussian" else torch.ones(size, dtype=torch.float64)

    def weight_sum(self, spatial: Sequence[int]) -> torch.Tensor:
        """Sum of tile weights at every voxel (the normaliser; positive everywhere)."""
        total = torch.zeros(tuple(spatial), dtype=torch.float64)
        w = self.window(spatial)
        for tile in self.tiles(spatial):
            total[tile] += w
        return total

    def __call__(self, volume: torch.Tensor, predictor: Callable[[torch.Tensor], torch.Tensor],
                 batch_size: int = 1, progress: bool = False) -> torch.Tensor:
        """Run ``predictor`` on tiles of ``volume`` ``(B, C, *S)`` and blend to ``(B, K, *S)``."""
        if not isinstance(volume, torch.Tensor) or volume.dim() < 3:
            got = getattr(volume, "shape", type(volume))
            raise ValueError(f"volume must be a tensor (B, C, *S), got {got}")
        spatial = tuple(volume.shape[2:])
        size = _patch(self.patch_size, len(spatial))
        padded = tuple(max(n, s) for n, s in zip(spatial, size))
        if padded != spatial:  # pad at the end; cropped away after blending
            pads: list[int] = []
            for n, p in zip(reversed(spatial), reversed(padded)):
                pads += [0, p - n]
            volume = F.pad(volume, pads)
        tiles = self.tiles(padded)
        w = self.window(padded).to(volume.device)
        out = norm = None
        it = range(0, len(tiles), max(int(batch_size), 1))
        if progress:
            from orcal._progress import progress_bar

            it = progress_bar(it, desc="sliding window", unit="batch")
        for i in it:
            group = tiles[i:i + max(int(batch_size), 1)]
            x = torch.cat([volume[(slice(None), slice(None)) + t] for t in group])
            with torch.no_grad():
                y = predictor(x)
            if y.shape[0] != x.shape[0] or tuple(y.shape[2:]) != size:
                raise ValueError(f"predictor must return (N, K, *{size}) for input {tuple(x.shape)}, "
                                 f"got {tuple(y.shape)}")
            if out is None:
                out = torch.zeros((volume.shape[0], y.shape[1]) + padded, dtype=torch.float64,
                                  device=volume.device)
                norm = torch.zeros(padded, dtype=torch.float64, device=volume.device)
            for j, t in enumerate(group):
                sl = (slice(None), slice(None)) + t
                out[sl] += y[j * volume.shape[0]:(j + 1) * volume.shape[0]].double() * w
                norm[t] += w
        out = out / norm  # every voxel's weights now sum to exactly 1
        crop = (slice(None), slice(None)) + tuple(slice(0, n) for n in spatial)
        return out[crop].to(torch.promote_types(y.dtype, torch.float32))


def sliding_window_inference(volume: torch.Tensor, predictor: Callable[[torch.Tensor], torch.Tensor],
                             patch_size: Sequence[int] | int, overlap: float = 0.5, blend: str = "gaussian",
                             batch_size: int = 1, progress: bool = False) -> torch.Tensor:
    """Predict a large ``(B, C, *S)`` volume tile by tile and blend the tiles (see :class:`SlidingWindow`)."""
    return SlidingWindow(patch_size, overlap, blend)(volume, predictor, batch_size, progress)
