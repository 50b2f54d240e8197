"""reference.py against first-principles definitions (expanded voxel–rater pairs, scikit-learn, autograd)."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from orcal.metrics import pooled
from orcal.ops import reference
from orcal.ops.stats import CalibrationStats


def random_case(B=3, R=4, S=(6, 7), seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    masks = (torch.rand(B, R, *S, generator=g) < torch.rand(B, 1, *S, generator=g)).to(torch.uint8)
    p = torch.rand(B, *S, generator=g, dtype=torch.float64)
    if ties:  # many exactly equal scores, some exactly 0 and 1
        p = torch.round(p * 8) / 8
    return masks, p


def expand_pairs(p, masks, valid=None):
    """Every voxel repeated once per rater with that rater's label (what the metrics must never build)."""
    R = masks.shape[1]
    scores = p.unsqueeze(1).expand_as(masks).reshape(-1).numpy()
    labels = masks.reshape(-1).numpy()
    if valid is not None:
        keep = valid.unsqueeze(1).expand_as(masks).reshape(-1).numpy()
        scores, labels = scores[keep], labels[keep]
    assert scores.size % R == 0
    return scores, labels


def binary_ece(scores, labels, n_bins, norm="l1"):
    """Textbook ECE of binary predictions: bins on [0, 1], |mean confidence - accuracy| weighted by bin size."""
    bins = np.minimum(np.floor(scores * n_bins).astype(int), n_bins - 1)
    total, gaps, weights = scores.size, [], []
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            gaps.append(abs(scores[sel].mean() - labels[sel].mean()))
            weights.append(sel.sum() / total)
    gaps, weights = np.array(gaps), np.array(weights)
    if norm == "l1":
        return float((weights * gaps).sum())
    if norm == "l2":
        return float(np.sqrt((weights * gaps ** 2).sum()))
    return float(gaps.max())


@pytest.mark.parametrize("R", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("n_bins", [1, 10, 15])
def test_mr_ece_equals_ece_of_expanded_pairs(R, n_bins):
    masks, p = random_case(R=R, seed=R * 31 + n_bins)
    k = reference.orc_targets(masks)
    st = reference.calibration_stats(p, k, R, n_bins=n_bins, auc_bins=64)
    metrics = pooled.calibration_metrics(st)
    scores, labels = expand_pairs(p, masks)
    for key, norm in (("mr_ece", "l1"), ("mr_ece_l2", "l2"), ("mr_mce", "max")):
        assert metrics[key] == pytest.approx(binary_ece(scores, labels, n_bins, norm), abs=1e-12)


def test_mr_ece_with_one_rater_is_binary_ece_and_respects_valid():
    masks, p = random_case(R=1, S=(9, 9), seed=3)
    valid = torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) > 0.3
    st = reference.calibration_stats(p, masks[:, 0], 1, n_bins=15, valid=valid)
    scores, labels = expand_pairs(p, masks, valid)
    assert pooled.calibration_metrics(st)["mr_ece"] == pytest.approx(binary_ece(scores, labels, 15), abs=1e-12)
    assert int(st.n.sum()) == int(valid.sum())


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("R", [1, 3, 5])
def test_exact_auc_equals_sklearn_on_expanded_pairs(R, ties):
    masks, p = random_case(R=R, seed=R, ties=ties)
    scores, labels = expand_pairs(p, masks)
    expected = roc_auc_score(labels, scores)
    assert pooled.auc_exact(p, reference.orc_targets(masks), R) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("auc_bins", [4, 32, 4096])
def test_binned_auc_error_within_reported_bound(auc_bins):
    masks, p = random_case(B=4, R=5, S=(16, 16), seed=auc_bins)
    k = reference.orc_targets(masks)
    m = pooled.calibration_metrics(reference.calibration_stats(p, k, 5, auc_bins=auc_bins))
    exact = pooled.auc_exact(p, k, 5)
    assert abs(m["auc"] - exact) <= m["auc_error_bound"] + 1e-12
    if auc_bins == 4096:
        assert m["auc_error_bound"] < 1e-3


