"""nn.Module losses: OrdinalLoss wraps orcal.ordinal_loss; SoftBCELoss on hard/soft targets with a valid mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import orcal
from orcal.losses import OrdinalLoss, SoftBCELoss


def test_ordinal_loss_matches_functional():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, 6, requires_grad=True)
    k = torch.randint(0, 4, (2, 5, 6), dtype=torch.uint8)
    valid = torch.rand(2, 5, 6) > 0.3
    for reduction in ("mean", "sum", "none"):
        module = OrdinalLoss(rps_weight=0.5, majority=3, reduction=reduction)
        expected = orcal.ordinal_loss(logits, k, rps_weight=0.5, majority=3, valid=valid, reduction=reduction)
        assert torch.allclose(module(logits, k, valid), expected, atol=1e-6)
    loss = OrdinalLoss()(logits, k)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert "rps_weight=1.0" in repr(OrdinalLoss())


def test_ordinal_loss_rejects_bad_settings():
    with pytest.raises(ValueError, match="reduction"):
        OrdinalLoss(reduction="avg")
    with pytest.raises(ValueError, match="rps_weight"):
        OrdinalLoss(rps_weight=-1)


def test_soft_bce_matches_torch_on_soft_and_hard_targets():
    torch.manual_seed(0)
    logit = torch.randn(3, 1, 4, 5) * 5
    for target in (torch.rand(3, 4, 5), (torch.rand(3, 4, 5) > 0.5).float()):
        ref = F.binary_cross_entropy_with_logits(logit[:, 0], target)
        assert torch.allclose(SoftBCELoss()(logit, target), ref, atol=1e-6)
        assert torch.allclose(SoftBCELoss()(logit[:, 0], target), ref, atol=1e-6)
        assert torch.allclose(SoftBCELoss("sum")(logit, target), ref * target.numel(), rtol=1e-5)


def test_soft_bce_valid_mask():
    logit = torch.randn(2, 1, 3, 3, 3, requires_grad=True)
    target = torch.rand(2, 3, 3, 3)
    valid = torch.zeros(2, 3, 3, 3, dtype=torch.bool)
    valid[0, 1] = True
    ref = F.binary_cross_entropy_with_logits(logit[:, 0][valid], target[valid])
    assert torch.allclose(SoftBCELoss()(logit, target, valid), ref, atol=1e-6)
    full = SoftBCELoss("none")(logit, target, valid)
    assert full.shape == (2, 3, 3, 3) and float(full.detach()[~valid].abs().sum()) == 0
    empty = SoftBCELoss()(logit, target, torch.zeros_like(valid))
    empty.backward()
    assert float(empty.detach()) == 0 and float(logit.grad.abs().sum()) == 0  # no valid voxel: 0, zero gradient, no NaN


def test_soft_bce_half_precision_and_extreme_logits():
    logit = torch.tensor([[[-1e4, 1e4, 0.0]]], dtype=torch.bfloat16)
    target = torch.tensor([[[0.0, 1.0, 0.5]]])
    loss = SoftBCELoss()(logit, target)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_soft_bce_errors():
    with pytest.raises(ValueError, match="target"):
        SoftBCELoss()(torch.zeros(1, 1, 2, 2), torch.full((1, 2, 2), 1.5))
    with pytest.raises(ValueError, match="shape"):
        SoftBCELoss()(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2))
    with pytest.raises(TypeError, match="valid"):
        SoftBCELoss()(torch.zeros(1, 1, 2, 2), torch.zeros(1, 2, 2), torch.ones(1, 2, 2))
    with pytest.raises(TypeError, match="logit"):
        SoftBCELoss()(torch.zeros(1, 1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="reduction"):
        SoftBCELoss("avg")
