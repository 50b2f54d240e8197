"""The calibration losses of other work run as methods (orcal.losses, orcal.fusion's calibration-losses group):
hL1-ACE against its definition, the focal loss against its formula, NACL as MONAI computes it, label smoothing,
the training objective and the experiment's grids."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from orcal import fusion
from orcal.losses import BinaryFocalLoss, HardL1ACELoss, hard_l1_ace, soft_dice_loss


def _ace_by_hand(p: list[float], y: list[float], n_bins: int) -> float:
    bins: dict[int, list[tuple[float, float]]] = {}
    for pi, yi in zip(p, y):
        bins.setdefault(min(int(pi * n_bins), n_bins - 1), []).append((pi, yi))
    gaps = [abs(sum(a for a, _ in v) / len(v) - sum(b for _, b in v) / len(v)) for v in bins.values()]
    return sum(gaps) / len(gaps)


def test_hard_l1_ace_value_is_the_mean_gap_over_non_empty_bins():
    torch.manual_seed(0)
    p, y = torch.rand(2, 7, 5, dtype=torch.float64), (torch.rand(2, 7, 5) > 0.5).double()
    valid = torch.rand(2, 7, 5) > 0.3
    assert hard_l1_ace(p, y, 20).item() == pytest.approx(_ace_by_hand(p.flatten().tolist(), y.flatten().tolist(), 20))
    assert hard_l1_ace(p, y, 4, valid).item() == pytest.approx(_ace_by_hand(p[valid].tolist(), y[valid].tolist(), 4))
    # two voxels in one bin, one in another: (|0.15 - 0.5| + |0.9 - 1|) / 2, and p = 1 falls in the last bin
    assert hard_l1_ace(torch.tensor([0.1, 0.2, 0.9]), torch.tensor([0.0, 1.0, 1.0]), 2).item() == pytest.approx(0.225)
    assert hard_l1_ace(torch.tensor([1.0]), torch.tensor([1.0]), 10).item() == 0.0
    empty = torch.zeros(3, requires_grad=True)
    out = hard_l1_ace(empty, torch.zeros(3), 10, torch.zeros(3, dtype=torch.bool))
    out.backward()
    assert out.item() == 0.0 and empty.grad.abs().sum() == 0
    with pytest.raises(ValueError, match="n_bins"):
        hard_l1_ace(p, y, 0)


def test_hard_l1_ace_gradient_flows_through_the_confidences():
    torch.manual_seed(1)
    n_bins = 5
    # keep every probability away from a bin edge, so that the finite differences do not change the bins
    p = ((torch.randint(0, n_bins, (3, 4)) + 0.2 + 0.6 * torch.rand(3, 4)) / n_bins).double().requires_grad_()
    y = (torch.rand(3, 4) > 0.5).double()
    valid = torch.rand(3, 4) > 0.2
    assert torch.autograd.gradcheck(lambda q: hard_l1_ace(q, y, n_bins, valid), (p,))
    z = torch.logit(p.detach()).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: HardL1ACELoss(0.7, n_bins)(x, y, valid), (z,))


def test_hl1_ace_loss_is_the_base_plus_the_weighted_ace():
    torch.manual_seed(2)
    z, y = torch.randn(2, 1, 6, 6), (torch.rand(2, 6, 6) > 0.5).float()
    bce = F.binary_cross_entropy_with_logits(z[:, 0], y)
    ace = hard_l1_ace(torch.sigmoid(z[:, 0]), y, 20)
    assert HardL1ACELoss(ace_base="bce")(z, y).item() == pytest.approx((bce + ace).item(), rel=1e-6)
    assert HardL1ACELoss(ace_weight=0.0, ace_base="bce")(z, y).item() == pytest.approx(bce.item(), rel=1e-6)
    dice = soft_dice_loss(torch.sigmoid(z[:, 0]), y)
    assert HardL1ACELoss()(z, y).item() == pytest.approx((bce + dice + ace).item(), rel=1e-6)
    with pytest.raises(ValueError, match="ace_weight"):
        HardL1ACELoss(ace_weight=-1.0)
    with pytest.raises(ValueError, match="ace_base"):
        HardL1ACELoss(ace_base="dice")
    with pytest.raises(ValueError, match="one shape"):  # (B, 1, *S) against (B, *S) would broadcast
        soft_dice_loss(torch.sigmoid(z), y)
    with pytest.raises(ValueError, match="smooth"):
        soft_dice_loss(torch.sigmoid(z[:, 0]), y, smooth=-1.0)


def test_hl1_ace_default_base_is_monai_dice_ce():
    """The authors' segmentation loss, DiceCE, as MONAI computes it for one sigmoid channel."""
    monai_losses = pytest.importorskip("monai.losses")
    torch.manual_seed(4)
    z, y = torch.randn(3, 1, 5, 7), (torch.rand(3, 1, 5, 7) > 0.7).float()
    y[1] = 0  # an image without foreground: MONAI's smoothing terms decide its Dice
    want = monai_losses.DiceCELoss(sigmoid=True)(z, y) + hard_l1_ace(torch.sigmoid(z[:, 0]), y[:, 0], 20)
    assert HardL1ACELoss()(z, y[:, 0]).item() == pytest.approx(want.item(), rel=1e-5)
    # invalid voxels count for nothing: the same as cropping them away
    valid = torch.zeros(3, 5, 7, dtype=torch.bool)
    valid[:, 1:4, 2:6] = True
    crop = HardL1ACELoss()(z[:, :, 1:4, 2:6].contiguous(), y[:, 0, 1:4, 2:6].contiguous())
    assert HardL1ACELoss()(z, y[:, 0], valid).item() == pytest.approx(crop.item(), rel=1e-5)


