"""Public ops: input validation (SPEC §8), backend choice, and the compiled orc_targets op."""

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, given, settings

import orcal
from orcal import ops
from orcal.ops import _ext, reference

needs_cpp = pytest.mark.skipif(not _ext.has_kernel("orc_targets", torch.device("cpu")),
                               reason="compiled CPU kernels not built")


def masks_case(B=2, R=3, S=(5, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(B, R, *S, generator=g) < 0.5).to(torch.uint8)


# --- orc_targets -------------------------------------------------------------------------------------

@needs_cpp
@pytest.mark.parametrize("S", [(5, 6), (3, 4, 5), (1, 1)])
@pytest.mark.parametrize("R", [1, 2, 7, 255])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.bool])
def test_orc_targets_cpp_equals_reference(S, R, dtype):
    masks = masks_case(R=R, S=S, seed=R).to(dtype)
    out = orcal.orc_targets(masks, backend="cpp")
    assert out.dtype == torch.uint8 and out.shape == (2, *S)
    assert torch.equal(out, reference.orc_targets(masks))


@needs_cpp
def test_orc_targets_noncontiguous_and_empty():
    masks = masks_case(B=3, R=4, S=(6, 8)).permute(0, 1, 3, 2)
    assert torch.equal(orcal.orc_targets(masks, backend="cpp"), reference.orc_targets(masks))
    empty = torch.zeros(0, 3, 4, 4, dtype=torch.uint8)
    assert orcal.orc_targets(empty, backend="cpp").shape == (0, 4, 4)


@needs_cpp
def test_orc_targets_opcheck():
    torch.library.opcheck(torch.ops.orcal.orc_targets.default, (masks_case(),))


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_cpp)])
def test_non_binary_mask_is_an_error(backend):
    masks = masks_case()
    masks[0, 1, 2, 3] = 2
    with pytest.raises(ValueError, match="binary"):
        orcal.orc_targets(masks, backend=backend)


def test_inputs_are_not_modified():
    masks = masks_case()
    before = masks.clone()
    orcal.orc_targets(masks)
    logits = torch.randn(2, 4, 5, 6)
    lb = logits.clone()
    orcal.ordinal_loss(logits, reference.orc_targets(masks))
    assert torch.equal(masks, before) and torch.equal(logits, lb)


# --- validation errors -------------------------------------------------------------------------------

def test_loss_shape_mismatch():
    with pytest.raises(ValueError, match="k must have shape"):
        orcal.ordinal_loss(torch.randn(2, 4, 5, 6), torch.zeros(2, 5, 7, dtype=torch.uint8))


def test_loss_k_greater_than_r():
    k = torch.zeros(1, 3, 3, dtype=torch.uint8)
    k[0, 1, 1] = 4
    for backend in ["torch"] + (["cpp"] if _ext.has_kernel("ordinal_loss", torch.device("cpu")) else []):
        with pytest.raises(ValueError, match="0..R"):
            orcal.ordinal_loss(torch.randn(1, 4, 3, 3), k, backend=backend)
    with pytest.raises(ValueError, match="0..R"):
        orcal.ordinal_loss(torch.randn(1, 4, 3, 3), k.long())


def test_loss_wrong_dtypes():
    with pytest.raises(TypeError, match="logits must be float"):
        orcal.ordinal_loss(torch.zeros(1, 4, 3, 3, dtype=torch.int32), torch.zeros(1, 3, 3, dtype=torch.uint8))
    with pytest.raises(TypeError, match="non-integer"):  # floats holding integers are vote counts (MONAI's)
        orcal.ordinal_loss(torch.randn(1, 4, 3, 3), torch.full((1, 3, 3), 0.5))
    with pytest.raises(TypeError, match="valid must be a bool"):
        orcal.ordinal_loss(torch.randn(1, 4, 3, 3), torch.zeros(1, 3, 3, dtype=torch.uint8),
                           valid=torch.ones(1, 3, 3))
    with pytest.raises(TypeError, match="torch.Tensor"):
        orcal.ordinal_loss([[1.0]], torch.zeros(1, 3, 3, dtype=torch.uint8))


def test_loss_bad_arguments():
    logits, k = torch.randn(1, 4, 3, 3), torch.zeros(1, 3, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="reduction"):
        orcal.ordinal_loss(logits, k, reduction="avg")
    with pytest.raises(ValueError, match="majority"):
        orcal.ordinal_loss(logits, k, majority=4)
    with pytest.raises(ValueError, match="backend"):
        orcal.ordinal_loss(logits, k, backend="fast")
    with pytest.raises(ValueError, match="R \\+ 1 channels"):
        orcal.ordinal_loss(torch.randn(1, 1, 3, 3), k)
    with pytest.raises(ValueError, match="2D or 3D"):
        orcal.ordinal_loss(torch.randn(4, 3), k)


