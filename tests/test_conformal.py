"""Conformal guarantees against a random rater (orcal.metrics.conformal, SPEC §12).

The guarantee tests draw fresh exchangeable images for every split, so the splits are independent and the mean
test risk over them has a standard error estimated from their spread: the tests assert
``mean <= alpha + 3 * se`` (and, on the tight cases, that the rule is not needlessly conservative), and show on
the same cases that the rule without the finite-sample correction fails that check.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from orcal.metrics import ConformalRiskControl, ConformalVolume, fnr_curves, min_calibration_images, volume_stats

SPLITS = 200


def _fnr(pred: torch.Tensor, raters: torch.Tensor) -> torch.Tensor:
    """Per image, the mean over raters of 1 - |pred ∩ rater| / |rater| (0 for an empty rater): (B,)."""
    hit = (pred[:, None] & raters).flatten(2).sum(2).double()
    size = raters.flatten(2).sum(2).double()
    return torch.where(size > 0, 1 - hit / size.clamp_min(1), 0.0).mean(1)


def _tight_images(B: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A square whose voxels all have one uniform probability ``u_i``; three raters outline parts of it, so each
    image's loss is the 0/1 step ``1{u_i < lambda}``: the case where the finite-sample term decides."""
    p = torch.zeros(B, 8, 8)
    u = torch.rand(B, generator=g)
    p[:, 2:6, 2:6] = u[:, None, None]
    masks = torch.zeros(B, 3, 8, 8, dtype=torch.bool)
    for r in range(3):
        masks[:, r, 2:4 + r, 2:6] = True
    return p, masks


