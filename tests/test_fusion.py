"""orcal.fusion: every SPEC §6 strategy against first principles; STAPLE against SimpleITK."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import orcal.ops
from orcal import fusion
from orcal.fusion import (
    METHODS,
    check_masks,
    gaussian_kernel1d,
    make_target,
    simple,
    soft_gaussian,
    staple,
    svls,
    svls_kernel,
)

sitk = pytest.importorskip("SimpleITK")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def rand_masks(B, R, *S, p=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, R, *S, generator=g) < p


def blob_masks(R, S, seed=0):
    """Structured masks: one shifted, resized ball per rater, plus a little speckle."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(n) for n in S], indexing="ij")
    out = []
    for _ in range(R):
        centre = [n / 2 + rng.normal(0, n / 12) for n in S]
        radius = min(S) / 4 * rng.uniform(0.7, 1.3)
        d2 = sum((g - c) ** 2 for g, c in zip(grids, centre))
        m = d2 <= radius**2
        m ^= rng.random(S) < 0.02
        out.append(m)
    return torch.from_numpy(np.stack(out))[None]


def sitk_staple(masks_one: torch.Tensor):
    """SimpleITK's STAPLE of ``(R, *S)`` masks: (W, sensitivities, specificities)."""
    images = [sitk.GetImageFromArray(m.numpy().astype(np.uint8)) for m in masks_one]
    f = sitk.STAPLEImageFilter()
    f.SetForegroundValue(1.0)
    out = f.Execute(images)
    return sitk.GetArrayFromImage(out), np.array(f.GetSensitivity()), np.array(f.GetSpecificity())


# --- validation ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_every_method_shape_dtype_range(method):
    for shape in [(2, 3, 5, 6), (2, 4, 3, 4, 5)]:
        m = rand_masks(*shape)
        before = m.clone()
        t = make_target(method, m)
        assert t.shape == (shape[0], *shape[2:])
        assert m.equal(before)  # inputs are never modified
        if method == "ordinal":
            assert t.dtype == torch.uint8 and int(t.max()) <= shape[1]
        else:
            assert t.dtype == torch.float32
            assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0


@pytest.mark.parametrize("method", METHODS)
def test_uint8_and_bool_agree(method):
    m = rand_masks(2, 3, 6, 7, seed=3)
    torch.testing.assert_close(make_target(method, m, **({"seed": 1} if method == "random" else {})),
                               make_target(method, m.to(torch.uint8), **({"seed": 1} if method == "random" else {})))


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ValueError, match="staple.*svls|valid methods"):
        make_target("majority_vote", rand_masks(1, 2, 3, 3))
    with pytest.raises(TypeError, match="method"):
        make_target(3, rand_masks(1, 2, 3, 3))


def test_unknown_option_names_method():
    with pytest.raises(TypeError, match="'soft'"):
        make_target("soft", rand_masks(1, 2, 3, 3), sigma=2.0)


@pytest.mark.parametrize("bad, err, match", [
    (np.zeros((1, 2, 3, 3)), TypeError, "torch.Tensor"),
    (torch.zeros(2, 3, 3), ValueError, "dimensions"),
    (torch.zeros(1, 2, 3, 3, 3, 3), ValueError, "dimensions"),
    (torch.zeros(1, 0, 3, 3), ValueError, "at least one rater"),
    (torch.full((1, 2, 3, 3), 2, dtype=torch.uint8), ValueError, "binary"),
    (torch.full((1, 2, 3, 3), 0.5), ValueError, "binary"),
    (torch.full((1, 2, 3, 3), 255, dtype=torch.uint8), ValueError, "255"),
])
def test_bad_masks(bad, err, match):
    with pytest.raises(err, match=match):
        check_masks(bad)
    with pytest.raises(err, match=match):
        make_target("soft", bad)


def test_bad_options():
    m = rand_masks(1, 3, 4, 4)
    with pytest.raises(ValueError, match="sigma"):
        soft_gaussian(m, sigma=-1.0)
    with pytest.raises(ValueError, match="padding"):
        soft_gaussian(m, padding="zeros")
    with pytest.raises(ValueError, match="majority"):
        make_target("median", m, majority=4)
    with pytest.raises(ValueError, match="max_iter"):
        staple(m, max_iter=0)
    with pytest.raises(ValueError, match="seed or generator"):
        make_target("random", m, seed=1, generator=torch.Generator())


