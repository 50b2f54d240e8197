"""`orcal fuse`: one case and many, formats, agreement, and clear errors on bad files."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from orcal import fusion
from orcal.cli import main
from orcal.commands import fuse as fuse_cmd

nib = pytest.importorskip("nibabel")


def _affine():
    a = np.diag([0.8, 0.8, 2.5, 1.0])
    a[:3, 3] = [-5.0, 3.0, 1.0]
    return a


def _masks(R=3, shape=(6, 7, 5), seed=0):
    rng = np.random.default_rng(seed)
    base = rng.random(shape) < 0.4
    return [base ^ (rng.random(shape) < 0.1) for _ in range(R)]


def _write_nifti(folder, masks):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for r, m in enumerate(masks):
        p = folder / f"rater{r + 1}.nii.gz"
        nib.save(nib.Nifti1Image(m.astype(np.uint8), _affine()), str(p))
        paths.append(str(p))
    return paths


def test_method_choices_come_from_the_registry():
    import argparse

    parser = argparse.ArgumentParser()
    fuse_cmd.configure(parser)
    choices = next(a.choices for a in parser._actions if a.dest == "method")
    assert tuple(choices) == fusion.names() == fusion.METHODS
    for flag in fuse_cmd.OPTION_FLAGS:  # every flag reaches at least one strategy
        assert any(flag in fusion.get(m).options for m in fusion.names()), flag


def test_one_case_staple_nifti(tmp_path, capsys):
    masks = _masks()
    files = _write_nifti(tmp_path / "case", masks)
    out = tmp_path / "out"
    assert main(["fuse", "--method", "staple", "--out", str(out), *files]) == 0
    img = nib.load(str(out / "staple.nii.gz"))
    np.testing.assert_allclose(img.affine, _affine())
    expected = fusion.staple(torch.from_numpy(np.stack(masks))[None])[0].numpy()
    np.testing.assert_allclose(np.asarray(img.dataobj), expected, atol=1e-6)

    # the printed agreement: mean pairwise Dice and, over the raters' union, the fraction where they differ
    dice = np.mean([2 * (a & b).sum() / (a.sum() + b.sum()) for i, a in enumerate(masks) for b in masks[i + 1:]])
    k = np.sum(masks, 0)
    split = ((k > 0) & (k < 3)).sum() / (k > 0).sum()
    text = capsys.readouterr().out
    assert f"{dice:.4f}" in text and f"{split:.4f}" in text
    with open(out / "agreement.csv") as fh:
        row = next(csv.DictReader(fh))
    assert float(row["mean_pairwise_dice"]) == pytest.approx(dice, abs=1e-6)
    assert float(row["disagreement_fraction"]) == pytest.approx(split, abs=1e-6)


def test_many_cases_by_glob(tmp_path):
    for c in range(3):
        _write_nifti(tmp_path / "data" / f"case{c}", _masks(R=2 + c, seed=c))
    (tmp_path / "data" / "notes.txt").write_text("not a case")
    out = tmp_path / "out"
    rc = main(["fuse", "--method", "soft", "--cases", str(tmp_path / "data" / "*/"),
               "--raters", "rater*.nii.gz", "--out", str(out)])
    assert rc == 0
    for c in range(3):
        got = np.asarray(nib.load(str(out / f"case{c}.nii.gz")).dataobj)  # the layout orcal evaluate reads
        np.testing.assert_allclose(got, np.mean(_masks(R=2 + c, seed=c), 0), atol=1e-6)
    with open(out / "agreement.csv") as fh:
        assert [r["case"] for r in csv.DictReader(fh)] == ["case0", "case1", "case2"]


def _write_label_maps(folder, R=3, shape=(6, 7, 5), seed=0):
    """CURVAS-style rater files: labels 1, 2, 3 in one map per rater."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 4, shape)
    folder.mkdir(parents=True, exist_ok=True)
    for r in range(R):
        lab = np.where(rng.random(shape) < 0.15, rng.integers(0, 4, shape), base).astype(np.uint8)
        nib.save(nib.Nifti1Image(lab, _affine()), str(folder / f"annotation_{r + 1}.nii.gz"))


def test_fuse_then_evaluate_multi_label_files(tmp_path, capsys):
    for c in range(3):
        _write_label_maps(tmp_path / "data" / f"case{c}", seed=c)
    out = tmp_path / "fused"
    args = ["--cases", str(tmp_path / "data" / "*/"), "--raters", "annotation_*.nii.gz", "--out", str(out)]
    assert "--label N" in _error(capsys, ["fuse", "--method", "soft", *args])  # a label map needs its label
    assert main(["fuse", "--method", "soft", "--label", "2", *args]) == 0
    truth = [np.mean([np.asarray(nib.load(str(f)).dataobj) == 2
                      for f in sorted((tmp_path / "data" / f"case{c}").glob("*.nii.gz"))], 0) for c in range(3)]
    for c in range(3):
        np.testing.assert_allclose(np.asarray(nib.load(str(out / f"case{c}.nii.gz")).dataobj), truth[c], atol=1e-6)
    # fuse -> evaluate: the soft consensus k / R scored against its own raters is perfectly MR-calibrated
    assert main(["evaluate", "--pred", str(out), "--raters", str(tmp_path / "data"), "--rater-glob",
                 "annotation_*", "--label", "2", "--out", str(tmp_path / "eval"), "--bootstrap", "0",
                 "--no-progress"]) == 0
    import json

    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    assert metrics["mr_ece"] == pytest.approx(0.0, abs=1e-6) and metrics["auc"] > 0.5


