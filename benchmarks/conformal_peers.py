"""orcal's conformal tools against the general conformal libraries (MAPIE, puncc, TorchCP) on the same predictions.

Every tool gets the same foreground probabilities ``p`` of a pool of test images (a small model trained with
orcal's own training code, or the raters' fraction ``k / R`` with ``--probs oracle``) and the same random
splits of the images into calibration and test halves (whole patients kept together on LIDC). At ``alpha``:

* **Volume intervals** per image. orcal's :class:`~orcal.metrics.ConformalVolume` (``mu ± q sigma`` from the
  predicted volume distribution, calibrated on every rater of each calibration image) against split-conformal
  regression (absolute residual) with the expected volume ``mu = sum p`` as the point prediction and one rater
  drawn at random per calibration image as the label (the same draw for every peer). Images are exchangeable,
  so both are valid; they differ in width and in where the width goes.
* **Voxel sets** (what a user does with a classification library): LAC sets ``{y: p_y >= 1 - q}`` calibrated
  on the flattened voxels of the calibration images, labelled by the image's drawn rater, as if voxels were
  exchangeable. Their guarantee is marginal over voxels; it says nothing about each image.
* **Foreground masks**: split conformal on the flattened foreground voxels (score ``1 - p``, the class-1 LAC
  score) gives a threshold covering ``1 - alpha`` of the pooled foreground voxels, against orcal's
  :class:`~orcal.metrics.ConformalRiskControl`, which bounds the expected false-negative rate of a new image
  against a random rater. Both masks are ``p >= lambda``; they differ in what ``lambda`` guarantees.

Usage::

    python -m benchmarks.conformal_peers [--root ../shared/data/lidc-idri-slices] [--splits 100] [--alpha 0.1]
        [--probs model|oracle] [--out docs/results/conformal_peers] [--quick]

Writes ``<out>/<dataset>.md`` (tables, the command line and package versions) and ``<out>/<dataset>.png``.
"""

from __future__ import annotations

import argparse
import importlib
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

#: The peers, each with its import name.
PEERS = {"mapie": "mapie", "puncc": "deel.puncc", "torchcp": "torchcp"}
#: The volume-interval methods, in table order (a peer's rows appear when it is installed).
VOLUME_METHODS = ("orcal ConformalVolume", "MAPIE SplitConformalRegressor", "TorchCP SplitPredictor(ABS)")
#: The voxel-set methods.
SET_METHODS = ("MAPIE SplitConformalClassifier(lac)", "TorchCP SplitPredictor(LAC)")
#: The foreground-mask methods.
MASK_METHODS = ("orcal ConformalRiskControl", "MAPIE lac on foreground voxels", "TorchCP LAC on foreground voxels")
_OWNER = {"MAPIE": "mapie", "TorchCP": "torchcp", "orcal": None}
RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results" / "conformal_peers"


def peer_versions() -> dict[str, str | None]:
    """``{peer: version}`` of the installed peers; None for a peer that is not importable here."""
    out: dict[str, str | None] = {}
    for name, module in PEERS.items():
        try:
            mod = importlib.import_module(module)
        except ImportError:
            out[name] = None
            continue
        out[name] = str(getattr(mod, "__version__", "installed"))
    return out


def _available(method: str, versions: dict[str, str | None]) -> bool:
    owner = _OWNER[method.split()[0]]
    return owner is None or versions.get(owner) is not None


# --------------------------------------------------------------------------------------------------- the data


@dataclass
class Pool:
    """Test images every tool sees: ``probs`` ``(N, *S)`` float32, ``masks`` ``(N, R, *S)`` uint8, ``groups``
    (images of one group, a patient, always fall on the same side of a split) and how ``probs`` were made."""

    name: str
    probs: torch.Tensor
    masks: torch.Tensor
    groups: list[str]
    source: str
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.probs.shape[0] != self.masks.shape[0] or self.probs.shape[1:] != self.masks.shape[2:]:
            raise ValueError(f"probs {tuple(self.probs.shape)} and masks {tuple(self.masks.shape)} must be "
                             "(N, *S) and (N, R, *S)")
        if len(self.groups) != self.probs.shape[0]:
            raise ValueError(f"{len(self.groups)} groups for {self.probs.shape[0]} images")


def oracle_probs(masks: torch.Tensor) -> torch.Tensor:
    """The raters' fraction ``k / R`` of every voxel, ``(N, *S)`` float32."""
    return masks.float().mean(1)