def test_empty_batch():
    for method in METHODS:
        assert make_target(method, torch.zeros(0, 3, 4, 5, dtype=torch.bool)).shape == (0, 4, 5)


# --- simple strategies ---------------------------------------------------------------------------------

def test_soft_median_ordinal():
    m = rand_masks(3, 4, 5, 6)
    k = m.sum(1)
    torch.testing.assert_close(make_target("ordinal", m), k.to(torch.uint8))
    torch.testing.assert_close(make_target("soft", m), k.float() / 4)
    torch.testing.assert_close(make_target("median", m), (k >= 3).float())  # R = 4: tie is background
    torch.testing.assert_close(make_target("median", m, majority=2), (k >= 2).float())


def test_random_rater_is_a_rater_and_deterministic():
    m = rand_masks(16, 3, 4, 4, seed=5)
    t = make_target("random", m, seed=7)
    for b in range(16):
        assert any(t[b].equal(m[b, r].float()) for r in range(3))
    assert t.equal(make_target("random", m, seed=7))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a1, a2 = make_target("random", m, generator=g1), make_target("random", m, generator=g2)
    assert a1.equal(a2)
    # the generator advances: the next call draws again, and over calls every rater shows up
    seen = set()
    for _ in range(20):
        t = make_target("random", m[:1], generator=g1)
        seen |= {r for r in range(3) if t[0].equal(m[0, r].float())}
    assert seen == {0, 1, 2}


# --- smoothing -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_svls_kernel_properties(ndim, sigma):
    k = svls_kernel(ndim, sigma, dtype=torch.float64)
    assert k.shape == (3,) * ndim
    assert float(k.sum()) == pytest.approx(1.0, abs=1e-12)
    assert float(k[(1,) * ndim]) == pytest.approx(0.5, abs=1e-12)
    for d in range(ndim):
        torch.testing.assert_close(k, k.flip(d))
    if ndim == 2:
        torch.testing.assert_close(k, k.T)
    # off-centre weights follow the Gaussian: a face neighbour outweighs a corner
    assert float(k[(0,) + (1,) * (ndim - 1)]) > float(k[(0,) * ndim]) > 0


def test_svls_kernel_bad():
    with pytest.raises(ValueError, match="ndim"):
        svls_kernel(4)
    with pytest.raises(ValueError, match="sigma"):
        svls_kernel(2, 0.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 3, 7, 8), (1, 2, 4, 5, 6)])
def test_svls_equals_per_rater_smoothing(device, shape):
    m = rand_masks(*shape, seed=2).to(device)
    nd = len(shape) - 2
    k = svls_kernel(nd, 1.0, dtype=torch.float64, device=device)
    x = m.reshape(-1, 1, *shape[2:]).double()
    pad = F.pad(x, (1, 1) * nd, mode="replicate")
    conv = F.conv2d if nd == 2 else F.conv3d
    per_rater = conv(pad, k[None, None]).reshape(shape).mean(1)
    torch.testing.assert_close(svls(m), per_rater.float(), atol=1e-6, rtol=0)


def test_svls_constant_image_unchanged():
    m = torch.ones(1, 3, 5, 5, dtype=torch.bool)
    m[0, 0] = False
    torch.testing.assert_close(svls(m), torch.full((1, 5, 5), 2 / 3))


def test_gaussian_kernel1d():
    k = gaussian_kernel1d(1.0, dtype=torch.float64)
    assert k.numel() == 7 and float(k.sum()) == pytest.approx(1.0)
    torch.testing.assert_close(k, k.flip(0))
    assert gaussian_kernel1d(0.0).tolist() == [1.0]
    assert gaussian_kernel1d(2.0).numel() == 13


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("padding, np_mode", [("reflect", "reflect"), ("replicate", "edge")])
@pytest.mark.parametrize("shape, sigma", [((2, 3, 9, 11), 1.3), ((1, 3, 5, 6, 7), 1.3), ((1, 3, 1, 2), 3.0),
                                          ((1, 2, 2, 3, 1), 2.0)])