def test_png_0_255_in_png_out_and_npy_format(tmp_path):
    masks = _masks(shape=(8, 9), seed=2)
    files = []
    for r, m in enumerate(masks):
        p = tmp_path / f"r{r}.png"
        from PIL import Image

        Image.fromarray(m.astype(np.uint8) * 255).save(p)
        files.append(str(p))
    out = tmp_path / "out"
    assert main(["fuse", "--method", "soft", "--out", str(out), *files]) == 0
    from PIL import Image

    png = np.array(Image.open(out / "soft.png"))
    assert png.dtype == np.uint8
    np.testing.assert_array_equal(png, np.rint(np.mean(masks, 0) * 255).astype(np.uint8))
    assert main(["fuse", "--method", "svls", "--sigma", "2", "--format", "npy", "--out", str(out), *files]) == 0
    got = np.load(out / "svls.npy")
    assert got.dtype == np.float32
    expected = fusion.svls(torch.from_numpy(np.stack(masks))[None], sigma=2.0)[0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_ordinal_and_random_outputs(tmp_path):
    masks = _masks(shape=(5, 6), seed=3)
    files = []
    for r, m in enumerate(masks):
        p = tmp_path / f"r{r}.npy"
        np.save(p, m.astype(np.uint8))
        files.append(str(p))
    assert main(["fuse", "--method", "ordinal", "--out", str(tmp_path / "o"), *files]) == 0
    k = np.load(tmp_path / "o" / "ordinal.npy")
    assert k.dtype == np.uint8
    np.testing.assert_array_equal(k, np.sum(masks, 0))
    assert main(["fuse", "--method", "random", "--seed", "4", "--out", str(tmp_path / "o"), *files]) == 0
    pick = np.load(tmp_path / "o" / "random.npy")
    assert any(np.array_equal(pick, m.astype(np.float32)) for m in masks)


def _error(capsys, argv):
    assert main(argv) == 2
    return capsys.readouterr().err


def test_different_shapes_name_the_file(tmp_path, capsys):
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    np.save(a, np.zeros((4, 4), np.uint8))
    np.save(b, np.zeros((4, 5), np.uint8))
    err = _error(capsys, ["fuse", "--method", "soft", "--out", str(tmp_path / "o"), str(a), str(b)])
    assert "orcal fuse: error:" in err and "b.npy" in err and "shape" in err


def test_non_binary_values_name_the_file(tmp_path, capsys):
    # The loaders' rule: background 0 and one foreground value (1, 255, 7, ...); a second one is an error.
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    np.save(a, np.full((4, 4), 7, np.uint8))
    np.save(b, np.array([[0, 1], [7, 0]], np.uint8))
    err = _error(capsys, ["fuse", "--method", "soft", "--out", str(tmp_path / "o"), str(a), str(b)])
    assert "b.npy" in err and "one foreground value" in err and "7" in err


def test_fewer_than_two_raters(tmp_path, capsys):
    a = tmp_path / "a.npy"
    np.save(a, np.zeros((4, 4), np.uint8))
    err = _error(capsys, ["fuse", "--method", "soft", "--out", str(tmp_path / "o"), str(a)])
    assert "at least 2" in err
    _write_nifti(tmp_path / "data" / "lonely", _masks(R=1))
    err = _error(capsys, ["fuse", "--method", "soft", "--cases", str(tmp_path / "data" / "*"),
                          "--out", str(tmp_path / "o")])
    assert "lonely" in err and "at least 2" in err


def test_usage_errors(tmp_path, capsys):
    out = ["--out", str(tmp_path / "o")]
    assert "matched no folder" in _error(capsys, ["fuse", "--method", "soft", "--cases", str(tmp_path / "none*"),
                                                  *out])
    assert "--cases" in _error(capsys, ["fuse", "--method", "soft", *out])
    assert "--raters needs --cases" in _error(capsys, ["fuse", "--method", "soft", "--raters", "r*", *out,
                                                       "a.npy", "b.npy"])
    err = _error(capsys, ["fuse", "--method", "staple", "--sigma", "2", *out, "a.npy", "b.npy"])
    assert "--sigma does not apply" in err
    assert "a.npy" in _error(capsys, ["fuse", "--method", "soft", *out, str(tmp_path / "a.npy"),
                                      str(tmp_path / "b.npy")])


def test_png_output_of_3d_masks_is_refused(tmp_path, capsys):
    files = _write_nifti(tmp_path / "case", _masks())
    err = _error(capsys, ["fuse", "--method", "soft", "--format", "png", "--out", str(tmp_path / "o"), *files])
    assert "2D" in err
