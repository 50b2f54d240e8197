"""Hostile inputs to the metrics added on top of the ops (SPEC §8): volume metrics, temperature scaling, the
torchmetrics and MONAI forms. Values outside their domain are an error naming the argument, states that do not
fit are refused, and valid inputs (empty batches, every integer vote dtype) are accepted. The metric forms run
on every backend available here (the Triton kernels in the interpreter, tests/backend_cases.py)."""

from __future__ import annotations

import math

import pytest
import torch
from backend_cases import INTERPRETED, run_triton_cases

import orcal
from orcal.metrics import TemperatureScaler, fit_temperature

NAN, INF = math.nan, math.inf


def test_triton_cases():
    """The backend cases of this file on the Triton kernels, in Triton's interpreter (a child process)."""
    run_triton_cases(__file__)


def _masks(B=1, R=3, S=(4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(B, R, *S, generator=g) < 0.5).to(torch.uint8)


# --- volume metrics -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [1.5, -0.2, NAN, INF])
@pytest.mark.parametrize("structures", [None, 2])
def test_volume_stats_refuse_values_outside_probabilities(value, structures):
    masks = _masks()
    p = torch.full((1, 4, 4) if structures is None else (1, 2, 4, 4), 0.5)
    p.view(-1)[-1] = value
    raters = masks if structures is None else masks * 2
    with pytest.raises(ValueError, match=r"prob must hold probabilities in \[0, 1\]; found .* \(1 bad values\)"):
        orcal.volume_stats(p, raters, num_structures=structures)
    valid = torch.ones(1, 4, 4, dtype=torch.bool)
    valid.view(-1)[-1] = False  # where it does not count, it is never read
    st = orcal.volume_stats(p, raters, valid=valid, num_structures=structures)
    assert torch.isfinite(st.mean).all() and torch.isfinite(st.var).all()


@pytest.mark.parametrize("count, error", [(2.0, TypeError), ("2", TypeError), (True, TypeError), (0, ValueError)])
def test_volume_stats_check_the_structure_count(count, error):
    with pytest.raises(error, match="num_structures"):
        orcal.volume_stats(torch.rand(1, 2, 4, 4), _masks(), num_structures=count)


def test_volume_stats_refuse_integer_probabilities():
    with pytest.raises(TypeError, match="prob must be a float tensor"):
        orcal.volume_stats(torch.ones(1, 4, 4, dtype=torch.int64), _masks())


@pytest.mark.parametrize("structures", [None, 2])
def test_volume_stats_of_an_empty_batch(structures):
    p = torch.zeros((0, 4, 4) if structures is None else (0, 2, 4, 4))
    st = orcal.volume_stats(p, torch.zeros(0, 3, 4, 4, dtype=torch.uint8), num_structures=structures)
    assert st.mean.shape == (0,) and st.raters.shape == (0, 3)
    full = orcal.volume_stats(p.new_full((1, *p.shape[1:]), 0.25), _masks(), num_structures=structures)
    assert orcal.volume_metrics(orcal.VolumeStats.cat([st, full])) == orcal.volume_metrics(full)


# --- temperature scaling --------------------------------------------------------------------------------------

def _held_out(kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(0, 4, (2, 8, 8), generator=g, dtype=torch.uint8)
    z = torch.randn((2, 4, 8, 8) if kind == "ordinal" else (2, 8, 8), generator=g)
    return z, k


@pytest.mark.parametrize("kind", ["logit", "ordinal"])
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_temperature_scaling_refuses_non_finite_logits(kind, value):
    z, k = _held_out(kind)
    z.view(-1)[5] = value
    with pytest.raises(ValueError, match="logits hold NaN or infinite values at 1 valid voxels"):
        fit_temperature(z, k, num_raters=3, kind=kind)
    valid = torch.ones(2, 8, 8, dtype=torch.bool)
    valid.view(-1)[5] = False  # the voxel of flat index 5 (of channel 0 for ordinal logits): never read
    assert 0.02 < fit_temperature(z, k, num_raters=3, kind=kind, valid=valid) < 50


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32])
def test_temperature_scaling_takes_every_integer_vote_dtype(dtype):
    z, k = _held_out("logit")
    assert fit_temperature(z, k.to(dtype), num_raters=3) == fit_temperature(z, k, num_raters=3)


def test_temperature_scaling_vote_errors_name_the_target():
    z, k = _held_out("logit")
    with pytest.raises(ValueError, match=r"target \(vote counts\) must lie in 0..R = 0..3; found 4..7"):
        fit_temperature(z, k + 4, num_raters=3)
    with pytest.raises(TypeError, match="target"):  # float counts are read only when they hold integers
        TemperatureScaler().update(z, k.float() + 0.5, num_raters=3)
    TemperatureScaler().update(z, k.float(), num_raters=3)


# --- torchmetrics forms ---------------------------------------------------------------------------------------