def test_soft_gaussian_matches_dense_convolution(device, padding, np_mode, shape, sigma):
    """Against numpy's padding modes, including axes shorter than the kernel radius."""
    m = rand_masks(*shape, seed=4)
    k1 = gaussian_kernel1d(sigma, dtype=torch.float64).numpy()
    r = (k1.size - 1) // 2
    nd = len(shape) - 2
    soft_np = m.double().mean(1).numpy()
    expected = []
    for img in soft_np:
        pad = np.pad(img, r, mode=np_mode)
        out = np.zeros_like(img)
        kernel = k1
        for _ in range(nd - 1):
            kernel = np.multiply.outer(kernel, k1)
        for offset in np.ndindex(*kernel.shape):
            sl = tuple(slice(o, o + n) for o, n in zip(offset, img.shape))
            out += kernel[offset] * pad[sl]
        expected.append(out)
    got = soft_gaussian(m.to(device), sigma=sigma, padding=padding).cpu()
    torch.testing.assert_close(got, torch.from_numpy(np.stack(expected)).float(), atol=1e-6, rtol=0)


def test_soft_gaussian_sigma_zero_is_soft():
    m = rand_masks(1, 3, 4, 5, seed=6)
    torch.testing.assert_close(soft_gaussian(m, sigma=0.0), m.float().mean(1))


# --- STAPLE --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("R", [2, 3, 4, 5, 6, 7])
@pytest.mark.parametrize("spatial", [(9, 11), (5, 6, 7)])
def test_staple_matches_simpleitk_random(R, spatial):
    m = rand_masks(2, R, *spatial, p=0.35, seed=300 + R)
    W, p, q = staple(m, return_performance=True, dtype=torch.float64)
    for b in range(2):
        ref_w, ref_p, ref_q = sitk_staple(m[b])
        np.testing.assert_allclose(W[b].numpy(), ref_w, atol=1e-9, rtol=0)
        np.testing.assert_allclose(p[b].numpy(), ref_p, atol=1e-9, rtol=0)
        np.testing.assert_allclose(q[b].numpy(), ref_q, atol=1e-9, rtol=0)
    torch.testing.assert_close(staple(m), W.float())  # float32 output by default


@pytest.mark.slow
def test_staple_matches_simpleitk_after_a_long_run():
    m = rand_masks(2, 3, 9, 11, p=0.35, seed=3)  # image 1 needs about 30000 EM iterations
    W = staple(m, dtype=torch.float64)
    for b in range(2):
        np.testing.assert_allclose(W[b].numpy(), sitk_staple(m[b])[0], atol=1e-9, rtol=0)


@pytest.mark.parametrize("R", [2, 3, 5, 7])
@pytest.mark.parametrize("spatial", [(24, 20), (10, 12, 9)])
def test_staple_matches_simpleitk_structured(R, spatial):
    m = blob_masks(R, spatial, seed=R)
    ref_w, _, _ = sitk_staple(m[0])
    np.testing.assert_allclose(staple(m)[0].numpy(), ref_w, atol=1e-4, rtol=0)


def test_staple_confidence_weight_matches_simpleitk():
    m = rand_masks(1, 3, 8, 9, seed=11)
    images = [sitk.GetImageFromArray(x.numpy().astype(np.uint8)) for x in m[0]]
    ref = sitk.GetArrayFromImage(sitk.STAPLE(images, 0.5, 1.0))  # (images, confidence, foreground)
    np.testing.assert_allclose(staple(m, confidence_weight=0.5)[0].numpy(), ref, atol=1e-6, rtol=0)


def test_staple_dense_and_sorted_paths_agree(monkeypatch):
    m = torch.cat([blob_masks(4, (6, 5, 4), seed=s) for s in range(3)])
    dense = staple(m, dtype=torch.float64)
    # the module, not the strategy of the same name that orcal.fusion exports
    monkeypatch.setattr(importlib.import_module("orcal.fusion.staple"), "_DENSE_TABLE_MAX", 0)
    torch.testing.assert_close(staple(m, dtype=torch.float64), dense, atol=1e-12, rtol=0)


def test_staple_many_raters():
    m = blob_masks(70, (12, 10), seed=1)  # more than 62 raters: two packed words per voxel
    W = staple(m)
    assert torch.isfinite(W).all() and W.shape == (1, 12, 10)
    ref_w, _, _ = sitk_staple(m[0])
    if np.isfinite(ref_w).all():
        np.testing.assert_allclose(W[0].numpy(), ref_w, atol=1e-4, rtol=0)


def test_staple_batch_equals_single_images():
    m = torch.cat([rand_masks(1, 3, 8, 8, seed=1), blob_masks(3, (8, 8), seed=2)])
    both = staple(m, dtype=torch.float64)
    for b in range(2):
        torch.testing.assert_close(both[b:b + 1], staple(m[b:b + 1], dtype=torch.float64))