def test_a_changed_method_version_changes_only_its_runs_fingerprints():
    from orcal import fusion
    from orcal.experiment.config import DatasetSpec, ExperimentConfig, Run, fingerprint

    spec = DatasetSpec("synthetic")
    cfg = ExperimentConfig(datasets=[spec], methods=("hl1_ace", "median"))
    before = {m: fingerprint(cfg, spec, Run(m, 0.0, m)) for m in ("hl1_ace", "median")}
    entry = fusion.get("hl1_ace")
    try:
        fusion.register("hl1_ace", entry.fn, label=entry.label, options=entry.options, uses_majority=True,
                        loss=entry.loss, loss_options=entry.loss_options, group=entry.group,
                        version=entry.version + 1, replace=True)
        after = {m: fingerprint(cfg, spec, Run(m, 0.0, m)) for m in ("hl1_ace", "median")}
    finally:
        fusion.register("hl1_ace", entry.fn, label=entry.label, options=entry.options, uses_majority=True,
                        loss=entry.loss, loss_options=entry.loss_options, group=entry.group,
                        version=entry.version, replace=True)
    assert after["hl1_ace"] != before["hl1_ace"] and after["median"] == before["median"]


def _focal_by_hand(z: torch.Tensor, y: torch.Tensor, gamma: float, alpha: float | None) -> torch.Tensor:
    p = torch.sigmoid(z)
    pt = torch.where(y > 0, p, 1 - p)
    loss = -((1 - pt) ** gamma) * torch.log(pt)
    if alpha is not None:
        loss = loss * torch.where(y > 0, alpha, 1 - alpha)
    return loss


@pytest.mark.parametrize("alpha", [None, 0.25])
def test_focal_loss_value_and_gradient(alpha):
    torch.manual_seed(3)
    z = torch.randn(2, 5, 5, dtype=torch.float64, requires_grad=True)
    y, valid = (torch.rand(2, 5, 5) > 0.5).double(), torch.rand(2, 5, 5) > 0.3
    loss = BinaryFocalLoss(focal_gamma=2.0, focal_alpha=alpha)
    assert loss(z, y, valid).item() == pytest.approx(_focal_by_hand(z, y, 2.0, alpha)[valid].mean().item())
    assert torch.autograd.gradcheck(lambda x: loss(x, y, valid), (z,))
    with pytest.raises(ValueError, match="focal_alpha"):
        BinaryFocalLoss(focal_alpha=1.5)


