"""Conformal voxel sets and level sets against a random rater (orcal.metrics.conformal_sets, SPEC §12.3–12.4).

As in test_conformal.py, every split draws fresh exchangeable images, so the splits are independent: the tests
assert ``mean <= alpha + 3 * se`` over the splits, and show on the same cases that the rule without the
finite-sample correction fails that check.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from orcal.metrics import (
    ConformalLevelSets,
    ConformalRiskControl,
    ConformalVolume,
    ConformalVoxelSets,
    level_set_curves,
    load_conformal,
    save_conformal,
    voxel_set_curves,
)

SPLITS = 200


def _se(x: torch.Tensor) -> float:
    return float(x.std() / math.sqrt(x.numel()))


def _miscoverage(sets, raters: torch.Tensor) -> torch.Tensor:
    """Per image, the fraction of (voxel, rater) pairs whose label is outside the voxel's set, read from the
    predicted masks only: (B,). ``raters`` (B, R, *S) bool."""
    has1 = sets.upper
    has0 = sets.uncertain | (~sets.upper & ~sets.empty)
    miss = torch.where(raters, ~has1[:, None], ~has0[:, None])
    return miss.flatten(1).double().mean(1)


def _step_images(B: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Every voxel of image i has probability u_i and three raters outline all of it, so each image's loss is
    the 0/1 step 1{u_i < t}: the case where the finite-sample term decides."""
    u = torch.rand(B, 1, 1, generator=g)
    return u.expand(B, 6, 6).clone(), torch.ones(B, 3, 6, 6, dtype=torch.bool)


