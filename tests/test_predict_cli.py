"""`orcal predict`: checkpoints to probability maps on disk, and the predict -> evaluate round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from orcal.cli import main

SYNTH = ["--dataset", "synthetic", "--option", "n=16", "--option", "shape=(16,16)", "--option", "R=3"]


def _train(out, *extra):
    assert main(["train", *extra, "--epochs", "1", "--max-steps", "2", "--out", str(out), "--quiet",
                 "--device", "cpu"]) == 0


def test_predict_then_evaluate_2d(tmp_path):
    import torch

    from orcal.data import load_dataset
    from orcal.training.checkpoint import load_model
    from orcal.training.predict import predict

    _train(tmp_path / "run", *SYNTH, "--arch", "unet-small")
    assert main(["predict", str(tmp_path / "run"), *SYNTH, "--split", "test", "--out", str(tmp_path / "pred"),
                 "--quiet"]) == 0
    ds = load_dataset("synthetic", split="test", n=16, shape=(16, 16), R=3)
    model, _ = load_model(tmp_path / "run" / "best.pt")
    for case, p, _, _ in predict(model, ds, readout="expected", device="cpu"):
        saved = np.load(tmp_path / "pred" / "expected" / f"{case}.npy")
        np.testing.assert_allclose(saved, p.numpy(), atol=1e-6)  # the same map as the Python API
        k = np.load(tmp_path / "pred" / "expected_k" / f"{case}.npy")
        np.testing.assert_allclose(k, 3 * saved, atol=1e-5)  # E[k] = R x the expected readout
        assert np.load(tmp_path / "pred" / "majority" / f"{case}.npy").shape == (16, 16)
    assert main(["evaluate", "--pred", str(tmp_path / "pred" / "expected"), *SYNTH, "--split", "test",
                 "--out", str(tmp_path / "eval"), "--bootstrap", "0", "--no-progress"]) == 0
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["n_images"] == len(ds) and 0 <= report["metrics"]["mr_ece"] <= 1
    assert torch.isfinite(torch.tensor(report["metrics"]["auc"]))


def _nifti_cases(root, n=3, shape=(12, 12, 8)):
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(0)
    affine = np.diag([0.7, 0.7, 2.5, 1.0])
    affine[:3, 3] = [10.0, -4.0, 3.0]
    for c in range(n):
        d = root / f"patient{c}"
        d.mkdir(parents=True)
        image = rng.normal(size=shape).astype(np.float32)
        blob = np.zeros(shape, np.uint8)
        blob[3:8, 3:8, 2:6] = 1
        nib.save(nib.Nifti1Image(image + 2 * blob, affine), str(d / "image.nii.gz"))
        for r in range(3):
            m = blob.copy()
            m[3 + r, 3:8, 2:6] = 0
            nib.save(nib.Nifti1Image(m, affine), str(d / f"rater{r + 1}.nii.gz"))
    return affine


def test_predict_volumes_keeps_the_affine_and_evaluates(tmp_path):
    nib = pytest.importorskip("nibabel")
    root = tmp_path / "cases"
    affine = _nifti_cases(root)
    _train(tmp_path / "run", "--dataset", "folder", "--root", str(root), "--option", "val_fraction=0",
           "--option", "test_fraction=0", "--no-val", "--arch", "unet3d", "--patch-size", "8", "--batch-size", "2")
    # image files (here the layout's <case>/image.nii.gz) -> NIfTI maps with the input's affine
    assert main(["predict", str(tmp_path / "run" / "last.pt"), str(root), "--out", str(tmp_path / "pred"),
                 "--quiet", "--device", "cpu"]) == 0
    for c in range(3):
        img = nib.load(str(tmp_path / "pred" / "expected" / f"patient{c}.nii.gz"))
        assert img.shape == (12, 12, 8) and np.allclose(img.affine, affine)
        p = np.asarray(img.dataobj)
        assert p.dtype == np.float32 and 0 <= p.min() and p.max() <= 1
    assert main(["evaluate", "--pred", str(tmp_path / "pred" / "expected"), "--raters", str(root), "--rater-glob",
                 "rater*", "--out", str(tmp_path / "eval"), "--bootstrap", "0", "--no-progress"]) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n_images"] == 3
    # the dataset layout gives the same maps, also as NIfTI with the image's affine
    assert main(["predict", str(tmp_path / "run"), "--dataset", "folder", "--root", str(root), "--out",
                 str(tmp_path / "pred2"), "--quiet", "--device", "cpu", "--readout", "expected"]) == 0
    for c in range(3):
        a = np.asarray(nib.load(str(tmp_path / "pred" / "expected" / f"patient{c}.nii.gz")).dataobj)
        b = nib.load(str(tmp_path / "pred2" / "expected" / f"patient{c}.nii.gz"))
        assert np.allclose(b.affine, affine) and np.allclose(np.asarray(b.dataobj), a, atol=1e-6)
    assert not (tmp_path / "pred2" / "majority").exists()


def test_predict_errors_name_the_problem(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "nothing"), *SYNTH, "--out", str(tmp_path / "o")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(tmp_path / "empty"), *SYNTH, "--out", str(tmp_path / "o")]) == 2
    assert "no best.pt or last.pt" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "either image files" in capsys.readouterr().err


def test_a_binary_head_writes_its_sigmoid(tmp_path, capsys):
    """A binary head's one map is its sigmoid, named so (not "majority", which is an ordinal readout); the old
    name is still accepted by --readout, and an ordinal readout is refused naming the head's."""
    _train(tmp_path / "run", *SYNTH, "--method", "soft", "--arch", "unet-small")
    assert main(["predict", str(tmp_path / "run"), *SYNTH, "--split", "test", "--out", str(tmp_path / "pred"),
                 "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["sigmoid"]
    assert main(["predict", str(tmp_path / "run"), *SYNTH, "--split", "test", "--out", str(tmp_path / "old"),
                 "--quiet", "--readout", "majority"]) == 0
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["sigmoid"]
    assert main(["predict", str(tmp_path / "run"), *SYNTH, "--out", str(tmp_path / "o"), "--readout", "expected"]) == 2
    assert "('sigmoid',)" in capsys.readouterr().err
