"""A seeded synthetic multi-rater dataset (2D or 3D) whose ambiguity can be learned from the image.

Each case has

* a latent object: a randomly rotated ellipse (ellipsoid) deformed by a smooth random field; ``level`` is
  a signed-distance-like function in voxels, positive inside;
* an ambiguity map ``a`` in [0, 1] (a smooth random field through a sigmoid): where ``a`` is high the
  object's edge is blurred and its contrast low in the image, where it is low the edge is sharp;
* R raters: rater r marks ``level + bias_r * (0.5 + a) + (jitter + jitter_ambiguous * a) * field_r > 0``,
  a perturbed level set whose perturbation grows with the local ambiguity; ``bias_r`` runs from
  ``+bias`` (a generous rater) to ``-bias`` (a tight one); ``field_r`` is the rater's own smooth field;
* rater r leaves the image empty, as readers who do not mark a finding do in real data (LIDC), when the
  object's size rank in [0, 1] plus ``miss_noise`` times a normal draw falls below its miss level
  (``miss_prob`` interpolated from rater 0 to rater R-1): small objects are missed more, and misses of
  different raters are correlated; when every rater would miss, the surest one still marks the object;
* an image: background and object intensities, the object's edge a sigmoid whose width grows and whose
  step shrinks with ``a``, plus smooth texture and white noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

from .base import Case, MultiRaterDataset, make_item, seeded_split


@dataclass(frozen=True)
class SyntheticConfig:
    """Generator parameters (lengths in voxels unless said otherwise); defaults are tuned to LIDC."""

    radius: tuple[float, float] = (0.08, 0.28)   # mean object radius as a fraction of the smallest side
    elongation: float = 0.3                      # axis lengths vary by up to +-this fraction
    deform: float = 0.15                         # shape deformation, fraction of the radius
    ambiguity_bias: float = -0.5                 # shifts the ambiguity map: lower -> fewer blurred edges
    ambiguity_gain: float = 2.5                  # sharpness of the ambiguous / clear regions
    blur: float = 3.0                            # edge width added at full ambiguity
    contrast_loss: float = 0.7                   # fraction of the edge step lost at full ambiguity
    jitter: float = 0.3                          # rater boundary jitter at clear edges
    jitter_ambiguous: float = 3.0                # extra jitter at full ambiguity
    bias: float = 1.5                            # systematic level offset of the most generous rater
    miss_prob: tuple[float, float] = (0.03, 0.55)  # miss level (about the chance), first..last rater
    miss_noise: float = 0.25                     # how independently raters miss (0: nested, by size)
    noise: float = 0.06                          # white noise std
    texture: float = 0.05                        # smooth texture std


class SyntheticBatch(NamedTuple):
    """Arrays from :func:`make_synthetic`: images (n, 1, *S) float32, masks (n, R, *S) uint8,
    ambiguity (n, *S) float32 in [0, 1], level (n, *S) float32 (the latent signed distance)."""

    images: np.ndarray
    masks: np.ndarray
    ambiguity: np.ndarray
    level: np.ndarray


def smooth_field(rng: np.random.Generator, shape: Sequence[int], sigma: float) -> np.ndarray:
    """White noise smoothed by a Gaussian of width ``sigma`` (periodic), scaled to zero mean, unit std."""
    noise = rng.standard_normal(tuple(shape))
    freqs = [np.fft.fftfreq(n) for n in shape[:-1]] + [np.fft.rfftfreq(shape[-1])]
    grids = np.meshgrid(*freqs, indexing="ij", sparse=True)
    k2 = sum(g**2 for g in grids)
    axes = tuple(range(len(shape)))
    spectrum = np.fft.rfftn(noise, axes=axes) * np.exp(-2.0 * np.pi**2 * sigma**2 * k2)
    out = np.fft.irfftn(spectrum, s=tuple(shape), axes=axes)
    out -= out.mean()
    return out / (out.std() + 1e-12)


def _rotation(rng: np.random.Generator, dim: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q * np.sign(np.diag(r))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def generate_case(rng: np.random.Generator, shape: Sequence[int], R: int,
                  cfg: SyntheticConfig = SyntheticConfig(), centre: Sequence[float] | None = None
                  ) -> dict[str, np.ndarray]:
    """One case: ``image`` (1, *S), ``masks`` (R, *S), ``ambiguity`` and ``level`` (*S). ``centre`` places
    the object (within 5 % of each side); default: near the middle."""
    shape = tuple(int(s) for s in shape)
    side = min(shape)
    dim = len(shape)
    coords = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))
    if centre is None:
        centre = np.array(shape) / 2.0 + rng.uniform(-0.15, 0.15, dim) * np.array(shape)
    else:
        centre = np.asarray(centre, dtype=np.float64) + rng.uniform(-0.05, 0.05, dim) * np.array(shape)
    size_rank = rng.uniform()  # 0 = the smallest object allowed, 1 = the largest
    radius = side * (cfg.radius[0] + size_rank * (cfg.radius[1] - cfg.radius[0]))
    axes = radius * (1.0 + rng.uniform(-cfg.elongation, cfg.elongation, dim))
    local = np.tensordot(_rotation(rng, dim).T, coords - centre.reshape((dim,) + (1,) * dim), axes=1)
    rho = np.sqrt(sum((local[i] / axes[i]) ** 2 for i in range(dim)))
    level = radius * (1.0 - rho) + cfg.deform * radius * smooth_field(rng, shape, side / 8.0)

    amb = _sigmoid(cfg.ambiguity_gain * smooth_field(rng, shape, side / 6.0) + cfg.ambiguity_bias)

    width = 0.4 + cfg.blur * amb
    step = 1.0 - cfg.contrast_loss * amb
    image = 0.25 + 0.45 * step * _sigmoid(level / width) + 0.2 * (1.0 - step) * (level > 0)
    image = image + cfg.texture * smooth_field(rng, shape, 1.5) + cfg.noise * rng.standard_normal(shape)

    miss = np.linspace(cfg.miss_prob[0], cfg.miss_prob[1], R) if R > 1 else np.array([cfg.miss_prob[0]])
    biases = np.linspace(cfg.bias, -cfg.bias, R) if R > 1 else np.zeros(1)
    masks = np.zeros((R,) + shape, dtype=np.uint8)
    for r in range(R):
        jitter = (cfg.jitter + cfg.jitter_ambiguous * amb) * smooth_field(rng, shape, side / 12.0)
        masks[r] = (level + biases[r] * (0.5 + amb) + jitter) > 0
    # small objects are missed more, and by the same raters: a shared conspicuity plus rater noise
    margin = size_rank + cfg.miss_noise * rng.standard_normal(R) - miss
    missed = margin < 0
    if missed.all():  # a finding is in the data because someone marked it: keep the surest rater
        missed[np.argmax(margin)] = False
    masks[missed] = 0
    return {"image": image[None].astype(np.float32), "masks": masks,
            "ambiguity": amb.astype(np.float32), "level": level.astype(np.float32)}


#: Relative contrast of structures 1, 2, 3, ... (cycled): the image tells the structures apart.
STRUCTURE_GAINS = (1.0, 0.55, 1.5, 0.8)


def generate_structures_case(rng: np.random.Generator, shape: Sequence[int], R: int, C: int,
                             cfg: SyntheticConfig = SyntheticConfig()) -> dict[str, np.ndarray]:
    """A case with ``C`` structures (SPEC §11): ``image`` (1, *S) and rater label maps ``labels`` (R, *S)
    uint8 in 0..C. Each structure is an object of :func:`generate_case`, smaller, placed on a ring around
    the middle (neighbours may touch), with the raters' ambiguity of its own and no rater missing it (as
    with organs); where two structures of a
    rater overlap the later label wins, so every rater gives one label per voxel. The structures differ in
    contrast (:data:`STRUCTURE_GAINS`); texture and noise are drawn once for the image."""
    shape = tuple(int(s) for s in shape)
    side = min(shape)
    # organs, unlike nodules, are not missed: the raters disagree at the boundaries, by less than the
    # smaller objects' radius
    small = replace(cfg, radius=(max(0.12, 0.75 * cfg.radius[0]), 0.75 * cfg.radius[1]), noise=0.0, texture=0.0,
                    miss_prob=(0.0, 0.0), miss_noise=0.0, bias=0.5 * cfg.bias,
                    jitter_ambiguous=0.5 * cfg.jitter_ambiguous)
    start = rng.uniform(0, 2 * np.pi)
    image = np.full(shape, 0.25)
    labels = np.zeros((R,) + shape, dtype=np.uint8)
    for c in range(C):
        angle = start + 2 * np.pi * c / C
        offset = np.zeros(len(shape))
        offset[-2:] = 0.24 * side * np.array([np.cos(angle), np.sin(angle)])  # the ring lies in-plane
        case = generate_case(rng, shape, R, small, centre=np.array(shape) / 2.0 + offset)
        image += STRUCTURE_GAINS[c % len(STRUCTURE_GAINS)] * (case["image"][0] - 0.25)
        labels[case["masks"] > 0] = c + 1
    image += cfg.texture * smooth_field(rng, shape, 1.5) + cfg.noise * rng.standard_normal(shape)
    return {"image": image[None].astype(np.float32), "labels": labels}


def _check(n: int, R: int, shape: Sequence[int]) -> tuple[int, ...]:
    if int(n) < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 1 <= int(R) <= 255:
        raise ValueError(f"R must be in 1..255, got {R}")
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3) or min(shape) < 4:
        raise ValueError(f"shape must be 2D or 3D with every side >= 4, got {shape}")
    return shape


def _case_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index)])


def make_synthetic(n: int = 32, R: int = 5, shape: Sequence[int] = (64, 64), seed: int = 0,
                   **config) -> SyntheticBatch:
    """``n`` synthetic cases as stacked arrays (a :class:`SyntheticBatch`); ``config`` sets
    :class:`SyntheticConfig` fields. Case i depends only on (seed, i)."""
    shape = _check(n, R, shape)
    cfg = SyntheticConfig(**config)
    cases = [generate_case(_case_rng(seed, i), shape, int(R), cfg) for i in range(int(n))]
    if not cases:
        return SyntheticBatch(np.zeros((0, 1) + shape, np.float32), np.zeros((0, R) + shape, np.uint8),
                              np.zeros((0,) + shape, np.float32), np.zeros((0,) + shape, np.float32))
    keys = ("image", "masks", "ambiguity", "level")
    return SyntheticBatch(*(np.stack([c[key] for c in cases]) for key in keys))


class SyntheticMultiRater(MultiRaterDataset):
    """The synthetic generator as a dataset; items are generated on access from ``(seed, index)``.

    Options: ``n`` cases (default 64), ``R`` raters (5), ``shape`` ((64, 64); three sides for 3D), ``seed``,
    ``split`` with ``val_fraction`` / ``test_fraction`` (a seeded split of the cases), any
    :class:`SyntheticConfig` field, ``return_latent`` (add "ambiguity" and "level" to each item), and
    ``num_structures`` (C > 1: each item's ``masks`` are rater label maps in 0..C, with ``num_structures``
    in the item; :func:`generate_structures_case`); ``structures`` is its deprecated name (warns; removed in
    the next release), not the label list the other loaders' ``structures`` is.
    """

    name = "synthetic"
    published = "orcal itself (generated, nothing to download)"

    def __init__(self, root=None, split: str | None = None, task: str | None = None, n: int = 64, R: int = 5,
                 shape: Sequence[int] = (64, 64), seed: int = 0, val_fraction: float = 0.1,
                 test_fraction: float = 0.2, transform: Callable | None = None, return_latent: bool = False,
                 num_structures: int | None = None, structures: int | None = None, **config):
        from orcal.ops.checks import renamed

        if task not in (None, "default"):
            raise ValueError(f"unknown task {task!r} for dataset 'synthetic'; valid tasks: default")
        self.shape = _check(n, R, shape)
        if isinstance(structures, (str, Sequence)):  # the other loaders' label selection (--structures)
            raise ValueError(f"dataset 'synthetic' generates its structures: give their number, num_structures=C "
                             f"(--option num_structures=C), not a label selection structures={structures!r}")
        C = renamed("num_structures", num_structures, "structures", structures, "dataset 'synthetic'")
        C = 1 if C is None else C
        if isinstance(C, bool) or not isinstance(C, int) or not 1 <= C <= 8:
            raise ValueError(f"num_structures must be an int in 1..8, got {C!r}")
        if C > 1 and return_latent:
            raise ValueError("return_latent describes one object; it cannot be used with num_structures > 1")
        self.num_structures = C
        self.R = int(R)
        self.seed = int(seed)
        self.config = SyntheticConfig(**config)
        self.return_latent = return_latent
        cases = [Case(f"synthetic-{i:05d}", str(i), i) for i in range(int(n))]
        super().__init__(seeded_split(cases, split, val_fraction, test_fraction, seed), split, transform)

    @property
    def display_name(self) -> str:
        C = self.num_structures
        return f"Synthetic (R={self.R})" if C == 1 else f"Synthetic (R={self.R}, C={C})"

    def load_case(self, case: Case) -> dict:
        if self.num_structures > 1:
            c = generate_structures_case(_case_rng(self.seed, case.info), self.shape, self.R, self.num_structures,
                                         self.config)
            return {**make_item(c["image"], c["labels"], case.id), "num_structures": self.num_structures}
        c = generate_case(_case_rng(self.seed, case.info), self.shape, self.R, self.config)
        item = make_item(c["image"], c["masks"], case.id)
        if self.return_latent:
            import torch

            item["ambiguity"] = torch.from_numpy(c["ambiguity"])
            item["level"] = torch.from_numpy(c["level"])
        return item