def _smooth_images(B: int, g: torch.Generator, C: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """C structures side by side, probabilities from a noisy blob, four raters who threshold the blob plus
    their own noise: a continuous loss, raters who disagree. Returns probs (B, C, 8, 16) and labels."""
    x = torch.linspace(-1, 1, 8)
    d = (x[:, None] ** 2 + x[None, :] ** 2)  # (8, 8)
    probs, labels = [], torch.zeros(B, 4, 8, 8 * C, dtype=torch.uint8)
    for c in range(C):
        radius = 0.3 + 0.5 * torch.rand(B, 1, 1, generator=g)
        logit = 6 * (radius - d) + 0.8 * torch.randn(B, 8, 8, generator=g)
        p = torch.zeros(B, 8, 8 * C)
        p[:, :, 8 * c:8 * (c + 1)] = torch.sigmoid(logit)
        probs.append(p)
        rater = (logit[:, None] + 1.5 * torch.randn(B, 4, 8, 8, generator=g)) > 0
        labels[:, :, :, 8 * c:8 * (c + 1)][rater] = c + 1
    return torch.stack(probs, 1), labels


def _se(x: torch.Tensor) -> float:
    return float(x.std() / math.sqrt(x.numel()))


def _crc_risks(make, n_cal: int, n_test: int, alpha: float, seed: int, naive: bool = False,
               num_structures: int | None = None) -> torch.Tensor:
    """Test FNR against the raters, (splits, C), of thresholds fitted on fresh calibration images per split."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(SPLITS):
        p, m = make(n_cal + n_test, g)
        crc = ConformalRiskControl(num_structures=num_structures)
        crc.update(p[:n_cal], m[:n_cal])
        if naive:  # the empirical risk alone, no finite-sample term
            ok = (crc.risk_curve() <= alpha).cumprod(1).bool()
            crc.thresholds = crc.grid[ok.sum(1) - 1]
        else:
            crc.fit(alpha)
        pred = crc.predict(p[n_cal:])
        if num_structures is None:
            out.append(_fnr(pred, m[n_cal:]).mean()[None])
        else:
            out.append(torch.stack([_fnr(pred[:, c], m[n_cal:] == c + 1).mean() for c in range(num_structures)]))
    return torch.stack(out)


def test_risk_control_holds_on_the_tight_case_and_fails_without_the_correction():
    alpha, n = 0.2, 10
    risks = _crc_risks(_tight_images, n, 50, alpha, seed=0)[:, 0]
    tol = 3 * _se(risks)
    assert risks.mean() <= alpha + tol
    assert risks.mean() >= alpha - 2 / (n + 1) - tol  # not the trivial answer lambda = 0
    naive = _crc_risks(_tight_images, n, 50, alpha, seed=0, naive=True)[:, 0]
    assert naive.mean() > alpha + 3 * _se(naive)  # the check has the power to catch a missing correction


def test_risk_control_several_structures_random_raters():
    alpha = 0.1
    risks = _crc_risks(_smooth_images, 20, 20, alpha, seed=1, num_structures=2)
    for c in range(2):
        assert risks[:, c].mean() <= alpha + 3 * _se(risks[:, c])


def test_several_structures_equal_each_structure_alone():
    p, labels = _smooth_images(6, torch.Generator().manual_seed(2))
    both = fnr_curves(p, labels, num_structures=2)
    for c in range(2):
        alone = fnr_curves(p[:, c], labels == c + 1)
        torch.testing.assert_close(both[:, c], alone[:, 0], rtol=0, atol=1e-15)


def test_curves_match_a_direct_computation_and_are_monotone():
    p, labels = _smooth_images(5, torch.Generator().manual_seed(3), C=1)
    p, masks = p[:, 0], labels.bool()
    curves = fnr_curves(p, masks, grid_points=11)[:, 0]
    for j, lam in enumerate(torch.linspace(0, 1, 11, dtype=torch.float64)):
        torch.testing.assert_close(curves[:, j], _fnr(p.double() >= lam, masks), rtol=0, atol=1e-12)
    assert (curves.diff(dim=1) >= 0).all() and (curves[:, 0] == 0).all()


def test_empty_rater_mask_counts_as_zero_loss():
    p = torch.full((1, 4, 4), 0.3)
    masks = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    masks[0, 0, :2] = True  # rater 1 outlines nothing
    curve = fnr_curves(p, masks, grid_points=3)[0, 0]  # thresholds 0, 0.5, 1
    assert curve.tolist() == [0.0, 0.5, 0.5]  # rater 0 misses all at 0.5: (1 + 0) / 2


def test_streaming_equals_one_shot():
    p, labels = _smooth_images(7, torch.Generator().manual_seed(4))
    one = ConformalRiskControl(num_structures=2)
    one.update(p, labels)
    parts = ConformalRiskControl(num_structures=2)
    for sl in (slice(0, 1), slice(1, 4), slice(4, 7)):
        parts.update(p[sl], labels[sl])
    assert parts.n == one.n == 7
    torch.testing.assert_close(parts.risk_curve(), one.risk_curve(), rtol=0, atol=1e-15)
    assert torch.equal(parts.fit(0.2), one.fit(0.2))
    assert torch.equal(parts.predict(p), one.apply(p))


def test_one_calibration_image_and_alpha_at_the_edges():
    p, m = _tight_images(1, torch.Generator().manual_seed(5))
    crc = ConformalRiskControl()
    crc.update(p, m)
    lam = float(crc.fit(0.5)[0])  # n = 1 certifies alpha = 1/2: zero loss on the one image
    assert lam <= float(p.max()) and crc.risk_curve()[0, crc.grid <= lam].max() == 0
    with pytest.raises(ValueError, match="at least 3 calibration images"):
        crc.fit(0.3)
    assert min_calibration_images(0.001) == 999 and min_calibration_images(0.1) == 9
    many = ConformalRiskControl()
    p20, m20 = _tight_images(20, torch.Generator().manual_seed(6))
    many.update(p20, m20)
    with pytest.raises(ValueError, match="at least 999 calibration images"):
        many.fit(0.001)
    # alpha near 1 tolerates 19 of the 20 steps 1{u_i < lambda}: the last grid threshold <= max u
    assert float(many.fit(0.999)[0]) == float(many.grid[many.grid <= p20.amax()].max())
    for bad in (0.0, 1.0, float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            many.fit(bad)
    with pytest.raises(RuntimeError, match="update"):
        ConformalRiskControl().fit(0.5)
    with pytest.raises(RuntimeError, match="fit"):
        ConformalRiskControl().predict(p)


def test_bad_inputs_name_the_argument():
    crc = ConformalRiskControl()
    p, m = _tight_images(2, torch.Generator().manual_seed(7))
    with pytest.raises(ValueError, match="probs"):
        crc.update(p[:, :4], m)
    with pytest.raises(ValueError, match="probs"):
        crc.update(p * 2, m)


def _volume_images(B: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A blob of probability 0.5 of random size; three raters whose volumes scatter around it with an
    image-specific spread (the predicted sd knows nothing of it, so the raw interval is far too narrow)."""
    p = torch.zeros(B, 12, 12)
    side = torch.randint(3, 9, (B,), generator=g)
    spread = 0.05 + 0.4 * torch.rand(B, 1, 1, 1, generator=g)
    for b in range(B):
        p[b, :side[b], :side[b]] = 0.5
    keep = torch.rand(B, 3, 12, 12, generator=g) < (0.5 + spread * torch.randn(B, 3, 1, 1, generator=g)).clamp(0, 1)
    return p, (p[:, None] > 0) & keep


def _volume_misses(n_cal: int, alpha: float, rater: str, seed: int, naive: bool = False) -> torch.Tensor:
    """Per split, the test miscoverage: of a random rater (mean over raters) or of any rater (max)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(SPLITS):
        p, m = _volume_images(n_cal + 40, g)
        cv = ConformalVolume(rater=rater)
        cv.update(p[:n_cal], m[:n_cal])
        if naive:  # the empirical quantile ceil(n (1 - alpha)) / n, without the (n + 1)
            s = cv.scores()[:, 0]
            s = s.amax(1) if rater == "every" else s.flatten()
            cv.quantiles = s.sort().values[math.ceil(s.numel() * (1 - alpha)) - 1][None]
        else:
            cv.fit(alpha)
        low, high = cv.predict(p[n_cal:])
        y = volume_stats(p[n_cal:], m[n_cal:]).raters / 1000.0
        miss = (y < low) | (y > high)
        out.append((miss.any(1) if rater == "every" else miss.double().mean(1)).double().mean())
    return torch.stack(out)


@pytest.mark.parametrize("rater", ["every", "random"])
def test_volume_intervals_cover_and_fail_with_a_too_small_quantile(rater):
    alpha, n = 0.2, 10
    miss = _volume_misses(n, alpha, rater, seed=8)
    tol = 3 * _se(miss)
    assert miss.mean() <= alpha + tol
    assert miss.mean() >= alpha - 2 / (n + 1) - tol
    if rater == "every":  # split conformal on a continuous score: the too-small quantile under-covers
        naive = _volume_misses(n, alpha, rater, seed=8, naive=True)
        assert naive.mean() > alpha + 3 * _se(naive)


def test_volume_edges_and_several_structures():
    p, labels = _smooth_images(12, torch.Generator().manual_seed(9))
    cv = ConformalVolume(num_structures=2)
    for sl in (slice(0, 5), slice(5, 12)):
        cv.update(p[sl], labels[sl], spacing=(2.0, 1.0))
    q = cv.fit(0.2)
    assert q.shape == (2,) and (q >= 0).all()
    low, high = cv.predict(p, spacing=(2.0, 1.0))
    assert low.shape == high.shape == (12, 2) and (low <= high).all() and (low >= 0).all()
    for c in range(2):  # each structure as a binary calibrator gives the same quantile
        alone = ConformalVolume()
        alone.update(p[:, c], labels == c + 1, spacing=(2.0, 1.0))
        assert float(alone.fit(0.2)[0]) == pytest.approx(float(q[c]), abs=1e-12)
    with pytest.raises(ValueError, match="at least 99 calibration images"):
        cv.fit(0.01)
    assert torch.equal(cv.fit(0.999), cv.scores().flatten(0, 0).amin((0, 2)))  # the smallest score


def _rank_main(rank: int, world: int, init: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        p, labels = _smooth_images(9, torch.Generator().manual_seed(10))
        sl = slice(0, 4) if rank == 0 else slice(4, 9)
        crc, cv = ConformalRiskControl(num_structures=2), ConformalVolume(num_structures=2, rater="every")
        crc.update(p[sl], labels[sl])
        cv.update(p[sl], labels[sl])
        torch.save({"lam": crc.fit(0.2), "q": cv.fit(0.2)}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_distributed_equals_single_process(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(2, f"file://{tmp_path / 'store'}", str(tmp_path)), nprocs=2, join=True)
    p, labels = _smooth_images(9, torch.Generator().manual_seed(10))
    crc, cv = ConformalRiskControl(num_structures=2), ConformalVolume(num_structures=2, rater="every")
    crc.update(p, labels)
    cv.update(p, labels)
    lam, q = crc.fit(0.2), cv.fit(0.2)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["lam"], lam, rtol=0, atol=0)
        torch.testing.assert_close(got["q"], q, rtol=0, atol=1e-15)