def test_staple_degenerate_cases_no_nan():
    empty = torch.zeros(1, 3, 4, 5, dtype=torch.bool)
    full = torch.ones(1, 3, 4, 5, dtype=torch.bool)
    one_full = empty.clone()
    one_full[0, 0] = True
    identical = blob_masks(1, (6, 6)).expand(1, 3, 6, 6)
    for m, expected in [(empty, 0.0), (full, 1.0), (one_full, None), (identical, None)]:
        W, p, q = staple(m, return_performance=True)
        assert torch.isfinite(W).all() and torch.isfinite(p).all() and torch.isfinite(q).all()
        if expected is not None:
            assert torch.all(W == expected)
        ref_w, _, _ = sitk_staple(m[0])
        if np.isfinite(ref_w).all():
            np.testing.assert_allclose(W[0].numpy(), ref_w, atol=1e-4, rtol=0)
    torch.testing.assert_close(staple(identical), identical[:, 0].float())


def test_staple_hard_and_max_iter():
    m = rand_masks(1, 3, 8, 8, seed=13)
    W = staple(m, dtype=torch.float64)
    assert staple(m, hard=True).equal((W > 0.5).float())
    one = staple(m, max_iter=1, dtype=torch.float64)
    assert not torch.allclose(one, W)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_staple_cuda_matches_cpu():
    m = blob_masks(5, (10, 12, 9), seed=3)
    torch.testing.assert_close(staple(m.cuda(), dtype=torch.float64).cpu(), staple(m, dtype=torch.float64),
                               atol=1e-10, rtol=0)


# --- SIMPLE --------------------------------------------------------------------------------------------

def _square(S, lo, hi):
    m = torch.zeros(S, dtype=torch.bool)
    m[lo:hi, lo:hi] = True
    return m


def test_simple_drops_the_outlier():
    base = _square((12, 12), 2, 8)
    good = []
    for pixel in [(1, 4), (4, 1), (8, 5), (5, 8)]:  # four raters, each off by one different pixel
        r = base.clone()
        r[pixel] = True
        good.append(r)
    outlier = torch.zeros(12, 12, dtype=torch.bool)
    outlier[9:, :] = True
    m = torch.stack(good + [outlier])[None]
    t = simple(m)
    # the outlier is dropped and the four good raters are kept with equal weights
    assert float(t[0, 10:, :].max()) == 0.0
    assert bool((t[0][base] == 1.0).all())
    for pixel in [(1, 4), (4, 1), (8, 5), (5, 8)]:
        assert float(t[0][pixel]) == pytest.approx(0.25)
    assert simple(m, hard=True)[0].equal(base.float())


def test_simple_drops_the_lowest_scorer_round_by_round():
    good = [_square((12, 12), 2, 8), _square((12, 12), 2, 9), _square((12, 12), 3, 8), _square((12, 12), 2, 8)]
    outlier = torch.zeros(12, 12, dtype=torch.bool)
    outlier[9:, :] = True
    m = torch.stack(good + [outlier])[None]
    # alpha = 1 trims one rater per round here until the two identical best ones remain
    torch.testing.assert_close(simple(m), good[0][None].float())
    # a large alpha drops nothing: the Dice-weighted vote of all raters against the majority
    est = m.sum(1)[0] >= 3
    d = torch.stack([2 * (r & est).sum() / (r.sum() + est.sum()) for r in m[0]]).double()
    expected = torch.einsum("r,rhw->hw", d / d.sum(), m[0].double()).float()
    torch.testing.assert_close(simple(m, alpha=10.0)[0], expected, atol=1e-6, rtol=0)


def test_simple_identical_raters_none_dropped():
    r = _square((8, 8), 1, 6)
    m = r.expand(4, 8, 8)[None]
    torch.testing.assert_close(simple(m), r[None].float())


def test_simple_empty_raters_never_all_ones():
    m = torch.zeros(2, 3, 5, 5, dtype=torch.bool)
    assert float(simple(m).max()) == 0.0
    assert float(simple(m, hard=True).max()) == 0.0


def test_simple_one_empty_rater_among_agreeing_ones():
    r = _square((10, 10), 2, 8)
    m = torch.stack([r, r, r, torch.zeros_like(r)])[None]
    torch.testing.assert_close(simple(m), r[None].float())