def _predict_pool(result, dataset) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from orcal.train import predict

    ids, probs, masks = [], [], []
    for ident, p, m, _ in predict(result, dataset, readout="expected", device="cpu", batch_size=32):
        ids.append(ident)
        probs.append(p)
        masks.append(m)
    return torch.stack(probs), torch.stack(masks), ids


def synthetic_pool(n_train: int = 300, n_pool: int = 400, R: int = 5, shape: tuple[int, ...] = (64, 64),
                   epochs: int = 6, probs: str = "model", seed: int = 0) -> Pool:
    """orcal's synthetic multi-rater data: a ``unet-small`` ordinal model trained on ``n_train`` images
    (seed ``seed``), its expected readout ``E[k] / R`` on ``n_pool`` other images (seed ``seed + 1``)."""
    from orcal.data import load_dataset

    pool_ds = load_dataset("synthetic", n=n_pool, R=R, shape=tuple(shape), seed=seed + 1)
    if probs == "oracle":
        masks = torch.stack([pool_ds[i]["masks"] for i in range(len(pool_ds))])
        ids = [pool_ds[i]["id"] for i in range(len(pool_ds))]
        return Pool("synthetic", oracle_probs(masks), masks, ids, f"oracle k / R on {n_pool} synthetic images")
    from orcal.train import TrainConfig, train

    start = time.perf_counter()
    cfg = TrainConfig(dataset="synthetic", dataset_options={"n": n_train, "R": R, "shape": tuple(shape),
                                                             "seed": seed},
                      train_split=None, val_split=None, arch="unet-small", epochs=epochs, batch_size=16, lr=3e-3,
                      device="cpu", seed=seed)
    result = train(cfg, progress=False)
    seconds = time.perf_counter() - start
    p, masks, ids = _predict_pool(result, pool_ds)
    side = "x".join(map(str, shape))
    return Pool("synthetic", p, masks, ids,
                f"unet-small (ordinal head, expected readout) trained by orcal.train on {n_train} synthetic {side} "
                f"images, R = {R}, {epochs} epochs ({seconds:.0f} s on CPU); {n_pool} held-out images")


def lidc_pool(root: str, crop: int = 64, epochs: int = 3, probs: str = "model", seed: int = 0) -> Pool:
    """LIDC-IDRI slices (``lidc_slices``, centre crop ``crop``): a ``unet-small`` trained on the loader's train
    patients, predictions on its val + test patients, grouped by patient."""
    from orcal.data import load_dataset

    pools = [load_dataset("lidc_slices", root=root, split=s, crop=crop, seed=seed) for s in ("val", "test")]
    items = [ds[i] for ds in pools for i in range(len(ds))]
    masks = torch.stack([it["masks"] for it in items])
    ids = [it["id"] for it in items]
    groups = [i.split("/")[0] for i in ids]
    n_patients = len(set(groups))
    if probs == "oracle":
        return Pool("lidc", oracle_probs(masks), masks, groups,
                    f"oracle k / R on {len(ids)} LIDC-IDRI slices of {n_patients} patients (crop {crop})")
    from torch.utils.data import ConcatDataset

    from orcal.train import TrainConfig, train

    start = time.perf_counter()
    cfg = TrainConfig(dataset="lidc_slices", root=root, dataset_options={"crop": crop, "seed": seed},
                      train_split="train", val_split=None, arch="unet-small", epochs=epochs, batch_size=16, lr=3e-3,
                      device="cpu", seed=seed)
    result = train(cfg, progress=False)
    seconds = time.perf_counter() - start
    p, masks2, ids2 = _predict_pool(result, ConcatDataset(pools))
    if ids2 != ids or not torch.equal(masks2, masks):
        raise RuntimeError("the predicted LIDC images differ from the pool read for the raters")
    n_train = len(load_dataset("lidc_slices", root=root, split="train", crop=crop, seed=seed))
    return Pool("lidc", p, masks, groups,
                f"unet-small (ordinal head, expected readout) trained by orcal.train on the {n_train} LIDC-IDRI "
                f"train slices (crop {crop}), {epochs} epochs ({seconds:.0f} s on CPU); {len(ids)} val + test "
                f"slices of {n_patients} patients")