def test_torchmetrics_state_of_other_bins_or_structures_is_refused(be):
    tm = pytest.importorskip("orcal.integrations.torchmetrics", exc_type=ImportError)
    backend, dev = be
    p, t = torch.rand(1, 4, 4, device=dev), _masks().to(dev)
    a, b = tm.MultiRaterECE(backend=backend), tm.MultiRaterECE(n_bins=10, auc_bins=4101, backend=backend)
    a.update(p, t)
    b.update(p, t)
    before = float(a.compute())
    for incoming in (b, b.metric_state):
        with pytest.raises(ValueError, match="bins"):
            a.merge_state(incoming)
    assert float(a.compute()) == before  # left as it was
    b.persistent(True)
    c = tm.MultiRaterECE(backend=backend)
    c.persistent(True)
    with pytest.raises((ValueError, RuntimeError), match="other bins or another number of structures"):
        c.load_state_dict(b.state_dict())
    two, three = (tm.MultiRaterECE(num_structures=n, backend=backend) for n in (2, 3))
    three.persistent(True)
    with pytest.raises((ValueError, RuntimeError), match="num_structures=2"):
        two.load_state_dict(three.state_dict())
    with pytest.raises(ValueError, match="num_structures"):
        two.merge_state(three)
    # one structure: the 1-D state of earlier versions and the (1, X) state hold the same values
    one = tm.MultiRaterECE(num_structures=1, backend=backend)
    one.persistent(True)
    one.update(p[:, None], t.clamp(max=1))
    plain = tm.MultiRaterECE(backend=backend)
    plain.load_state_dict(one.state_dict())
    plain.update(p[:, :0], t[:, :, :0])  # an empty update: compute() then knows the state is not the default
    assert float(plain.compute()) == float(one.compute())
    same = tm.MultiRaterECE(backend=backend)
    same.update(p, t)
    same.merge_state(a)
    assert float(same.compute()) == pytest.approx(before)


def test_torchmetrics_plot_uses_the_metrics_own_dist_sync_fn(be):
    tm = pytest.importorskip("orcal.integrations.torchmetrics", exc_type=ImportError)
    pytest.importorskip("matplotlib").use("Agg")
    backend, dev = be
    calls = []

    def gather(result, group=None, **kwargs):  # one rank: its own state
        calls.append(tuple(result.shape))
        return [result]

    metric = tm.MultiRaterECE(dist_sync_fn=gather, distributed_available_fn=lambda: True, backend=backend)
    metric.update(torch.rand(1, 4, 4, device=dev), _masks().to(dev))
    fig, ax = metric.plot()
    assert calls and fig is not None and ax is not None


# --- MONAI metric ---------------------------------------------------------------------------------------------

def test_monai_metric_refuses_lists_of_different_lengths(be):
    pytest.importorskip("monai")
    from orcal.integrations.monai import MultiRaterCalibrationMetric

    backend, dev = be
    metric = MultiRaterCalibrationMetric(kind="prob", backend=backend)
    preds = [torch.rand(1, 4, 4, device=dev), torch.rand(1, 4, 4, device=dev)]
    with pytest.raises(ValueError, match="2 predictions need as many targets, got 1"):
        metric(preds, [_masks()[0].to(dev)])
    with pytest.raises(ValueError):
        metric(torch.rand(2, 1, 4, 4, device=dev), _masks(1).to(dev))


@pytest.mark.parametrize("bad", [NAN, 1.5])
def test_monai_rater_stack_refuses_nan_and_non_integer_labels(bad):
    pytest.importorskip("monai")
    from orcal.integrations.monai import StackRatersd

    maps = [torch.zeros(1, 4, 4) for _ in range(3)]
    maps[0][0, 0, 0] = 1.0
    maps[1][0, 1, 1] = bad  # NaN != 0 would be a vote; 1.5 would match no structure
    data = {f"r{i}": m for i, m in enumerate(maps)}
    for transform in (StackRatersd(keys=list(data)), StackRatersd(keys=list(data), structures=[1, 2])):
        with pytest.raises(TypeError, match=r"StackRatersd: data\['r1'\] \(label map\) .* non-integer values"):
            transform(data)
    maps[1][0, 1, 1] = 1.0
    assert int(StackRatersd(keys=list(data))(data)["masks"].sum()) == 2


@pytest.mark.skipif(INTERPRETED, reason="runs in the main process")
def test_metric_checks_an_empty_batch():
    from orcal.metrics import MultiRaterCalibration

    metric = MultiRaterCalibration()
    with pytest.raises(ValueError, match="pred"):
        metric.update(torch.rand(0, 7), torch.zeros(0, 3, 4, 4, dtype=torch.uint8))
    metric.update(torch.rand(0, 4, 4), torch.zeros(0, 3, 4, 4, dtype=torch.uint8))  # consistent: adds nothing
    metric.update(torch.rand(1, 4, 4), torch.ones(1, 3, 4, 4, dtype=torch.uint8))
    assert metric.compute()["n_images"] == 1


def test_rater_masks_as_float_holding_0_1_follow_the_one_rule():
    """Volume metrics and the conformal calibrators read MONAI's float32 0/1 rater masks as the uint8 ones, and
    refuse interpolated values naming the fix (SPEC §8)."""
    from orcal.metrics import ConformalRiskControl

    p, masks = torch.rand(2, 4, 4), _masks(B=2)
    assert orcal.volume_stats(p, masks.float()).mean.equal(orcal.volume_stats(p, masks).mean)
    a, b = ConformalRiskControl(), ConformalRiskControl()
    a.update(p, masks.float())
    b.update(p, masks)
    assert a.fit(0.5) == b.fit(0.5)
    for call in (lambda m: orcal.volume_stats(p, m), lambda m: ConformalRiskControl().update(p, m)):
        with pytest.raises(TypeError, match="non-integer values .* nearest"):
            call(masks.float() * 0.5)
