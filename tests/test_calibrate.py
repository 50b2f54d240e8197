"""Post-hoc temperature scaling (orcal.metrics.calibrate, SPEC §10) against voxel-rater pairs."""

from __future__ import annotations

import pytest
import torch

from orcal.metrics import MultiRaterCalibration, TemperatureScaler, apply_temperature, fit_temperature


def _binary(seed=0, shape=(4, 48, 48), R=5, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g) * scale  # calibrated logits: k ~ Binomial(R, sigmoid(z))
    k = torch.binomial(torch.full_like(z, float(R)), torch.sigmoid(z), generator=g).to(torch.uint8)
    return z, k, R


def _ordinal(seed=0, shape=(4, 32, 32), R=4):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape[0], R + 1, *shape[1:], generator=g) * 1.5  # calibrated level logits
    levels = torch.multinomial(torch.softmax(z, 1).movedim(1, -1).reshape(-1, R + 1), 1, generator=g)
    return z, levels.reshape(shape).to(torch.uint8), R


def _mr_ece(pred, k, R, kind, readout="majority"):
    metric = MultiRaterCalibration(kind=kind, readout=readout, agreement=False)
    metric.update(pred, k, num_raters=R)
    return metric.compute()["mr_ece"]


@pytest.mark.parametrize("factor", [2.5, 0.4])
def test_recovers_a_known_miscalibration(factor):
    z, k, R = _binary()
    T = fit_temperature(factor * z, k, num_raters=R)
    assert T == pytest.approx(factor, rel=0.06)
    assert fit_temperature(z, k, num_raters=R) == pytest.approx(1.0, rel=0.06)


def test_calibrated_mr_ece_is_not_worse_on_validation():
    z, k, R = _binary(seed=1)
    val, test = slice(0, 2), slice(2, 4)
    for factor in (3.0, 1.0, 0.5):
        logits = factor * z
        scaler = TemperatureScaler()
        scaler.update(logits[val], k[val], num_raters=R)
        scaler.fit()
        before = _mr_ece(logits[val], k[val], R, "logit")
        after = _mr_ece(scaler(logits[val]), k[val], R, "logit")
        assert after <= before + 1e-3, factor
        if factor != 1.0:  # a real miscalibration: held-out images improve too
            assert _mr_ece(scaler(logits[test]), k[test], R, "logit") < _mr_ece(logits[test], k[test], R, "logit")


@pytest.mark.parametrize("readout", ["majority", "expected"])
def test_ordinal_logits_before_either_readout(readout):
    z, k, R = _ordinal()
    logits = 3.0 * z  # three times too confident
    scaler = TemperatureScaler(kind="ordinal", readout=readout)
    scaler.update(logits, k, num_raters=R)
    T = scaler.fit()
    assert T > 1.5
    assert scaler.pair_nll(T) <= min(scaler.pair_nll(1.0), scaler.pair_nll(3.0))
    before = _mr_ece(logits, k, R, "ordinal", readout)
    after = _mr_ece(scaler(logits), k, R, "ordinal", readout)
    assert after < before


def test_streaming_sample_is_bounded_and_fits_the_same_temperature():
    z, k, R = _binary(seed=2, shape=(8, 40, 40))
    logits = 2.0 * z
    whole = fit_temperature(logits, k, num_raters=R)
    scaler = TemperatureScaler(max_voxels=6000, seed=3)
    for b in range(8):  # rater stacks this time, with a valid mask
        masks = (torch.arange(R)[:, None, None] < k[b].long()).to(torch.uint8)
        scaler.update(logits[b:b + 1, None], masks[None], valid=torch.ones(1, 40, 40, dtype=torch.bool))
    assert scaler._k.numel() == 6000
    assert scaler.fit() == pytest.approx(whole, rel=0.08)
    assert "voxels=6000" in repr(scaler)


def test_errors_name_the_problem():
    z, k, R = _binary(shape=(1, 8, 8))
    scaler = TemperatureScaler()
    with pytest.raises(RuntimeError, match="update"):
        scaler.fit()
    with pytest.raises(RuntimeError, match="fit"):
        scaler(z)
    with pytest.raises(ValueError, match="0..R"):
        scaler.update(z, k + 10, num_raters=R)
    with pytest.raises(ValueError, match="same images"):
        scaler.update(z[:, :4], k, num_raters=R)
    with pytest.raises(ValueError, match="R \\+ 1"):
        TemperatureScaler(kind="ordinal").update(torch.randn(1, 3, 8, 8), k, num_raters=R)
    scaler.update(z, k, num_raters=R)
    with pytest.raises(ValueError, match="R = 5 raters before"):
        scaler.update(z, k.clamp(max=3), num_raters=3)
    with pytest.raises(ValueError, match="positive"):
        apply_temperature(z, 0.0)
    with pytest.raises(ValueError, match="kind"):
        TemperatureScaler(kind="prob")
