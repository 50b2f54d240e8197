"""benchmarks/conformal_peers.py: orcal's conformal tools against MAPIE / TorchCP on the same inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks import conformal_peers as cp
from orcal.metrics.conformal import fnr_curves
from orcal.metrics.volume import volume_stats

ALPHA = 0.1
PEER_ROWS = {"mapie": ("MAPIE SplitConformalRegressor", "MAPIE SplitConformalClassifier(lac)",
                       "MAPIE lac on foreground voxels"),
             "torchcp": ("TorchCP SplitPredictor(ABS)", "TorchCP SplitPredictor(LAC)",
                         "TorchCP LAC on foreground voxels")}
PEER_PARAMS = [pytest.param("mapie"), pytest.param("torchcp", marks=pytest.mark.slow)]  # torchcp imports in ~10 s


def _peer(name: str) -> None:
    pytest.importorskip(cp.PEERS[name])


def _pool(n: int = 80, R: int = 3, side: int = 16, seed: int = 0) -> cp.Pool:
    """Synthetic images with continuous, image-dependent probabilities (a blurred rater fraction)."""
    from orcal.data.synthetic import make_synthetic

    batch = make_synthetic(n=n, R=R, shape=(side, side), seed=seed)
    masks = torch.from_numpy(batch.masks)
    k = masks.float().mean(1, keepdim=True)
    p = torch.nn.functional.avg_pool2d(k, 3, stride=1, padding=1, count_include_pad=False)[:, 0]
    return cp.Pool("tiny", p.clamp(0, 1), masks, [f"img{i}" for i in range(n)], "test pool")


def test_group_splits_keep_groups_together():
    groups = [f"patient{i // 3}" for i in range(30)]
    for cal, test in cp.group_splits(groups, splits=20, seed=1):
        assert len(np.intersect1d(cal, test)) == 0
        assert sorted(np.concatenate([cal, test])) == list(range(30))
        assert not {groups[i] for i in cal} & {groups[i] for i in test}


def test_image_fnr_is_orcal_loss():
    """The benchmark's per-image FNR is the loss that ConformalRiskControl certifies (fnr_curves)."""
    pool = _pool(n=12)
    curves = fnr_curves(pool.probs, pool.masks, grid_points=11)[:, 0]
    for j, lam in enumerate(torch.linspace(0, 1, 11, dtype=torch.float64)):
        ours = cp.image_fnr(pool.probs.double() >= lam, pool.masks)
        np.testing.assert_allclose(ours, curves[:, j].numpy(), atol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("peer", PEER_PARAMS)
def test_peer_volume_interval_covers_a_random_rater(peer):
    """Split-conformal regression around the expected volume, one random rater per calibration image, covers a
    random test rater at >= 1 - alpha over random splits (images exchangeable), as does orcal's."""
    _peer(peer)
    pool = _pool()
    stats = volume_stats(pool.probs, pool.masks)
    y = stats.raters.numpy()
    rng = np.random.default_rng(0)
    methods = (cp.VOLUME_METHODS[0], PEER_ROWS[peer][0])
    coverage = {m: [] for m in methods}
    for cal, test in cp.group_splits(pool.groups, splits=200, seed=0):
        drawn = rng.integers(y.shape[1], size=cal.shape[0])
        for method, (lo, hi) in cp.volume_split(stats, cal, test, drawn, ALPHA, methods).items():
            assert lo.shape == hi.shape == test.shape
            coverage[method].append(((y[test] >= lo[:, None]) & (y[test] <= hi[:, None])).mean())
    for method, cov in coverage.items():
        assert np.mean(cov) >= 1 - ALPHA - 0.02, (method, np.mean(cov))
        assert np.mean(cov) <= 1 - ALPHA + 0.06, (method, np.mean(cov))  # valid, and not trivially wide


@pytest.mark.slow
def test_peers_see_the_same_inputs():
    """MAPIE and TorchCP, given the same calibration points, return the same intervals, sets and masks."""
    _peer("mapie")
    _peer("torchcp")
    rng = np.random.default_rng(3)
    mu = rng.uniform(50, 500, 60)
    y = mu + rng.normal(0, 30, 60)
    lo_m, hi_m = cp.volume_interval(PEER_ROWS["mapie"][0], mu[:30], y[:30], mu[30:], ALPHA)
    lo_t, hi_t = cp.volume_interval(PEER_ROWS["torchcp"][0], mu[:30], y[:30], mu[30:], ALPHA)
    np.testing.assert_allclose(lo_m, lo_t, rtol=1e-6)
    np.testing.assert_allclose(hi_m, hi_t, rtol=1e-6)
    p = rng.uniform(size=4000)
    labels = (rng.uniform(size=4000) < p).astype(np.int64)
    sets = [cp.voxel_sets(PEER_ROWS[k][1], p[:2000], labels[:2000], p[2000:], ALPHA) for k in ("mapie", "torchcp")]
    assert (sets[0] == sets[1]).mean() > 0.999
    fg = p[:2000][labels[:2000] == 1]
    masks = [cp.foreground_mask(PEER_ROWS[k][2], fg, p[2000:], ALPHA) for k in ("mapie", "torchcp")]
    assert (masks[0] == masks[1]).mean() > 0.999


@pytest.mark.parametrize("peer", PEER_PARAMS)
def test_voxel_sets_hold_pooled_not_per_image(peer):
    """LAC sets calibrated on pooled voxels cover ~1 - alpha of the voxels, yet miss far more on the ambiguous
    images: half the images are sure (p = the label), half are coin flips (p = 0.5, labels at random)."""
    _peer(peer)
    rng = np.random.default_rng(0)
    n, V = 40, 400
    hard = np.arange(n) % 2 == 1
    labels = (rng.uniform(size=(n, V)) < 0.5).astype(np.int64)
    p = np.where(hard[:, None], 0.5, labels.astype(np.float64))
    p = np.where(hard[:, None] & (rng.uniform(size=(n, V)) < 0.6), 0.5 + 0.01 * rng.standard_normal((n, V)), p)
    cal, test = np.arange(n) < n // 2, np.arange(n) >= n // 2
    sets = cp.voxel_sets(PEER_ROWS[peer][1], p[cal].ravel(), labels[cal].ravel(), p[test].ravel(), ALPHA)
    covered = sets[np.arange(sets.shape[0]), labels[test].ravel()].reshape(-1, V)
    assert covered.mean() >= 1 - ALPHA - 0.03
    per_image = covered.mean(1)
    assert per_image[hard[test]].max() < 1 - ALPHA - 0.05  # every ambiguous image below the promised level


@pytest.mark.parametrize("peer", PEER_PARAMS)
def test_run_study_tables(peer):
    """Every installed method's rows, on the same splits; orcal's risk control holds its mean image FNR."""
    _peer(peer)
    versions = {name: ("x" if name == peer else None) for name in cp.PEERS}
    pool = _pool(n=60)
    study = cp.run_study(pool, ALPHA, splits=20, versions=versions)
    want = {cp.VOLUME_METHODS[0], PEER_ROWS[peer][0]}
    assert set(study.volume) == want
    assert set(study.sets) == {PEER_ROWS[peer][1]}
    assert set(study.masks) == {cp.MASK_METHODS[0], PEER_ROWS[peer][2]}
    assert all(len(v["coverage"]) == 20 for v in study.volume.values())
    assert np.mean(study.masks[cp.MASK_METHODS[0]]["mean_image"]) <= ALPHA + 0.03
    (cal, test), = cp.group_splits(pool.groups, splits=1)
    with_fg = pool.masks[test].flatten(1).bool().any(1)
    assert bool(with_fg.all())  # a synthetic image always has a rater who marks its object
    for method in study.masks:  # the per-image values kept for the percentiles are the test images' own
        per_image = study.mask_fnr[method][0]
        assert per_image.shape == (len(test),)
        assert per_image.mean() == pytest.approx(study.masks[method]["mean_image"][0])
        assert np.mean(per_image > ALPHA) == pytest.approx(study.masks[method]["above"][0])
    for method in study.sets:
        assert study.set_coverage[method][0].mean() == pytest.approx(study.sets[method]["mean_image"][0])
    text = cp.markdown(pool, study, {"command": "x", "versions": versions, "orcal": "0", "torch": "0",
                                     "numpy": "0", "python": "3", "date": "today", "runtime_s": 1.0})
    assert all(m in text for m in want)


@pytest.mark.slow
def test_cli_end_to_end(tmp_path):
    """The command on tiny synthetic data, with a model trained by orcal.train: report and figure written."""
    for name in cp.PEERS:
        if cp.peer_versions()[name] is None and name != "puncc":
            pytest.skip(f"{name} is not installed")
    assert cp.main(["--quick", "--splits", "3", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "synthetic.md").read_text()
    assert text.startswith("# Conformal peers on synthetic")
    assert "Command: `python -m benchmarks.conformal_peers --quick" in text
    assert "unet-small" in text
    for row in (*cp.VOLUME_METHODS, *cp.SET_METHODS, *cp.MASK_METHODS):
        assert f"| {row} |" in text
    assert (tmp_path / "synthetic.png").stat().st_size > 0
