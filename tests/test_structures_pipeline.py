"""Several structures through training, prediction and the experiment (SPEC §11), on synthetic label maps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from orcal.data import load_dataset

OPTIONS = {"num_structures": 3, "shape": (8, 16, 16), "n": 8, "R": 3}


def _train(method: str, out_dir=None, epochs: int = 1):
    from orcal.training.config import TrainConfig
    from orcal.training.loop import train

    cfg = TrainConfig(dataset="synthetic", dataset_options=dict(OPTIONS), method=method, epochs=epochs,
                      max_steps_per_epoch=2, batch_size=2, patch_size=(8, 16, 16), arch="unet3d", device="cpu",
                      val_split="val", out_dir=None if out_dir is None else str(out_dir))
    return train(cfg, progress=False)


@pytest.mark.parametrize("method", ["ordinal", "soft", "random"])
def test_training_on_several_structures(method):
    res = _train(method)
    channels = 3 * 4 if method == "ordinal" else 3
    assert res.num_structures == 3 and res.model.orcal_spec["num_structures"] == 3
    out = res.model(torch.zeros(1, 1, 8, 16, 16))
    assert out.shape == (1, channels, 8, 16, 16)
    record = res.history[-1]
    assert np.isfinite(record["train_loss"]) and np.isfinite(record["val_loss"])
    assert 0 <= record["val_mr_ece"] <= 1 and 0 <= record["val_dice"] <= 1


def test_the_label_prior_is_per_structure():
    from orcal.training.data import label_prior

    ds = load_dataset("synthetic", None, **OPTIONS)
    labels = torch.stack([ds[i]["masks"] for i in range(len(ds))]).long()
    bias = label_prior(ds, "ordinal", 3, num_structures=3)
    assert bias.shape == (12,)
    for c in range(3):  # exp(bias) is each structure's add-one vote-count frequency
        counts = torch.bincount((labels == c + 1).sum(1).reshape(-1), minlength=4).double()
        torch.testing.assert_close(bias[4 * c:4 * c + 4].exp().double(), (counts + 1) / (counts.sum() + 4),
                                   rtol=1e-5, atol=0)
    assert label_prior(ds, "binary", 3, num_structures=3).shape == (3,)


def test_predictions_of_several_structures(tmp_path):
    from orcal.training.checkpoint import load_model
    from orcal.training.predict import predict_readouts, write_predictions

    res = _train("ordinal", tmp_path / "run")
    test = load_dataset("synthetic", None, split="test", **OPTIONS)
    ids, probs, masks, _ = next(predict_readouts(res, test, ("majority", "expected")))
    assert probs["expected"].shape == (1, 3, 8, 16, 16) and masks.shape == (1, 3, 8, 16, 16)
    model = load_model(tmp_path / "run" / "best.pt")[0]  # the checkpoint knows its structures
    folders = write_predictions(model, test, tmp_path / "pred", progress=False)
    assert set(folders) == {f"{r}/structure{c}" for r in ("majority", "expected", "expected_k") for c in (1, 2, 3)}
    k_map = np.load(folders["expected_k/structure2"] / f"{ids[0]}.npy")
    torch.testing.assert_close(torch.from_numpy(k_map), probs["expected"][0, 1] * 3, atol=1e-5, rtol=1e-5)


def test_an_experiment_on_several_structures(tmp_path):
    from orcal.cli import main

    out = tmp_path / "exp"
    assert main(["experiment", "--dataset", "synthetic", "--option", "num_structures=3", "--option", "shape=(8,16,16)",
                 "--option", "n=10", "--option", "R=3", "--methods", "soft,ordinal", "--epochs", "1",
                 "--max-steps", "2", "--batch-size", "2", "--patch-size", "8,16,16", "--arch", "unet3d",
                 "--n-boot", "50", "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    key = next(iter(results["runs"]))
    assert results["datasets"][key]["num_structures"] == 3
    rows = results["runs"][key]
    assert {"mr_ece/1", "mr_ece/2", "mr_ece/3", "mr_ece/macro"} <= set(rows["ordinal/expected"])
    report = (out / "report.md").read_text()
    assert "## Per structure" in report and "MR-ECE (structure 3)" in report
    volumes = results["volumes"][key]["ordinal/expected"]  # 3D data: the volume uncertainty of SPEC §11.4
    assert 0 <= volumes["volume_coverage"] <= 1 and volumes["volume_crps"] >= 0 and "volume_crps/3" in volumes
    assert "## Volume uncertainty" in report and "reliability diagram per structure" in report
    assert list((out / "figures").glob("reliability_structures_*.png"))
    assert any(p.name.startswith("structures_mr_ece_") for p in out.iterdir())


def test_the_per_structure_reliability_figure(tmp_path):
    import orcal
    from orcal.metrics import plots

    g = torch.Generator().manual_seed(0)
    st = orcal.calibration_stats(torch.randn(3, 8, 6, 5, generator=g), torch.randint(0, 3, (3, 3, 6, 5), generator=g),
                                 kind="ordinal", num_structures=2)
    path = plots.reliability_per_structure({"ORC": st, "again": st}, tmp_path / "r.png", title="two structures")
    assert (tmp_path / "r.png").stat().st_size > 10_000 and path.endswith("r.png")
    with pytest.raises(ValueError, match="several structures"):
        plots.reliability_per_structure({"one": st.structure(0)}, tmp_path / "x.png")


def test_train_predict_evaluate_on_curvas_structures(tmp_path):
    """The command-line path on several CT structures: train with --structures all, predict a map per
    structure with the input's affine, and evaluate one structure against its task's raters."""
    nib = pytest.importorskip("nibabel")
    from orcal.cli import main

    root = tmp_path / "curvas"
    rng = np.random.default_rng(0)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    for c in range(4):
        d = root / f"case{c}"
        d.mkdir(parents=True)
        nib.save(nib.Nifti1Image(rng.uniform(-200, 300, (8, 16, 16)).astype(np.float32), affine),
                 str(d / "image.nii.gz"))
        for r in (1, 2, 3):
            lab = np.zeros((8, 16, 16), np.uint8)
            lab[1:4, 2:6 + r, 2:8] = 1
            lab[4:7, 9:14, 3:6 + r] = 2
            lab[2:6, 10:12, 10:15] = 3
            nib.save(nib.Nifti1Image(lab, affine), str(d / f"annotation_{r}.nii.gz"))
    run = tmp_path / "run"
    assert main(["train", "--dataset", "curvas", "--root", str(root), "--structures", "all", "--arch", "unet3d",
                 "--epochs", "1", "--max-steps", "1", "--batch-size", "1", "--patch-size", "8,16,16",
                 "--option", "val_fraction=0.25", "--option", "test_fraction=0.25", "--out", str(run),
                 "--quiet"]) == 0
    pred = tmp_path / "pred"
    assert main(["predict", str(run), "--dataset", "curvas", "--root", str(root), "--structures", "all",
                 "--option", "val_fraction=0.25", "--option", "test_fraction=0.25", "--split", "test",
                 "--out", str(pred), "--quiet"]) == 0
    written = sorted((pred / "expected" / "structure3").iterdir())
    assert len(written) == 1 and written[0].name.endswith(".nii.gz")
    np.testing.assert_allclose(nib.load(str(written[0])).affine, affine)
    assert main(["evaluate", "--pred", str(pred / "expected" / "structure3"), "--dataset", "curvas", "--root",
                 str(root), "--task", "liver", "--split", "test", "--option", "val_fraction=0.25", "--option",
                 "test_fraction=0.25", "--bootstrap", "0", "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n_images"] == 1 and 0 <= metrics["metrics"]["mr_ece"] <= 1


@pytest.mark.parametrize("method", ["soft", "ordinal"])
def test_one_structure_of_label_maps_is_the_binary_objective(method):
    from orcal.training.config import TrainConfig
    from orcal.training.objective import Objective

    objective = Objective(TrainConfig(method=method))
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (2, 3, 6, 5), generator=g).to(torch.uint8)  # label 1 only: one structure
    valid = torch.rand(2, 6, 5, generator=g) > 0.3  # padding, as collate marks it
    logits = torch.randn(2, 4 if method == "ordinal" else 1, 6, 5, generator=g)
    got = objective(logits, labels, valid, g, num_structures=1)
    assert torch.allclose(got, objective(logits, labels, valid, g))