def _smooth_images(B: int, g: torch.Generator, C: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """C structures side by side, probabilities from a noisy blob, four raters who threshold the blob plus
    their own noise (they disagree). Returns probs (B, C, 8, 8C) and rater label maps (B, 4, 8, 8C)."""
    x = torch.linspace(-1, 1, 8)
    d = x[:, None] ** 2 + x[None, :] ** 2
    probs, labels = [], torch.zeros(B, 4, 8, 8 * C, dtype=torch.uint8)
    for c in range(C):
        logit = 6 * (0.3 + 0.5 * torch.rand(B, 1, 1, generator=g) - d) + 0.8 * torch.randn(B, 8, 8, generator=g)
        p = torch.zeros(B, 8, 8 * C)
        p[:, :, 8 * c:8 * (c + 1)] = torch.sigmoid(logit)
        probs.append(p)
        labels[:, :, :, 8 * c:8 * (c + 1)][(logit[:, None] + 1.5 * torch.randn(B, 4, 8, 8, generator=g)) > 0] = c + 1
    return torch.stack(probs, 1), labels


def _set_risks(make, n_cal: int, n_test: int, alpha: float, seed: int, naive: bool = False,
               num_structures: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per split, the test miscoverage (splits, C) and uncertain-voxel fraction (splits, C)."""
    g = torch.Generator().manual_seed(seed)
    risks, unsure = [], []
    for _ in range(SPLITS):
        p, m = make(n_cal + n_test, g)
        sets = ConformalVoxelSets(num_structures=num_structures)
        sets.update(p[:n_cal], m[:n_cal])
        if naive:  # the empirical risk alone, no finite-sample term
            ok = (sets.risk_curve() <= alpha).cumprod(1).bool()
            sets.thresholds = sets.grid[ok.sum(1) - 1]
        else:
            sets.fit(alpha)
        out = sets.predict(p[n_cal:])
        if num_structures is None:
            risks.append(_miscoverage(out, m[n_cal:]).mean()[None])
            unsure.append(out.uncertain.double().mean()[None])
        else:
            risks.append(torch.stack([_miscoverage(type(out)(*(t[:, c] for t in out)), m[n_cal:] == c + 1).mean()
                                      for c in range(num_structures)]))
            unsure.append(out.uncertain.double().mean((0, 2, 3)))
    return torch.stack(risks), torch.stack(unsure)


def test_voxel_sets_hold_on_the_step_case_and_fail_without_the_correction():
    alpha, n = 0.2, 10
    risks = _set_risks(_step_images, n, 40, alpha, seed=0)[0][:, 0]
    tol = 3 * _se(risks)
    assert risks.mean() <= alpha + tol
    assert risks.mean() >= alpha - 2 / (n + 1) - tol  # not the trivial answer t = 0
    naive = _set_risks(_step_images, n, 40, alpha, seed=0, naive=True)[0][:, 0]
    assert naive.mean() > alpha + 3 * _se(naive)  # the check has the power to catch a missing correction


@pytest.mark.parametrize("alpha", [0.05, 0.1])
def test_voxel_sets_several_structures_random_raters(alpha):
    n = 40
    risks, unsure = _set_risks(_smooth_images, n, 20, alpha, seed=1, num_structures=2)
    for c in range(2):
        assert risks[:, c].mean() <= alpha + 3 * _se(risks[:, c])
        # the rule spends what the finite-sample term leaves, (alpha (n + 1) - 1) / n: not the trivial t = 0
        assert risks[:, c].mean() >= 0.5 * (alpha * (n + 1) - 1) / n
        assert unsure[:, c].mean() < 1


def test_curves_match_a_direct_computation_are_monotone_and_match_predict():
    p, labels = _smooth_images(5, torch.Generator().manual_seed(3), C=1)
    p, masks = p[:, 0], labels.bool()
    curves = voxel_set_curves(p, masks, grid_points=11)[:, 0]
    grid = torch.linspace(0, 1, 11, dtype=torch.float64)
    sets = ConformalVoxelSets(grid_points=11)
    for j, t in enumerate(grid):
        pd = p.double()[:, None]
        direct = torch.where(masks, pd < t, (1 - pd) < t).flatten(1).double().mean(1)
        torch.testing.assert_close(curves[:, j], direct, rtol=0, atol=1e-12)
        sets.thresholds = t[None]
        torch.testing.assert_close(curves[:, j], _miscoverage(sets.predict(p), masks), rtol=0, atol=1e-12)
    assert (curves.diff(dim=1) >= 0).all() and (curves[:, 0] == 0).all()
    both = voxel_set_curves(*_smooth_images(4, torch.Generator().manual_seed(4)), num_structures=2)
    assert both.shape == (4, 2, 1001)


def test_valid_voxels_only_count():
    p, labels = _smooth_images(3, torch.Generator().manual_seed(5), C=1)
    p, masks = p[:, 0], labels.bool()
    valid = torch.zeros(3, 8, 8, dtype=torch.bool)
    valid[:, 2:7, 1:5] = True
    got = voxel_set_curves(p, masks, valid=valid, grid_points=21)
    crop = voxel_set_curves(p[:, 2:7, 1:5], masks[:, :, 2:7, 1:5], grid_points=21)
    torch.testing.assert_close(got, crop, rtol=0, atol=1e-15)
    assert (voxel_set_curves(p, masks, valid=torch.zeros_like(valid), grid_points=5) == 0).all()
    with pytest.raises(ValueError, match="valid"):
        voxel_set_curves(p, masks, valid=valid[:, :4])


def test_sets_nest_and_shrink_with_alpha():
    p, labels = _smooth_images(30, torch.Generator().manual_seed(6))
    sets = ConformalVoxelSets(num_structures=2)
    sets.update(p, labels)
    previous = None
    for alpha in (0.05, 0.1, 0.3, 0.6):
        t = sets.fit(alpha)
        out = sets.predict(p)
        assert (out.lower <= out.upper).all() and torch.equal(out.upper & ~out.lower, out.uncertain)
        assert not out.empty.any() or bool((t > 0.5).any())  # empty sets only above t = 1/2
        if previous is not None:
            assert (t >= previous[0]).all() and (out.uncertain <= previous[1]).all()
        previous = t, out.uncertain


def test_one_calibration_image_alpha_at_the_edges_and_clear_errors():
    p, m = _step_images(1, torch.Generator().manual_seed(7))
    sets = ConformalVoxelSets()
    sets.update(p, m)
    t = float(sets.fit(0.5)[0])  # n = 1 certifies alpha = 1/2: zero loss on the one image
    assert t <= float(p.min()) and sets.risk_curve()[0, sets.grid <= t].max() == 0
    with pytest.raises(ValueError, match="at least 3 calibration images"):
        sets.fit(0.3)
    many = ConformalVoxelSets()
    p20, m20 = _step_images(20, torch.Generator().manual_seed(8))
    many.update(p20, m20)
    with pytest.raises(ValueError, match="at least 999 calibration images"):
        many.fit(0.001)
    # alpha near 1 tolerates 19 of the 20 steps 1{u_i < t}: the last grid point <= max u
    assert float(many.fit(0.999)[0]) == float(many.grid[many.grid <= p20.amax()].max())
    for bad in (0.0, 1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            many.fit(bad)
    with pytest.raises(RuntimeError, match="ConformalVoxelSets has no calibration image"):
        ConformalVoxelSets().fit(0.5)
    with pytest.raises(RuntimeError, match="fit"):
        ConformalVoxelSets().predict(p)
    two = ConformalVoxelSets(num_structures=2)
    two.update(*_smooth_images(12, torch.Generator().manual_seed(9)))
    two.fit(0.2)
    with pytest.raises(ValueError, match="C = 2"):
        two.predict(torch.rand(1, 3, 8, 16))
    with pytest.raises(ValueError, match="probs"):
        many.update(p20 * 2, m20)


def _level_images(B: int, g: torch.Generator, R: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Level probabilities q (B, R+1, 6, 6) of noisy logits and vote counts k drawn from q itself."""
    logits = 2 * torch.randn(B, 1, 6, 6, generator=g) + torch.randn(B, R + 1, 6, 6, generator=g)
    q = torch.softmax(logits, 1)
    k = torch.multinomial(q.movedim(1, -1).reshape(-1, R + 1), 1, generator=g).view(B, 6, 6)
    return q, k


def test_level_sets_hold_and_report_uncertain_voxels():
    alpha, n = 0.1, 20
    g = torch.Generator().manual_seed(10)
    risks = []
    for _ in range(SPLITS):
        q, k = _level_images(n + 20, g)
        levels = ConformalLevelSets()
        levels.update(q[:n], k[:n])
        levels.fit(alpha)
        sets, unsure = levels.predict(q[n:])
        assert sets.shape == q[n:].shape and torch.equal(unsure, sets.sum(1) > 1)
        risks.append((~sets.gather(1, k[n:, None])).double().mean())
    risks = torch.stack(risks)
    assert risks.mean() <= alpha + 3 * _se(risks) and risks.mean() >= alpha / 3
    q, k = _level_images(4, torch.Generator().manual_seed(11))
    both = level_set_curves(torch.stack([q, q.flip(1)], 1), torch.stack([k, k], 1), num_structures=2)
    torch.testing.assert_close(both[:, 0], level_set_curves(q, k)[:, 0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="vote counts 0..3"):
        level_set_curves(q, k + 4)
    with pytest.raises(ValueError, match="level_probs"):
        level_set_curves(q, k[:, :3])


def _fitted(seed: int = 12):
    p, labels = _smooth_images(24, torch.Generator().manual_seed(seed))
    out = {"risk": ConformalRiskControl(num_structures=2), "sets": ConformalVoxelSets(num_structures=2),
           "volume": ConformalVolume(num_structures=2, rater="every")}
    for c in out.values():
        c.update(p, labels)
        c.fit(0.2)
    q, k = _level_images(24, torch.Generator().manual_seed(seed))
    out["levels"] = ConformalLevelSets()
    out["levels"].update(q, k)
    out["levels"].fit(0.2)
    return out, p, q


@pytest.mark.parametrize("suffix", [".json", ".pt"])
def test_state_dict_round_trip_through_a_file(tmp_path, suffix):
    fitted, p, q = _fitted()
    path = save_conformal(tmp_path / f"conformal{suffix}", fitted)
    loaded = load_conformal(path)
    assert set(loaded) == set(fitted)
    for name, c in fitted.items():
        back = loaded[name]
        assert type(back) is type(c) and back.alpha == 0.2
        x = q if name == "levels" else p
        got, want = back.predict(x), c.predict(x)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        state = back.state_dict()
        assert state.keys() == c.state_dict().keys()
        refit = type(c).from_state_dict(state)
        torch.testing.assert_close(refit.fit(0.3), type(c).from_state_dict(c.state_dict()).fit(0.3), rtol=0, atol=0)
    with pytest.raises(ValueError, match="not of a ConformalVoxelSets"):
        ConformalVoxelSets(num_structures=2).load_state_dict(fitted["risk"].state_dict())
    with pytest.raises(ValueError, match="num_structures"):
        ConformalVoxelSets().load_state_dict(fitted["sets"].state_dict())
    with pytest.raises(FileNotFoundError, match="--save-conformal"):
        load_conformal(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"a": {"kind": "Nope"}}')
    with pytest.raises(ValueError, match="not a calibrator state"):
        load_conformal(tmp_path / "bad.json")


def _rank_main(rank: int, world: int, init: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        p, labels = _smooth_images(9, torch.Generator().manual_seed(13))
        q, k = _level_images(9, torch.Generator().manual_seed(13))
        sl = slice(0, 4) if rank == 0 else slice(4, 9)
        sets, levels = ConformalVoxelSets(num_structures=2), ConformalLevelSets()
        sets.update(p[sl], labels[sl])
        levels.update(q[sl], k[sl])
        torch.save({"t": sets.fit(0.2), "levels": levels.fit(0.2)}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_distributed_equals_single_process(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(2, f"file://{tmp_path / 'store'}", str(tmp_path)), nprocs=2, join=True)
    p, labels = _smooth_images(9, torch.Generator().manual_seed(13))
    q, k = _level_images(9, torch.Generator().manual_seed(13))
    sets, levels = ConformalVoxelSets(num_structures=2), ConformalLevelSets()
    sets.update(p, labels)
    levels.update(q, k)
    t, lv = sets.fit(0.2), levels.fit(0.2)
    assert 0 < float(t.min()) and 0 < float(lv)  # a case where the pooled fit is not the trivial threshold
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["t"], t, rtol=0, atol=0)
        torch.testing.assert_close(got["levels"], lv, rtol=0, atol=0)