def test_simple_batched_equals_per_image_and_hard():
    m = torch.cat([blob_masks(5, (12, 12), seed=s) for s in range(3)])
    both = simple(m, alpha=0.5)
    for b in range(3):
        torch.testing.assert_close(both[b:b + 1], simple(m[b:b + 1], alpha=0.5))
    assert simple(m, alpha=0.5, hard=True).equal((both > 0.5).float())


def test_simple_single_rater_is_that_rater():
    m = rand_masks(2, 1, 6, 6)
    torch.testing.assert_close(simple(m), m[:, 0].float())


# --- devices -------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", [m for m in METHODS if m != "random"])
def test_cuda_matches_cpu(method):
    m = rand_masks(2, 3, 6, 7, 5, seed=8)
    torch.testing.assert_close(make_target(method, m.cuda()).cpu(), make_target(method, m), atol=1e-5, rtol=0)


@settings(max_examples=25, deadline=None)
@given(method=st.sampled_from(METHODS), B=st.integers(0, 2), R=st.integers(1, 6),
       spatial=st.lists(st.integers(1, 5), min_size=2, max_size=3), p=st.floats(0.0, 1.0),
       dtype=st.sampled_from([torch.bool, torch.uint8, torch.int64, torch.float32]), seed=st.integers(0, 99))
def test_property_any_valid_input_gives_a_valid_target(method, B, R, spatial, p, dtype, seed):
    m = (rand_masks(B, R, *spatial, p=p, seed=seed)).to(dtype)
    before = m.clone()
    options = {"max_iter": 300} if method == "staple" else {}
    t = make_target(method, m, **options)
    assert t.shape == (B, *spatial) and m.equal(before)
    if method == "ordinal":
        assert t.dtype == torch.uint8 and (t.numel() == 0 or int(t.max()) <= R)
    else:
        assert t.dtype == torch.float32 and not torch.isnan(t).any()
        assert t.numel() == 0 or (float(t.min()) >= 0.0 and float(t.max()) <= 1.0)
    # raters that all agree give back their mask, whatever the strategy, except those that smooth it by design
    same = m[:, :1].expand(B, R, *spatial)
    expected = same[:, 0].float() if method != "ordinal" else (same[:, 0] != 0).to(torch.uint8) * R
    if method not in ("soft_gaussian", "svls", "label_smoothing"):
        torch.testing.assert_close(make_target(method, same, **options), expected)


def test_fusion_module_exports():
    assert set(METHODS) == set(fusion.names())
    assert all(callable(fusion.get(m).fn) and fusion.get(m).label for m in METHODS)


def test_strategies_per_structure_of_label_maps():
    """With several structures each strategy runs one-vs-rest per label: STAPLE equals SimpleITK's STAPLE
    run on the label maps with each label as the foreground value (SPEC §11)."""
    from orcal.data.synthetic import SyntheticMultiRater
    from orcal.fusion import make_target

    ds = SyntheticMultiRater(n=2, R=3, shape=(12, 20, 20), num_structures=3, seed=1)
    labels = torch.stack([ds[i]["masks"] for i in range(2)])
    W = make_target("staple", labels, num_structures=3, dtype=torch.float64)
    assert W.shape == (2, 3, 12, 20, 20)
    for b in range(2):
        images = [sitk.GetImageFromArray(r.numpy()) for r in labels[b]]
        for c in (1, 2, 3):
            f = sitk.STAPLEImageFilter()
            f.SetForegroundValue(float(c))
            np.testing.assert_allclose(W[b, c - 1].numpy(), sitk.GetArrayFromImage(f.Execute(images)),
                                       atol=1e-9, rtol=0)
    soft = make_target("soft", labels, num_structures=3)
    k = orcal.ops.orc_targets(labels, num_structures=3)
    torch.testing.assert_close(soft, k.float() / 3)
    assert torch.equal(make_target("ordinal", labels, num_structures=3), k)
    with pytest.raises(ValueError, match="labels 0..C"):
        make_target("soft", labels, num_structures=2)


def test_staple_refuses_an_infinite_confidence_weight():
    from orcal.fusion.staple import staple

    with pytest.raises(ValueError, match="confidence_weight"):
        staple(torch.ones(1, 3, 4, 4, dtype=torch.uint8), confidence_weight=float("inf"))
