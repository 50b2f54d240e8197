"""nnU-Net v2 with the real package: convert -> plan and preprocess -> a few training iterations with
nnUNetTrainerORC -> predict with probabilities -> orcal nnunet export -> orcal evaluate, on a tiny 3D set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from orcal.cli import main

TINY_TRAINER = '''
import torch

from orcal.nnunet import nnUNetTrainerORC


class nnUNetTrainerORC_tiny(nnUNetTrainerORC):
    """One epoch of three iterations: a variant the way nnU-Net's own (nnUNetTrainer_5epochs, ...) are made."""

    rps_weight = 0.5

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1, 3, 1
'''


def _nnunet(tool: str, *args: str, env: dict, timeout: int = 300) -> str:
    exe = Path(sys.executable).parent / tool
    done = subprocess.run([str(exe), *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{tool} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _plan_train_predict(dataset_id: int, folder: Path, tmp_path: Path) -> Path:
    """nnU-Net's own commands on a converted dataset: plan and preprocess, train the tiny ORC trainer, predict
    the test images with probabilities. Returns the prediction folder."""
    raw, pre, res, ext = (tmp_path / n for n in ("raw", "pre", "res", "ext"))
    assert main(["nnunet", "trainer", str(ext)]) == 0
    (ext / "tiny.py").write_text(textwrap.dedent(TINY_TRAINER))
    # nnU-Net's pitfalls on a small CPU: one process for planning, no augmentation workers for training
    env = {**os.environ, "nnUNet_raw": str(raw), "nnUNet_preprocessed": str(pre), "nnUNet_results": str(res),
           "nnUNet_def_n_proc": "1", "nnUNet_extTrainer": str(ext)}
    _nnunet("nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", "3d_fullres", "-npfp", "1", "-np", "1",
            "--verify_dataset_integrity", env=env)
    log = _nnunet("nnUNetv2_train", str(dataset_id), "3d_fullres", "0", "-tr", "nnUNetTrainerORC_tiny", "-device",
                  "cpu", env={**env, "nnUNet_n_proc_DA": "0"})
    assert "Using trainer 'nnUNetTrainerORC_tiny'" in log and "train_loss" in log and "Pseudo dice" in log
    pred = tmp_path / "pred"
    _nnunet("nnUNetv2_predict", "-i", str(folder / "imagesTs"), "-o", str(pred), "-d", str(dataset_id), "-c",
            "3d_fullres", "-f", "0", "-tr", "nnUNetTrainerORC_tiny", "--save_probabilities", "-device", "cpu",
            "-npp", "1", "-nps", "1", "--disable_tta", "-chk", "checkpoint_final.pth", env=env)
    return pred


def test_convert_train_predict_export_evaluate(tmp_path):
    pytest.importorskip("nnunetv2")
    sitk = pytest.importorskip("SimpleITK")
    nib = pytest.importorskip("nibabel")
    raw = tmp_path / "raw"
    options = ["--option", "n=10", "--option", "shape=(32,32,24)", "--option", "R=3"]
    assert main(["nnunet", "convert", "--dataset", "synthetic", *options, "--id", "990", "--name", "ORCTest",
                 "--out", str(raw), "--quiet"]) == 0
    folder = raw / "Dataset990_ORCTest"
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "k=1": 1, "k=2": 2, "k=3": 3} and meta["numTraining"] == 8
    cases = json.loads((folder / "cases.json").read_text())
    test_cases = sorted(c for c, v in cases.items() if v["split"] == "test")
    assert sorted(p.name for p in (folder / "ratersTs").iterdir()) == test_cases
    k = np.asarray(nib.load(str(next((folder / "labelsTr").glob("*.nii.gz")))).dataobj)
    assert k.shape == (32, 32, 24) and set(np.unique(k)) <= {0, 1, 2, 3}

    pred = _plan_train_predict(990, folder, tmp_path)

    maps = tmp_path / "maps"
    assert main(["nnunet", "export", str(pred), "--out", str(maps)]) == 0
    for case in test_cases:
        with np.load(pred / f"{case}.npz") as z:
            q = z["probabilities"].astype(np.float64)  # the softmax over the R + 1 = 4 levels
        assert q.shape[0] == 4
        levels = np.arange(4).reshape(4, 1, 1, 1)
        expected = sitk.GetArrayFromImage(sitk.ReadImage(str(maps / "expected" / f"{case}.nii.gz")))
        np.testing.assert_allclose(expected, (levels * q).sum(0) / 3, atol=1e-5)
        majority = sitk.GetArrayFromImage(sitk.ReadImage(str(maps / "majority" / f"{case}.nii.gz")))
        np.testing.assert_allclose(majority, q[2:].sum(0), atol=1e-5)  # P(k >= 2), m = R // 2 + 1
        k_map = sitk.GetArrayFromImage(sitk.ReadImage(str(maps / "expected_k" / f"{case}.nii.gz")))
        np.testing.assert_allclose(k_map, 3 * expected, atol=1e-5)
        image = nib.load(str(folder / "imagesTs" / f"{case}_0000.nii.gz"))
        out = nib.load(str(maps / "expected" / f"{case}.nii.gz"))
        assert out.shape == image.shape and np.allclose(out.affine, image.affine, atol=1e-5)

    assert main(["evaluate", "--pred", str(maps / "expected"), "--raters", str(folder / "ratersTs"), "--out",
                 str(tmp_path / "eval"), "--bootstrap", "0", "--no-progress"]) == 0
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["n_images"] == len(test_cases) and 0 <= report["metrics"]["mr_ece"] <= 1


def test_trainer_loss_handles_deep_supervision_and_the_ignore_label():
    pytest.importorskip("nnunetv2")
    import torch
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

    import orcal
    from orcal.losses import OrdinalLoss

    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(2, 4, 8, 8, 8, generator=g), torch.randn(2, 4, 4, 4, 4, generator=g)]
    k = [torch.randint(0, 4, (2, 1, 8, 8, 8), generator=g).to(torch.int16),
         torch.randint(0, 4, (2, 1, 4, 4, 4), generator=g).to(torch.int16)]
    k[0][0, 0, :2] = 4  # nnU-Net's ignore label (the one after the last class)
    loss = DeepSupervisionWrapper(OrdinalLoss(0.5, ignore_index=4), (0.75, 0.25))(logits, k)
    valid = k[0][:, 0] != 4
    direct = 0.75 * orcal.ordinal_loss(logits[0], torch.where(valid, k[0][:, 0], 0).to(torch.uint8), rps_weight=0.5,
                                       valid=valid) \
        + 0.25 * orcal.ordinal_loss(logits[1], k[1][:, 0].to(torch.uint8), rps_weight=0.5)
    assert torch.allclose(loss, direct, atol=1e-6)


def test_errors_name_the_problem(tmp_path, capsys):
    assert main(["nnunet", "export", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--save_probabilities" in capsys.readouterr().err
    assert main(["nnunet", "convert", "--dataset", "synthetic", "--id", "0", "--name", "X", "--out",
                 str(tmp_path)]) == 2
    assert "1..999" in capsys.readouterr().err


def test_several_structures_convert_train_predict_export_evaluate(tmp_path):
    """Three structures through the real nnU-Net: the joint vote count as nnU-Net's class, the ordinal loss
    on each structure's marginal levels, and maps per structure exported from the joint softmax."""
    pytest.importorskip("nnunetv2")
    sitk = pytest.importorskip("SimpleITK")
    from orcal.nnunet import joint_levels, marginal_matrix

    raw = tmp_path / "raw"
    options = ["--option", "n=10", "--option", "shape=(24,32,32)", "--option", "R=3", "--option", "structures=3"]
    assert main(["nnunet", "convert", "--dataset", "synthetic", *options, "--id", "991", "--name", "ORCStructures",
                 "--out", str(raw), "--quiet"]) == 0
    folder = raw / "Dataset991_ORCStructures"
    meta = json.loads((folder / "dataset.json").read_text())
    levels = joint_levels(3, 3)
    assert len(meta["labels"]) == len(levels) == 20 and meta["labels"]["k=0/1/2"] == 6
    assert meta["orcal"]["num_structures"] == 3
    pred = _plan_train_predict(991, folder, tmp_path)
    maps = tmp_path / "maps"
    assert main(["nnunet", "export", str(pred), "--out", str(maps)]) == 0
    cases = sorted(p.stem for p in pred.glob("*.npz"))
    M = marginal_matrix(3, 3).numpy()
    for case in cases:
        with np.load(pred / f"{case}.npz") as z:
            q = z["probabilities"].astype(np.float64)  # the softmax over the 20 joint classes
        marginal = np.tensordot(M, q, axes=1).reshape(3, 4, *q.shape[1:])
        for c in range(3):
            path = maps / "expected" / f"structure{c + 1}" / f"{case}.nii.gz"
            got = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
            np.testing.assert_allclose(got, (np.arange(4).reshape(4, 1, 1, 1) * marginal[c]).sum(0) / 3, atol=1e-5)
    assert main(["evaluate", "--pred", str(maps / "expected" / "structure2"), "--raters", str(folder / "ratersTs"),
                 "--label", "2", "--out", str(tmp_path / "eval"), "--bootstrap", "0", "--no-progress"]) == 0
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["n_images"] == len(cases) and 0 <= report["metrics"]["mr_ece"] <= 1


def test_the_joint_loss_is_the_ordinal_loss_of_each_structures_marginals():
    import torch

    import orcal
    from orcal.nnunet import JointOrdinalLoss, joint_index, joint_levels

    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (2, 4, 5, 6, 3), generator=g)  # 4 raters, 2 structures
    k = orcal.orc_targets(labels, num_classes=2)
    target = torch.from_numpy(np.stack([joint_index(k[b].numpy(), 4) for b in range(2)]))[:, None]
    levels = joint_levels(2, 4)
    assert torch.equal(levels[target[:, 0].long()].movedim(-1, 1), k)
    target[0, 0, 0] = len(levels)  # nnU-Net's ignore label
    z = torch.randn(2, len(levels), 5, 6, 3, generator=g, dtype=torch.float64)
    loss = JointOrdinalLoss(2, 4, rps_weight=0.5, ignore_index=len(levels))(z, target)
    q = torch.softmax(z, 1)
    direct = 0
    valid = target[:, 0] != len(levels)
    for c in range(2):  # brute force: the marginal distribution of structure c's levels
        marg = torch.stack([q[:, levels[:, c] == j].sum(1) for j in range(5)], 1)
        direct = direct + orcal.ordinal_loss(torch.log(marg), k[:, c], rps_weight=0.5, valid=valid, backend="torch")
    torch.testing.assert_close(loss, direct.float(), atol=1e-5, rtol=1e-5)