def group_splits(groups: list[str], splits: int, cal_fraction: float = 0.5, seed: int = 0
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
    """``splits`` random (calibration, test) index pairs; each group's images fall on one side."""
    names = sorted(set(groups))
    index = {g: i for i, g in enumerate(names)}
    gid = np.array([index[g] for g in groups])
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(splits):
        cal_groups = rng.permutation(len(names))[: max(1, round(cal_fraction * len(names)))]
        cal = np.isin(gid, cal_groups)
        out.append((np.flatnonzero(cal), np.flatnonzero(~cal)))
    return out


# ------------------------------------------------------------------------------------------- volume intervals


class _Identity:
    """A fitted scikit-learn regressor/classifier whose input is already its prediction (MAPIE's ``prefit``):
    the regressor returns column 0 (the expected volume), the classifier ``[1 - p, p]``."""

    _estimator_type = "regressor"

    def __init__(self, kind: str = "regressor") -> None:
        self.kind = kind
        self._estimator_type = kind
        self.classes_ = np.array([0, 1])
        self.n_features_in_ = 1

    def __sklearn_is_fitted__(self) -> bool:
        return True

    def __sklearn_tags__(self):
        from sklearn.utils import ClassifierTags, RegressorTags, Tags, TargetTags

        tags = Tags(estimator_type=self.kind, target_tags=TargetTags(required=True))
        if self.kind == "classifier":
            tags.classifier_tags = ClassifierTags()
        else:
            tags.regressor_tags = RegressorTags()
        return tags

    def get_params(self, deep: bool = True) -> dict:
        return {"kind": self.kind}

    def set_params(self, **params):
        self.kind = params.get("kind", self.kind)
        return self

    def fit(self, X, y):
        return self

    def predict(self, X):
        x = np.asarray(X, dtype=np.float64)[:, 0]
        return x if self.kind == "regressor" else (x >= 0.5).astype(int)

    def predict_proba(self, X):
        x = np.asarray(X, dtype=np.float64)[:, 0]
        return np.stack([1 - x, x], 1)


def volume_interval(method: str, mu_cal: np.ndarray, y_cal: np.ndarray, mu_test: np.ndarray, alpha: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """A peer's split-conformal interval (absolute residual) around ``mu_test``, calibrated on ``(mu_cal,
    y_cal)``: one label per calibration image."""
    if method.startswith("MAPIE"):
        from mapie.regression import SplitConformalRegressor

        reg = SplitConformalRegressor(_Identity("regressor"), confidence_level=1 - alpha, prefit=True)
        reg.conformalize(mu_cal[:, None], y_cal)
        _, bounds = reg.predict_interval(mu_test[:, None])
        return bounds[:, 0, 0], bounds[:, 1, 0]
    if method.startswith("TorchCP"):
        from torchcp.regression.predictor import SplitPredictor
        from torchcp.regression.score import ABS
        from torchcp.utils import calculate_conformal_value

        pred = SplitPredictor(ABS(), alpha=alpha)
        scores = pred.calculate_score(torch.from_numpy(mu_cal)[:, None], torch.from_numpy(y_cal))
        q = torch.as_tensor(calculate_conformal_value(scores, alpha)).reshape(-1)
        bounds = pred.generate_intervals(torch.from_numpy(mu_test)[:, None], q)
        return bounds[:, 0, 0].numpy(), bounds[:, 0, 1].numpy()
    raise ValueError(f"unknown volume method {method!r}; choose from {VOLUME_METHODS[1:]}")


def _subset(stats, idx: np.ndarray):
    from orcal.metrics.volume import VolumeStats

    t = torch.from_numpy(idx)
    return VolumeStats(stats.mean[t], stats.var[t], stats.raters[t], stats.voxel_volume[t])


def volume_split(pool_stats, cal: np.ndarray, test: np.ndarray, drawn: np.ndarray, alpha: float,
                 methods: tuple[str, ...]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{method: (low, high)}`` in voxels for the ``test`` images; ``drawn[i]`` is the rater whose volume is
    calibration image ``cal[i]``'s label for the peers (orcal uses every rater)."""
    from orcal.metrics import ConformalVolume

    mu = pool_stats.mean.numpy()
    ml = (pool_stats.voxel_volume / 1000.0).numpy()  # ConformalVolume works in mL
    y = pool_stats.raters.numpy()
    out = {}
    for method in methods:
        if method.startswith("orcal"):
            cv = ConformalVolume()
            cv.update_stats(_subset(pool_stats, cal))
            cv.fit(alpha)
            lo, hi = cv.intervals(_subset(pool_stats, test))
            out[method] = (lo[:, 0].numpy() / ml[test], hi[:, 0].numpy() / ml[test])
        else:
            lo, hi = volume_interval(method, mu[cal], y[cal, drawn], mu[test], alpha)
            out[method] = (np.maximum(lo, 0.0), hi)  # a volume is never negative: the same clamp as orcal's
    return out


# ------------------------------------------------------------------------------------- voxel sets and masks


def voxel_sets(method: str, p_cal: np.ndarray, y_cal: np.ndarray, p_test: np.ndarray, alpha: float
               ) -> np.ndarray:
    """LAC sets of the test voxels, ``(M, 2)`` bool (``[:, 0]``: background in the set), calibrated on the
    flattened calibration voxels ``(p_cal, y_cal)`` as exchangeable points."""
    if method.startswith("MAPIE"):
        from mapie.classification import SplitConformalClassifier

        clf = SplitConformalClassifier(_Identity("classifier"), confidence_level=1 - alpha, conformity_score="lac",
                                       prefit=True)
        clf.conformalize(p_cal[:, None], y_cal)
        _, sets = clf.predict_set(p_test[:, None])
        return sets[:, :, 0].astype(bool)
    if method.startswith("TorchCP"):
        from torchcp.classification.predictor import SplitPredictor
        from torchcp.classification.score import LAC

        pred = SplitPredictor(LAC(score_type="identity"), alpha=alpha)
        two = lambda p: torch.from_numpy(np.stack([1 - p, p], 1))  # noqa: E731
        pred.calculate_threshold(two(p_cal), torch.from_numpy(y_cal.astype(np.int64)), alpha)
        return pred.predict_with_logits(two(p_test)).numpy().astype(bool)
    raise ValueError(f"unknown voxel-set method {method!r}; choose from {SET_METHODS}")


def foreground_mask(method: str, p_fg: np.ndarray, p_test: np.ndarray, alpha: float) -> np.ndarray:
    """The mask of the test voxels ``p_test`` ``(M,)`` that split conformal on the flattened foreground voxels
    gives (their probabilities ``p_fg``, label 1, the LAC score ``1 - p``): bool ``(M,)``, ``p >= 1 - q``."""
    labels = np.ones(p_fg.shape[0], dtype=np.int64)
    if method.startswith("MAPIE"):
        import warnings

        from mapie.classification import SplitConformalClassifier

        clf = SplitConformalClassifier(_Identity("classifier"), confidence_level=1 - alpha, conformity_score="lac",
                                       prefit=True)
        with warnings.catch_warnings():  # "less labels than your training dataset": one class on purpose
            warnings.simplefilter("ignore", UserWarning)
            clf.conformalize(p_fg[:, None], labels)
        return clf.predict_set(p_test[:, None])[1][:, 1, 0].astype(bool)
    if method.startswith("TorchCP"):
        from torchcp.classification.predictor import SplitPredictor
        from torchcp.classification.score import LAC

        pred = SplitPredictor(LAC(score_type="identity"), alpha=alpha)
        two = lambda p: torch.from_numpy(np.stack([1 - p, p], 1))  # noqa: E731
        pred.calculate_threshold(two(p_fg), torch.from_numpy(labels), alpha)
        return pred.predict_with_logits(two(p_test)).numpy()[:, 1].astype(bool)
    raise ValueError(f"unknown mask method {method!r}; choose from {MASK_METHODS[1:]}")


def image_fnr(pred: torch.Tensor, masks: torch.Tensor) -> np.ndarray:
    """Each image's false-negative rate of the mask ``pred`` ``(N, *S)`` against a random rater (mean over
    raters; 0 for a rater with an empty mask), as :func:`orcal.metrics.conformal.fnr_curves` defines it."""
    pred = pred.bool().unsqueeze(1)
    m = masks.bool()
    fg = m.flatten(2).sum(2).double()
    hit = (m & pred).flatten(2).sum(2).double()
    return torch.where(fg > 0, 1 - hit / fg.clamp_min(1), 0.0).mean(1).numpy()


def pooled_fnr(pred: torch.Tensor, masks: torch.Tensor) -> float:
    """The false-negative rate of the mask ``pred`` over every (voxel, rater) foreground pair, pooled."""
    pred = pred.bool().unsqueeze(1)
    m = masks.bool()
    return float(1 - (m & pred).sum() / m.sum().clamp_min(1))


# ------------------------------------------------------------------------------------------------- the study


@dataclass
class Study:
    """Per split and method, the numbers the report averages."""

    alpha: float
    volume: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    sets: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    masks: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    # for the figure: one split's volume widths and every split's per-image values
    widths: dict[str, np.ndarray] = field(default_factory=dict)
    sigma: np.ndarray | None = None
    set_coverage: dict[str, list[np.ndarray]] = field(default_factory=dict)
    mask_fnr: dict[str, list[np.ndarray]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def _add(table: dict, method: str, **values: float) -> None:
    row = table.setdefault(method, {})
    for k, v in values.items():
        row.setdefault(k, []).append(float(v))


def run_study(pool: Pool, alpha: float = 0.1, splits: int = 100, seed: int = 0,
              versions: dict[str, str | None] | None = None, voxel_splits: int | None = None) -> Study:
    """Every method on the same ``splits`` calibration/test splits of ``pool`` (``voxel_splits``: the first
    that many for the voxel-level parts, default all)."""
    from orcal.metrics import ConformalRiskControl
    from orcal.metrics.volume import volume_stats

    versions = peer_versions() if versions is None else versions
    study = Study(alpha)
    stats = volume_stats(pool.probs, pool.masks)
    sigma = stats.var.sqrt().clamp_min(1.0).numpy()
    y = stats.raters.numpy()  # (N, R) voxels
    R = y.shape[1]
    third = np.quantile(sigma, [1 / 3, 2 / 3])
    vol_methods = tuple(m for m in VOLUME_METHODS if _available(m, versions))
    set_methods = tuple(m for m in SET_METHODS if _available(m, versions))
    mask_methods = tuple(m for m in MASK_METHODS if _available(m, versions))
    probs_np = pool.probs.numpy()
    masks_np = pool.masks.numpy().astype(bool)
    rng = np.random.default_rng(seed + 1)
    voxel_splits = splits if voxel_splits is None else min(voxel_splits, splits)
    for s, (cal, test) in enumerate(group_splits(pool.groups, splits, seed=seed)):
        drawn = rng.integers(R, size=cal.shape[0])  # each calibration image's rater, shared by every peer
        t0 = time.perf_counter()
        for method, (lo, hi) in volume_split(stats, cal, test, drawn, alpha, vol_methods).items():
            cov = ((y[test] >= lo[:, None]) & (y[test] <= hi[:, None])).mean(1)  # of a random rater, per image
            width = hi - lo
            low, high = sigma[test] <= third[0], sigma[test] > third[1]
            _add(study.volume, method, coverage=cov.mean(), width=width.mean(), median_width=np.median(width),
                 coverage_low_sigma=cov[low].mean(), coverage_high_sigma=cov[high].mean(),
                 every_rater=(cov == 1).mean())
            if s == 0:
                study.widths[method] = width
                study.sigma = sigma[test]
        study.seconds["volume"] = study.seconds.get("volume", 0.0) + time.perf_counter() - t0
        if s >= voxel_splits:
            continue
        t0 = time.perf_counter()
        p_cal = probs_np[cal].reshape(-1)
        y_cal = masks_np[cal, drawn].reshape(-1)
        p_test = probs_np[test].reshape(len(test), -1)
        m_test = masks_np[test].reshape(len(test), R, -1)
        for method in set_methods:
            sets = voxel_sets(method, p_cal, y_cal.astype(np.int64), p_test.reshape(-1), alpha)
            sets = sets.reshape(len(test), 1, -1, 2)
            covered = np.where(m_test, sets[..., 1], sets[..., 0])  # (n, R, V): the rater's label is in the set
            per_image = covered.mean((1, 2))
            _add(study.sets, method, pooled=covered.mean(), mean_image=per_image.mean(),
                 below=(per_image < 1 - alpha).mean(),
                 size=sets.sum(-1).mean(), empty=(sets.sum(-1) == 0).mean())
            study.set_coverage.setdefault(method, []).append(per_image)
        p_t, m_t = pool.probs[test], pool.masks[test]
        for method in mask_methods:
            if method.startswith("orcal"):
                crc = ConformalRiskControl()
                crc.update(pool.probs[cal], pool.masks[cal])
                crc.fit(alpha)
                pred = crc.predict(p_t)
            else:
                pred = torch.from_numpy(foreground_mask(method, p_cal[y_cal], p_test.reshape(-1), alpha))
                pred = pred.view(p_t.shape)
            lam = float(p_t[pred].min()) if pred.any() else 1.0  # the mask is p >= lambda for every tool
            fnr = image_fnr(pred, m_t)
            has_fg = m_t.flatten(1).bool().any(1).numpy()  # bool: a uint8 index would pick images 0 and 1
            _add(study.masks, method, threshold=lam, mean_image=fnr.mean(), pooled=pooled_fnr(pred, m_t),
                 above=(fnr[has_fg] > alpha).mean(),
                 size=float(pred.flatten(1).sum(1).double().mean()))
            study.mask_fnr.setdefault(method, []).append(fnr[has_fg])
        study.seconds["voxels"] = study.seconds.get("voxels", 0.0) + time.perf_counter() - t0
    return study


# ------------------------------------------------------------------------------------------------- the report


def _mean(values: list[float]) -> float:
    return float(np.mean(values))


def _pooled_quantile(per_split: list[np.ndarray], q: float) -> float:
    """The ``q`` quantile of the per-image values of every split together."""
    return float(np.quantile(np.concatenate(per_split), q))


def _sd(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def markdown(pool: Pool, study: Study, meta: dict) -> str:
    """The report of one pool: header (command, versions, data), the three tables and what they mean."""
    a = study.alpha
    target = 1 - a
    n, R = pool.masks.shape[:2]
    S = "x".join(map(str, pool.probs.shape[1:]))
    splits = len(next(iter(study.volume.values()))["coverage"])
    voxel_splits = len(next(iter(study.masks.values()))["threshold"]) if study.masks else 0
    versions = ", ".join(f"{k} {v}" if v else f"{k}: not installed" for k, v in meta["versions"].items())
    lines = [
        f"# Conformal peers on {pool.name}: orcal vs MAPIE / puncc / TorchCP",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Packages: orcal {meta['orcal']}, torch {meta['torch']}, numpy {meta['numpy']}, {versions}. "
        f"Python {meta['python']}, {meta['date']}, {meta['runtime_s']:.0f} s in all.",
        "",
    ]
    lines += [f"Note: {note}" for note in meta.get("notes", [])]
    lines += [
        "",
        f"Data: {pool.source}. {n} images of {S} voxels, R = {R} raters. Every tool sees the same probabilities and "
        f"the same {splits} random splits of the images into calibration and test halves"
        + (" (whole patients on one side)" if len(set(pool.groups)) < n else "")
        + f"; alpha = {a}. The peers' label on a calibration image is one rater drawn at random (the same draw "
        "for every peer); orcal uses every rater of the image. Coverage is of a random rater of each test "
        "image (the mean over its raters). Numbers: the mean over splits (± the standard deviation over splits); "
        "percentiles and the worst image: over the test images of every split together."
        + (" The images are slices of patients: the patients, not the slices, are the exchangeable units, so "
           "a guarantee stated per image holds here for the slices' mean only approximately."
           if len(set(pool.groups)) < n else ""),
        "",
        "## Volume intervals per image",
        "",
        f"Target: a random rater's volume (voxels) inside the interval with probability ≥ {target:g}. The peers "
        "run split-conformal regression with the absolute residual around the expected volume `sum p`: one "
        "width for every image. orcal's `ConformalVolume` scales its width with the predicted spread `sigma = "
        "sqrt(sum p(1 - p))`. Low / high sigma: the test images in the lowest / highest third of the pool's "
        "sigma.",
        "",
        "| method | coverage | mean width | median width | coverage, low sigma | coverage, high sigma | "
        "every rater covered |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, v in study.volume.items():
        lines.append(f"| {method} | {_mean(v['coverage']):.3f} ± {_sd(v['coverage']):.3f} | {_mean(v['width']):.1f} "
                     f"| {_mean(v['median_width']):.1f} | {_mean(v['coverage_low_sigma']):.3f} | "
                     f"{_mean(v['coverage_high_sigma']):.3f} | {_mean(v['every_rater']):.3f} |")
    if study.sets:
        lines += [
            "",
            "## Voxel sets (voxels treated as exchangeable)",
            "",
            f"LAC sets `{{y : p_y >= 1 - q}}` calibrated on the flattened voxels of the calibration images "
            f"({voxel_splits} splits). Their guarantee: a random test *voxel* (pooled over images) gets its "
            f"rater's label in the set with probability ≥ {target:g}. Per image: the fraction of the image's "
            "(voxel, rater) pairs covered. Set size: mean labels per voxel (0 = empty set).",
            "",
            "| method | pooled voxel coverage | mean image coverage | images below "
            f"{target:g} | 10th percentile image | worst image | set size | empty sets |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for method, v in study.sets.items():
            per = study.set_coverage[method]
            lines.append(f"| {method} | {_mean(v['pooled']):.3f} | {_mean(v['mean_image']):.3f} | "
                         f"{100 * _mean(v['below']):.1f} % | {_pooled_quantile(per, 0.1):.3f} | "
                         f"{_pooled_quantile(per, 0):.3f} | "
                         f"{_mean(v['size']):.3f} | {100 * _mean(v['empty']):.1f} % |")
    if study.masks:
        lines += [
            "",
            "## Foreground masks `p >= lambda`",
            "",
            f"orcal's `ConformalRiskControl` guarantees E[FNR of a new image against a random rater] ≤ {a:g} "
            "(images exchangeable). The peers' split conformal on the flattened foreground voxels guarantees that "
            f"a random foreground (voxel, rater) pair, pooled over images, is missed with probability ≤ {a:g}. "
            "Images with FNR > alpha: among test images with some rater's foreground. Mask size: voxels per image.",
            "",
            "| method | lambda (smallest p kept) | mean image FNR (orcal's target) | "
            "pooled voxel FNR (the peers' target) | "
            f"images with FNR > {a:g} | 90th percentile image | worst image | mask size |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for method, v in study.masks.items():
            per = study.mask_fnr[method]
            lines.append(f"| {method} | {_mean(v['threshold']):.3f} | {_mean(v['mean_image']):.3f} ± "
                         f"{_sd(v['mean_image']):.3f} | {_mean(v['pooled']):.3f} | {100 * _mean(v['above']):.1f} % | "
                         f"{_pooled_quantile(per, 0.9):.3f} | {_pooled_quantile(per, 1):.3f} | "
                         f"{_mean(v['size']):.1f} |")
    lines += ["", "## Reading", ""] + reading(study) + [""]
    if meta.get("figure"):
        lines += [f"![per-image coverage and widths]({meta['figure']})", ""]
    return "\n".join(lines)


def _merged(table: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    """The rows of ``table`` as means; peers whose numbers agree to the digits shown share one row ("MAPIE ... =
    TorchCP ..."); orcal's rows stay apart."""
    out: dict[str, dict[str, float]] = {}
    for method, row in table.items():
        means = {k: _mean(v) for k, v in row.items()}
        same = next((m for m, v in out.items() if not m.startswith("orcal") and not method.startswith("orcal")
                     and all(abs(v[k] - means[k]) < 5e-4 * max(1.0, abs(means[k])) for k in means)), None)
        if same is None:
            out[method] = means
        else:
            out[f"{same} = {method}"] = out.pop(same)
    return out


def reading(study: Study) -> list[str]:
    """What the measured numbers say, sentence by sentence (written from the numbers, not in advance)."""
    a = study.alpha
    out = []
    vol = _merged(study.volume)
    orc = vol.get(VOLUME_METHODS[0])
    for method, v in vol.items():
        if method == VOLUME_METHODS[0] or orc is None:
            continue
        out.append(f"- Volume: {method} covers {v['coverage']:.3f} (valid: images are exchangeable) with mean width "
                   f"{v['width']:.1f} voxels; orcal covers {orc['coverage']:.3f} with {orc['width']:.1f} "
                   f"({100 * (orc['width'] / v['width'] - 1):+.0f} %). The one width covers "
                   f"{v['coverage_low_sigma']:.3f} of the most confident third of the images and "
                   f"{v['coverage_high_sigma']:.3f} of the most ambiguous third; orcal's "
                   f"{orc['coverage_low_sigma']:.3f} and {orc['coverage_high_sigma']:.3f}. Neither promises "
                   "coverage per group of images: only on average over images.")
    for method, row in _merged(study.sets).items():
        worst = _pooled_quantile(study.set_coverage[method.split(" = ")[0]], 0)
        out.append(f"- Voxel sets: {method} holds its voxel-level promise ({row['pooled']:.3f} pooled), but "
                   f"{100 * row['below']:.0f} % of the test images fall below {1 - a:g} and the worst is covered at "
                   f"{worst:.3f}: the voxels of one image are "
                   "correlated, so a guarantee over pooled voxels says nothing about a given image.")
    masks = _merged(study.masks)
    orc = masks.get(MASK_METHODS[0])
    for method, v in masks.items():
        if method == MASK_METHODS[0] or orc is None:
            continue
        side = "within" if v["mean_image"] <= a else "above"
        runs = study.masks[MASK_METHODS[0]]["mean_image"]
        se = _sd(runs) / math.sqrt(len(runs))
        out.append(f"- Masks: {method} holds its pooled voxel FNR at {v['pooled']:.3f}; its mean image FNR, "
                   f"{v['mean_image']:.3f}, is {side} alpha on this data, which nothing in its calibration "
                   "guarantees (the pooled rate weighs each image by its foreground size, the image rate weighs "
                   f"images equally). orcal's threshold gives a mean image FNR of {orc['mean_image']:.3f} "
                   f"(standard error over splits {se:.3f}; guaranteed ≤ {a:g} in expectation over images) and a pooled "
                   f"voxel FNR of {orc['pooled']:.3f} "
                   f"(not its target); mask size {orc['size']:.0f} against {v['size']:.0f} voxels. The guarantee "
                   f"is an expectation, not a bound per image: {100 * orc['above']:.0f} % of the images exceed "
                   f"{a:g} (90th percentile {_pooled_quantile(study.mask_fnr[MASK_METHODS[0]], 0.9):.3f}).")
    return out


def figure(pool: Pool, study: Study, path: Path) -> None:
    """Width against the predicted spread (one split), and the per-image coverage / FNR over all splits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    ax = axes[0]
    for method, w in study.widths.items():
        ax.scatter(study.sigma, w, s=6, alpha=0.6, label=method)
    ax.set_xlabel("predicted volume sd (voxels)")
    ax.set_ylabel("interval width (voxels)")
    ax.set_title("volume intervals (one split)")
    ax.legend(fontsize=7)
    ax = axes[1]
    bins = np.linspace(0, 1, 41)
    for method, per in study.set_coverage.items():
        ax.hist(np.concatenate(per), bins=bins, alpha=0.5, label=method)
    ax.axvline(1 - study.alpha, color="k", ls="--", lw=1)
    ax.set_xlabel("per-image coverage of LAC voxel sets")
    ax.set_ylabel("test images (all splits)")
    ax.set_title("voxel sets: per image")
    ax.legend(fontsize=7)
    ax = axes[2]
    for method, per in study.mask_fnr.items():
        ax.hist(np.concatenate(per), bins=bins, alpha=0.5, label=method)
    ax.axvline(study.alpha, color="k", ls="--", lw=1)
    ax.set_xlabel("per-image FNR vs a random rater")
    ax.set_title("foreground masks: per image")
    ax.legend(fontsize=7)
    fig.suptitle(f"{pool.name}: {pool.masks.shape[0]} images, alpha = {study.alpha}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_report(pool: Pool, study: Study, meta: dict, out: Path | None) -> str:
    """Write ``<out>/<pool>.md`` and ``.png`` (nothing when ``out`` is None); returns the markdown."""
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        figure(pool, study, out / f"{pool.name}.png")
        meta = {**meta, "figure": f"{pool.name}.png"}
    text = markdown(pool, study, meta)
    if out is not None:
        (out / f"{pool.name}.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.conformal_peers", description=__doc__.splitlines()[0])
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--splits", type=int, default=None,
                        help="random calibration/test splits of the images (default 100; 5 with --quick)")
    parser.add_argument("--voxel-splits", type=int, default=None,
                        help="of those, how many the voxel-level parts use (default: all)")
    parser.add_argument("--probs", choices=("model", "oracle"), default="model",
                        help="a unet-small trained by orcal.train (default), or the raters' fraction k / R")
    parser.add_argument("--root", default=None, help="LIDC-IDRI slices (lidc_slices layout): also run on them")
    parser.add_argument("--crop", type=int, default=64, help="LIDC centre crop")
    parser.add_argument("--no-synthetic", action="store_true", help="only the --root data")
    parser.add_argument("--quick", action="store_true", help="tiny data, few splits: a smoke test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS), help="folder for <dataset>.md and .png ('-': print only)")
    args = parser.parse_args(argv)
    if not 0 < args.alpha < 1:
        parser.error(f"--alpha must lie in (0, 1), got {args.alpha}")
    if args.splits is None:
        args.splits = 5 if args.quick else 100
    if args.splits < 1:
        parser.error(f"--splits must be >= 1, got {args.splits}")
    torch.set_num_threads(1)
    import orcal

    versions = peer_versions()
    meta = {"command": "python -m benchmarks.conformal_peers " + " ".join(sys.argv[1:] if argv is None else argv),
            "versions": versions, "orcal": orcal.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
            "notes": [f"{k} is not installed here; its rows are left out." for k, v in versions.items() if not v]}
    builders: list[Callable[[], Pool]] = []
    if not args.no_synthetic:
        if args.quick:
            builders.append(lambda: synthetic_pool(n_train=16, n_pool=40, shape=(32, 32), epochs=1, probs=args.probs,
                                                   seed=args.seed))
        else:
            builders.append(lambda: synthetic_pool(probs=args.probs, seed=args.seed))
    if args.root:
        if not Path(args.root).is_dir():
            parser.error(f"--root {args.root} is not a folder (LIDC-IDRI slices in the lidc_slices layout)")
        builders.append(lambda: lidc_pool(args.root, crop=args.crop, epochs=1 if args.quick else 3, probs=args.probs,
                                          seed=args.seed))
    out = None if args.out == "-" else Path(args.out)
    for build in builders:
        start = time.perf_counter()
        pool = build()
        study = run_study(pool, args.alpha, args.splits, args.seed, versions, args.voxel_splits)
        text = write_report(pool, study, {**meta, "runtime_s": time.perf_counter() - start}, out)
        print(text)
        if out is not None:
            print(f"wrote {out / (pool.name + '.md')} and {out / (pool.name + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