def test_focal_loss_falls_back_to_monai_without_torchvision(monkeypatch):
    pytest.importorskip("monai")
    torch.manual_seed(4)
    z, y = torch.randn(2, 4, 4), (torch.rand(2, 4, 4) > 0.5).float()
    monkeypatch.setitem(sys.modules, "torchvision.ops", None)  # import fails as if torchvision were absent
    assert BinaryFocalLoss(3.0)(z, y).item() == pytest.approx(_focal_by_hand(z, y, 3.0, None).mean().item(), rel=1e-5)
    monkeypatch.setitem(sys.modules, "monai.losses", None)
    with pytest.raises(ImportError, match=r"orcal\[models\]"):
        BinaryFocalLoss()


def test_nacl_is_monai_nacl_on_the_logits_zero_and_z():
    monai_losses = pytest.importorskip("monai.losses")
    from orcal.losses import NACLBinaryLoss

    torch.manual_seed(5)
    z = torch.randn(2, 1, 8, 8, requires_grad=True)
    y = (torch.rand(2, 8, 8) > 0.5).float()
    ours = NACLBinaryLoss()(z, y)
    theirs = monai_losses.NACLLoss(classes=2, dim=2)(torch.cat([torch.zeros_like(z), z], 1), y.long())
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    # without the penalty it is the head's BCE (softmax of [0, z] is the sigmoid)
    bce = F.binary_cross_entropy_with_logits(z[:, 0], y)
    assert NACLBinaryLoss(nacl_alpha=0.0)(z, y).item() == pytest.approx(bce.item(), rel=1e-6)
    ours.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    # 3D, and a batch whose second image is zero padding beyond 5 x 6: each image on its own valid box
    z3, y3 = torch.randn(1, 4, 6, 6), (torch.rand(1, 4, 6, 6) > 0.5).float()
    assert NACLBinaryLoss()(z3, y3).item() == pytest.approx(
        monai_losses.NACLLoss(classes=2, dim=3)(torch.stack([torch.zeros_like(z3), z3], 1), y3.long()).item(), rel=1e-6)
    valid = torch.ones(2, 8, 8, dtype=torch.bool)
    valid[1, 5:], valid[1, :, 6:] = False, False
    one = NACLBinaryLoss()(z[:1], y[:1])
    two = NACLBinaryLoss()(z[1:, :, :5, :6], y[1:, :5, :6])
    assert NACLBinaryLoss()(z, y, valid).item() == pytest.approx(((64 * one + 30 * two) / 94).item(), rel=1e-6)
    valid[0, 0, 0] = False
    with pytest.raises(ValueError, match="box"):
        NACLBinaryLoss()(z, y, valid)


def test_nacl_without_monai_says_how_to_install_it(monkeypatch):
    from orcal.losses import NACLBinaryLoss
    from orcal.training.config import TrainConfig
    from orcal.training.objective import Objective

    monkeypatch.setitem(sys.modules, "monai.losses", None)
    with pytest.raises(ImportError, match=r"pip install orcal\[monai\]"):
        NACLBinaryLoss()
    with pytest.raises(ImportError, match=r"orcal\[monai\]"):
        Objective(TrainConfig(method="nacl", dataset="synthetic"))


def test_label_smoothing_smooths_the_majority_label():
    masks = torch.tensor([[[[1, 0, 1]], [[1, 0, 0]], [[0, 0, 1]]]])  # 3 raters: votes 2, 0, 2
    assert torch.allclose(fusion.make_target("label_smoothing", masks), torch.tensor([[[0.95, 0.05, 0.95]]]))
    assert torch.allclose(fusion.make_target("label_smoothing", masks, smoothing=0.2, majority=3),
                          torch.tensor([[[0.1, 0.1, 0.1]]]))
    with pytest.raises(ValueError, match="smoothing"):
        fusion.make_target("label_smoothing", masks, smoothing=1.5)


def test_the_group_and_its_registry_entries():
    group = fusion.groups()["calibration-losses"]
    assert group == ("nacl", "hl1_ace", "label_smoothing", "focal")
    assert not set(group) & set(fusion.default_names()) and set(group) <= set(fusion.names())
    for name in group:
        assert fusion.get(name).head == "binary" and fusion.get(name).uses_majority
    with pytest.raises(ValueError, match="head='binary'"):
        fusion.register("toy_loss", fusion.median, loss=HardL1ACELoss, head="ordinal")