def test_auc_undefined_without_negatives_is_nan():
    p = torch.rand(1, 4, 4, dtype=torch.float64)
    k = torch.full((1, 4, 4), 3, dtype=torch.uint8)
    m = pooled.calibration_metrics(reference.calibration_stats(p, k, 3))
    assert math.isnan(m["auc"]) and math.isnan(pooled.auc_exact(p, k, 3))


def test_brier_nll_dice_from_first_principles():
    masks, p = random_case(B=2, R=3, seed=7)
    p = p.clamp(0.01, 0.99)
    k = reference.orc_targets(masks)
    m = pooled.calibration_metrics(reference.calibration_stats(p, k, 3))
    scores, labels = expand_pairs(p, masks)
    assert m["brier"] == pytest.approx(np.mean((scores - labels) ** 2), rel=1e-9)
    assert m["nll"] == pytest.approx(-np.mean(labels * np.log(scores) + (1 - labels) * np.log(1 - scores)), rel=1e-9)
    pred, truth = (p >= 0.5).numpy(), (k >= 2).numpy()
    dice = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
    assert m["dice"] == pytest.approx(dice)


def test_probability_one_falls_in_last_bin():
    p = torch.tensor([[[0.0, 1.0, 0.5]]], dtype=torch.float64)
    k = torch.tensor([[[0, 2, 1]]], dtype=torch.uint8)
    st = reference.calibration_stats(p, k, 2, n_bins=4, auc_bins=4)
    assert st.n[0].tolist() == [2, 0, 2, 2]


def test_streaming_in_chunks_equals_one_pass():
    masks, p = random_case(B=6, R=3, S=(5, 4, 3), seed=11)
    k = reference.orc_targets(masks)
    whole = reference.calibration_stats(p, k, 3, n_bins=10, auc_bins=128)
    parts = [reference.calibration_stats(p[i:i + 2], k[i:i + 2], 3, n_bins=10, auc_bins=128) for i in range(0, 6, 2)]
    chunked = CalibrationStats.cat(parts)
    for name, value in whole.as_dict().items():
        torch.testing.assert_close(getattr(chunked, name), value, rtol=0, atol=1e-12)
    assert pooled.calibration_metrics(chunked) == pooled.calibration_metrics(whole)


def test_pack_unpack_roundtrip():
    masks, p = random_case(B=2, R=3, seed=5)
    st = reference.calibration_stats(p, reference.orc_targets(masks), 3, n_bins=7, auc_bins=16)
    back = CalibrationStats.unpack(*st.pack(), n_bins=7, auc_bins=16)
    for name, value in st.as_dict().items():
        assert torch.equal(getattr(back, name), value)


# --- the loss ----------------------------------------------------------------------------------------

def rps_first_principles(logits, k):
    """RPS with explicit one-hot targets and cumulative sums, one voxel at a time."""
    z = logits.double()
    R = z.shape[1] - 1
    q = torch.softmax(z, 1).movedim(1, -1).reshape(-1, R + 1)
    kk = k.reshape(-1).long()
    out = []
    for qi, ki in zip(q, kk):
        onehot = torch.zeros(R + 1, dtype=torch.float64)
        onehot[ki] = 1
        out.append(((torch.cumsum(qi, 0) - torch.cumsum(onehot, 0))[:R] ** 2).sum() / R)
    return torch.stack(out).reshape(k.shape)


@pytest.mark.parametrize("R", [1, 2, 3, 7])
def test_loss_terms_from_first_principles(R):
    g = torch.Generator().manual_seed(R)
    logits = torch.randn(2, R + 1, 3, 4, generator=g, dtype=torch.float64)
    k = torch.randint(0, R + 1, (2, 3, 4), generator=g)
    rps = reference.ordinal_loss_map(logits, k, rps_weight=1.0) - reference.ordinal_loss_map(logits, k, 0.0)
    torch.testing.assert_close(rps, rps_first_principles(logits, k))
    m = R // 2 + 1
    p_major = torch.softmax(logits, 1)[:, m:].sum(1)
    y = (k >= m).double()
    bce = -(y * torch.log(p_major) + (1 - y) * torch.log(1 - p_major))
    torch.testing.assert_close(reference.ordinal_loss_map(logits, k, 0.0), bce)
    torch.testing.assert_close(reference.foreground_probability(logits), p_major)