def test_wrong_device():
    logits = torch.randn(1, 4, 3, 3, device="meta")
    with pytest.raises(ValueError, match="device"):
        orcal.ordinal_loss(logits, torch.zeros(1, 3, 3, dtype=torch.uint8))


def test_stats_channel_count_must_match_raters():
    masks = masks_case(R=3)
    with pytest.raises(ValueError, match="R = 4"):
        orcal.calibration_stats(torch.randn(2, 5, 5, 6), masks, kind="ordinal")


@pytest.mark.parametrize("bad", [float("nan"), 1.5, -0.1])
def test_stats_probabilities_outside_unit_interval(bad):
    masks = masks_case()
    p = torch.rand(2, 5, 6)
    p[1, 2, 3] = bad
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        orcal.calibration_stats(p, masks, backend="torch")
    if _ext.has_kernel("calibration_stats", torch.device("cpu")):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            orcal.calibration_stats(p, masks, backend="cpp")
    valid = torch.ones(2, 5, 6, dtype=torch.bool)
    valid[1, 2, 3] = False  # an invalid voxel is ignored, whatever it holds
    orcal.calibration_stats(p, masks, valid=valid, backend="torch")


def test_stats_k_greater_than_r_and_shape_mismatch():
    p = torch.rand(2, 5, 6)
    with pytest.raises(ValueError, match="0..R"):
        orcal.calibration_stats(p, torch.full((2, 5, 6), 4, dtype=torch.uint8), num_raters=3, backend="torch")
    with pytest.raises(ValueError, match="same images"):
        orcal.calibration_stats(torch.rand(2, 5, 7), masks_case())
    # one rule for counts and masks everywhere: floats holding integers (MONAI's resampled labels) are read as
    # integers, interpolated values are refused with the fix
    same = orcal.calibration_stats(p, masks_case().float()).pack()[0]
    assert torch.equal(same, orcal.calibration_stats(p, masks_case()).pack()[0])
    with pytest.raises(TypeError, match="non-integer.*mode=\\('bilinear', 'nearest'\\)"):
        orcal.calibration_stats(p, masks_case().float() * 0.5)
    with pytest.raises(ValueError, match="0..1"):
        orcal.calibration_stats(p, masks_case().float() * 2)
    with pytest.raises(ValueError, match="kind"):
        orcal.calibration_stats(p, masks_case(), kind="probability")


def test_stats_accepts_channel_axis_and_logits():
    masks = masks_case()
    logit = torch.randn(2, 1, 5, 6)
    a = orcal.calibration_stats(logit, masks, kind="logit", backend="torch")
    b = orcal.calibration_stats(torch.sigmoid(logit[:, 0]), masks, backend="torch")
    assert torch.equal(a.n, b.n) and torch.equal(a.pos, b.pos)


def test_backend_by_name_that_is_missing_says_how_to_get_it(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="CUDA tensors|not installed"):
        orcal.orc_targets(masks_case(), backend="triton")


def test_orcal_backend_environment_variable(monkeypatch):
    monkeypatch.setenv("ORCAL_BACKEND", "torch")
    assert ops.resolve_backend("orc_targets", "auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv("ORCAL_BACKEND", "bogus")
    with pytest.raises(ValueError, match="ORCAL_BACKEND"):
        ops.resolve_backend("orc_targets", "auto", torch.device("cpu"))


def test_metrics_and_bootstrap_reject_wrong_types():
    with pytest.raises(TypeError):
        orcal.calibration_metrics({"n": 1})
    st_ = orcal.calibration_stats(torch.rand(2, 5, 6), masks_case())
    with pytest.raises(ValueError, match="fraction"):
        orcal.bootstrap(st_, fraction=0)


def test_build_info_reports_what_was_built():
    info = orcal.build_info()
    assert {"torch", "compiled", "cuda", "triton"} <= info.keys()


# --- property-based: random inputs never crash or hang ----------------------------------------------

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(0, 2), R=st.integers(1, 9), S=st.lists(st.integers(1, 4), min_size=1, max_size=4),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64]),
       extra=st.integers(-1, 1), kmax=st.integers(0, 12), backend=st.sampled_from(["auto", "torch"]))
def test_random_inputs_give_a_result_or_a_clear_error(B, R, S, dtype, extra, kmax, backend):
    g = torch.Generator().manual_seed(B * 1000 + R * 10 + kmax)
    logits = torch.randn(B, R + 1 + extra, *S, generator=g).to(dtype)
    k = torch.randint(0, kmax + 1, (B, *S), generator=g).to(torch.uint8)
    try:
        loss = orcal.ordinal_loss(logits, k, backend=backend)
    except (ValueError, TypeError):
        return
    assert torch.isfinite(loss).all()