def test_objective_of_a_loss_method_trains_its_loss_to_the_majority_label():
    from orcal.training.config import TrainConfig
    from orcal.training.objective import Objective

    torch.manual_seed(6)
    masks = torch.rand(2, 3, 6, 6) > 0.5
    z = torch.randn(2, 1, 6, 6)
    majority = fusion.make_target("median", masks)
    objective = Objective(TrainConfig(method="focal", dataset="synthetic", fusion_options={"focal_gamma": 1.0}))
    g = torch.Generator()
    expected = _focal_by_hand(z[:, 0], majority, 1.0, None)
    assert objective(z, masks, None, g).item() == pytest.approx(expected.mean().item(), rel=1e-5)
    valid = torch.rand(2, 6, 6) > 0.4
    assert objective(z, masks, valid, g, reduction="sum").item() == pytest.approx(expected[valid].sum().item(),
                                                                                  rel=1e-5)
    ace = Objective(TrainConfig(method="hl1_ace", dataset="synthetic", fusion_options={"ace_weight": 0.0}))
    bce = F.binary_cross_entropy_with_logits(z[:, 0], majority)
    dice = soft_dice_loss(torch.sigmoid(z[:, 0]), majority)
    assert ace(z, masks, None, g).item() == pytest.approx((bce + dice).item(), rel=1e-6)
    bce_only = Objective(TrainConfig(method="hl1_ace", dataset="synthetic",
                                     fusion_options={"ace_weight": 0.0, "ace_base": "bce"}))
    assert bce_only(z, masks, None, g).item() == pytest.approx(bce.item(), rel=1e-6)
    labels = torch.randint(0, 3, (2, 3, 6, 6))
    with pytest.raises(ValueError, match="one structure"):
        objective(torch.randn(2, 2, 6, 6), labels, None, g, num_structures=2)


def test_experiment_grids_and_the_methods_group():
    from orcal.experiment import DatasetSpec, ExperimentConfig, candidate_runs, fingerprint, plan_runs
    from orcal.experiment.config import SELECTION_GRIDS, tuned_option

    spec = DatasetSpec("synthetic")
    assert ExperimentConfig(datasets=[spec]).methods == fusion.default_names()  # the demo does not grow
    cfg = ExperimentConfig(datasets=[spec], methods=("soft", "calibration-losses", "focal"), select_on_val=True,
                           fusion_options={"focal_gamma": 3.0})
    assert cfg.methods == ("soft", "nacl", "hl1_ace", "label_smoothing", "focal")
    main, _ = plan_runs(cfg)
    assert {r.method: r.value for r in main} == {"soft": None, "nacl": 0.1, "hl1_ace": 1.0, "label_smoothing": 0.1,
                                                 "focal": 3.0}  # defaults, or the option given
    cands = candidate_runs(cfg)
    for method in ("nacl", "hl1_ace", "label_smoothing", "focal"):
        option = tuned_option(method)
        assert [r.value for r in cands[method]] == list(SELECTION_GRIDS[option]), method
        assert {r.parameter[0] for r in cands[method]} == {option}
    assert cands["hl1_ace"][1].key == "hl1_ace" and cands["focal"][0].key == "focal@focal_gamma=1"
    assert len({fingerprint(cfg, spec, r) for r in cands["focal"]}) == 3
    with pytest.raises(ValueError, match="calibration-losses"):
        ExperimentConfig(datasets=[spec], methods=("nope",))


@pytest.mark.parametrize("bad", [2.0, -0.5, float("nan")])
def test_calibration_losses_refuse_targets_outside_0_1(bad):
    """As SoftBCELoss does: a target that is no probability would train without a word."""
    z, t = torch.randn(2, 1, 4, 4), (torch.rand(2, 1, 4, 4) < 0.5).float()
    t[0, 0, 0, 0] = bad
    for loss in (HardL1ACELoss(), BinaryFocalLoss()):
        with pytest.raises(ValueError, match=r"target must hold values in \[0, 1\]"):
            loss(z, t)