@pytest.mark.parametrize("R", [1, 2, 3, 7, 8])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_analytic_gradient_equals_autograd(R, reduction):
    g = torch.Generator().manual_seed(100 + R)
    # every k in 0..R appears; logits range from moderate to +-1e4
    V = 4 * (R + 1)
    scale = torch.tensor([1.0, 10.0, 1e2, 1e4]).repeat_interleave(R + 1).reshape(1, 1, 1, V)
    logits = (torch.randn(1, R + 1, 1, V, generator=g, dtype=torch.float64) * scale).requires_grad_()
    k = torch.arange(R + 1).repeat(4).reshape(1, 1, V)
    valid = torch.rand(1, 1, V, generator=g) > 0.2
    for m in sorted({R // 2 + 1, 1, R}):
        loss = reference.ordinal_loss(logits, k, rps_weight=0.7, majority=m, valid=valid, reduction=reduction)
        (auto,) = torch.autograd.grad(loss.sum(), logits)
        analytic = reference.ordinal_loss_grad(logits.detach(), k, 0.7, m, valid, reduction)
        assert torch.isfinite(loss).all() and torch.isfinite(analytic).all()
        torch.testing.assert_close(analytic, auto, rtol=1e-7, atol=1e-9)


def test_huge_logits_stay_finite_in_float32():
    logits = torch.tensor([1e4, -1e4, 1e4, -1e4]).reshape(1, 4, 1, 1).repeat(1, 1, 2, 2).requires_grad_()
    for kv in range(4):
        k = torch.full((1, 2, 2), kv, dtype=torch.uint8)
        loss = reference.ordinal_loss(logits, k)
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert torch.isfinite(reference.ordinal_loss_grad(logits.detach(), k)).all()


def test_mean_without_valid_voxels_is_zero_with_zero_gradient():
    logits = torch.randn(1, 4, 3, 3, requires_grad=True)
    k = torch.ones(1, 3, 3, dtype=torch.uint8)
    valid = torch.zeros(1, 3, 3, dtype=torch.bool)
    loss = reference.ordinal_loss(logits, k, valid=valid)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logits.grad) == 0
    assert torch.count_nonzero(reference.ordinal_loss_grad(logits.detach(), k, valid=valid)) == 0


def test_expected_readout_is_expected_vote_fraction():
    logits = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    q = torch.softmax(logits, 1)
    expected = sum(i * q[:, i] for i in range(6)) / 5
    torch.testing.assert_close(reference.foreground_probability(logits, "expected"), expected)


# --- bootstrap ---------------------------------------------------------------------------------------

def bootstrap_case(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = (torch.rand(n, 3, 12, 12, generator=g) < 0.4).to(torch.uint8)
    k = reference.orc_targets(masks)
    p = (k.double() / 3 * 0.8 + 0.1 * torch.rand(n, 12, 12, generator=g, dtype=torch.float64)).clamp(0, 1)
    return reference.calibration_stats(p, k, 3)


def test_bootstrap_reproducible_and_contains_full_sample():
    st = bootstrap_case()
    a = pooled.bootstrap(st, n_boot=200, seed=3)
    b = pooled.bootstrap(st, n_boot=200, seed=3)
    c = pooled.bootstrap(st, n_boot=200, seed=4)
    assert a == b and a != c
    for key in ("mr_ece", "auc", "brier", "dice"):
        assert a[key]["low"] <= a[key]["value"] <= a[key]["high"]
    assert a["dice"]["std"] == 0  # this case is perfectly separated at p = 0.5
    assert all(a[key]["std"] > 0 for key in ("mr_ece", "auc", "brier"))


def test_bootstrap_resample_sums_rows():
    st = bootstrap_case(n=3)
    # one draw of every image exactly equals the full sample only in expectation; with count == 1 each
    # resample is a single image, so every bootstrap value is one of the per-image values
    per_image = sorted(pooled.calibration_metrics(st[i])["mr_ece"] for i in range(3))
    res = pooled.bootstrap(st, n_boot=50, count=1, seed=0)
    assert per_image[0] - 1e-12 <= res["mr_ece"]["low"] and res["mr_ece"]["high"] <= per_image[-1] + 1e-12
