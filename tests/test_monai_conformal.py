"""ConformalMaskd: a fitted conformal calibrator in a real MONAI pipeline (MetaTensors, SaveImaged)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import orcal
from orcal.metrics import ConformalLevelSets, ConformalRiskControl, ConformalVoxelSets

nib = pytest.importorskip("nibabel")
monai_data = pytest.importorskip("monai.data")
monai_transforms = pytest.importorskip("monai.transforms")
orcal_monai = pytest.importorskip("orcal.integrations.monai")

AFFINE = torch.tensor([[0.8, 0, 0, 10.0], [0, 0.8, 0, -5.0], [0, 0, 2.0, 3.0], [0, 0, 0, 1]], dtype=torch.float64)


def _calibration(B: int = 30, shape=(10, 9, 6), seed: int = 0):
    """Volumes with a soft blob and three raters who disagree at its border: probs (B, *S), masks (B, 3, *S)."""
    g = torch.Generator().manual_seed(seed)
    axes = [torch.linspace(-1, 1, s) for s in shape]
    d = sum(a.view(*([1] * i), -1, *([1] * (len(shape) - i - 1))) ** 2 for i, a in enumerate(axes))
    logit = 5 * (0.5 + 0.2 * torch.rand(B, 1, 1, 1, generator=g) - d) + 0.5 * torch.randn(B, *shape, generator=g)
    masks = (logit[:, None] + 1.2 * torch.randn(B, 3, *shape, generator=g)) > 0
    return torch.sigmoid(logit), masks


def test_voxel_sets_written_with_the_affine(tmp_path):
    p, masks = _calibration()
    sets = ConformalVoxelSets()
    sets.update(p[:25], masks[:25])
    sets.fit(0.1)
    image = monai_data.MetaTensor(p[25:26], affine=AFFINE, meta={"filename_or_obj": str(tmp_path / "case0.nii.gz")})
    save = [monai_transforms.SaveImaged(key, output_dir=str(tmp_path / "out"), output_postfix=key,
                                        separate_folder=False, output_dtype=np.uint8, print_log=False)
            for key in ("pred_mask", "pred_uncertain")]
    pipeline = monai_transforms.Compose([orcal_monai.ConformalMaskd("pred", calibrator=sets, lower_suffix="_sure"),
                                         *save])
    d = pipeline({"pred": image})
    want = sets.predict(p[25:26])
    for key, ref in (("pred_mask", want.upper), ("pred_uncertain", want.uncertain), ("pred_sure", want.lower)):
        out = d[key]
        assert isinstance(out, monai_data.MetaTensor) and out.dtype == torch.uint8 and out.shape == (1, 10, 9, 6)
        assert torch.equal(out.as_tensor().bool(), ref)
        torch.testing.assert_close(out.affine.double(), AFFINE)
    assert 0 < int(d["pred_uncertain"].sum()) < d["pred_uncertain"].numel()
    saved = sorted((tmp_path / "out").glob("*.nii.gz"))
    assert len(saved) == 2
    for f in saved:  # SaveImaged writes each mask on the input's grid
        img = nib.load(f)
        np.testing.assert_allclose(img.affine, AFFINE.numpy(), atol=1e-5)
        assert set(np.unique(np.asarray(img.dataobj)).tolist()) <= {0, 1}


def test_risk_control_on_ordinal_logits_of_several_structures():
    g = torch.Generator().manual_seed(1)
    R, C = 3, 2
    logits = torch.randn(12, C * (R + 1), 7, 7, generator=g)
    p = orcal.foreground_probability(logits, "expected", num_structures=C)
    labels = (torch.rand(12, R, 7, 7, generator=g) * (C + 1)).to(torch.uint8)
    crc = ConformalRiskControl(num_structures=C)
    crc.update(p, labels)
    crc.fit(0.3)
    x = monai_data.MetaTensor(logits[0], affine=AFFINE)
    d = orcal_monai.ConformalMaskd("pred", calibrator=crc, kind="ordinal", readout="expected")({"pred": x})
    assert "pred_uncertain" not in d  # risk control has thresholds, no sets
    assert d["pred_mask"].shape == (C, 7, 7)
    assert torch.equal(d["pred_mask"].as_tensor().bool(), crc.predict(p[:1])[0])
    binary = ConformalVoxelSets()
    binary.update(p[:, 0], labels == 1)
    binary.fit(0.3)
    z = torch.logit(p[0, :1].clamp(1e-6, 1 - 1e-6))
    d = orcal_monai.ConformalMaskd("z", calibrator=binary, kind="logit")({"z": z})
    assert d["z_uncertain"].shape == (1, 7, 7) and not isinstance(d["z_mask"], monai_data.MetaTensor)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="not fitted"):
        orcal_monai.ConformalMaskd("pred", calibrator=ConformalVoxelSets())
    with pytest.raises(TypeError, match="ConformalRiskControl or ConformalVoxelSets"):
        orcal_monai.ConformalMaskd("pred", calibrator=ConformalLevelSets())
    p, masks = _calibration(10, (5, 5, 4))
    sets = ConformalVoxelSets()
    sets.update(p, masks)
    sets.fit(0.2)
    with pytest.raises(ValueError, match="1 structure"):
        orcal_monai.ConformalMaskd("pred", calibrator=sets)({"pred": p[:2]})
    with pytest.raises(ValueError, match="decollate"):
        orcal_monai.ConformalMaskd("pred", calibrator=sets)({"pred": torch.rand(5)})
