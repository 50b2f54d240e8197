"""nnU-Net v2 with the real package: convert -> plan and preprocess -> a few training iterations with
nnUNetTrainerORC -> predict with probabilities -> orcal nnunet export -> orcal evaluate, on a tiny 3D set."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

import orcal as orcal_package
from orcal.cli import main

TINY_TRAINER = '''
import torch

from orcal.integrations.nnunet import nnUNetTrainerORC


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


DOCS = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"


def _documented_commands() -> str:
    """The bash block of docs/integrations.md's nnU-Net section, as written."""
    text = DOCS.read_text()
    section = text[text.index("## nnU-Net v2"):]
    section = section[:section.index("\n## ", 1)]
    return section.split("```bash\n", 1)[1].split("```", 1)[0]


def _curvas_ct(root: Path, n: int = 10, shape: tuple[int, ...] = (32, 32, 24)) -> None:
    """``n`` CT volumes in CURVAS' layout, in HU reaching beyond its window (-200, 300), with the pancreas
    (label 1) marked by three raters."""
    from orcal.data.synthetic import generate_case
    from orcal.io import write_array

    rng = np.random.default_rng(0)
    for i in range(n):
        case = generate_case(rng, shape, 3)
        folder = root / f"UKCHLL{i:03d}"
        write_array(folder / "image.nii.gz", ((case["image"][0] - 0.4) * 2000).astype(np.float32))
        for r in range(3):
            write_array(folder / f"annotation_{r + 1}.nii.gz", case["masks"][r].astype(np.uint8))


def _read(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.mark.slow
def test_documented_commands_run_as_written_and_a_raw_scan_predicts_as_its_converted_copy(tmp_path):
    """docs/integrations.md's nnU-Net block, run literally on the CPU (its CURVAS root and ~ pointed at tiny
    data), then nnUNetv2_predict on the raw HU scans of the test cases: the same level probabilities as on
    the converted images (convert keeps the original intensities, which nnU-Net normalises itself)."""
    pytest.importorskip("nnunetv2")
    pytest.importorskip("SimpleITK")
    block = _documented_commands()
    assert "-device cpu" in block and "/data/curvas" in block
    trainer = re.search(r"nnUNetv2_train .* -tr (\S+)", block).group(1)
    data, home, work = tmp_path / "curvas", tmp_path / "home", tmp_path / "work"
    _curvas_ct(data)
    work.mkdir()
    exe = Path(sys.executable).parent
    repo = str(Path(orcal_package.__file__).resolve().parents[1])
    env = {**os.environ, "HOME": str(home), "PATH": f"{exe}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join([repo, *filter(None, [os.environ.get("PYTHONPATH")])]),
           "ORCAL_PYTHON": sys.executable, "nnUNet_def_n_proc": "1"}
    # this checkout's orcal; no augmentation workers in training (the docs' advice for a small CPU)
    prelude = ('orcal() { "$ORCAL_PYTHON" -m orcal "$@"; }\n'
               'nnUNetv2_train() { nnUNet_n_proc_DA=0 command nnUNetv2_train "$@"; }\nset -euo pipefail\n')
    done = subprocess.run(["bash", "-c", prelude + block.replace("/data/curvas", str(data))], cwd=work, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, f"the documented commands failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"

    folder = home / "nnunet" / "raw" / "Dataset501_CurvasPancreas"
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"} and meta["orcal"]["options"] == {"label": 1}
    assert meta["labels"] == {"background": 0, "k=1": 1, "k=2": 2, "k=3": 3}
    cases = json.loads((folder / "cases.json").read_text())
    test_cases = sorted(c for c, v in cases.items() if v["split"] == "test")
    assert test_cases and sorted(p.name for p in (folder / "ratersTs").iterdir()) == test_cases
    for case in test_cases:  # the scan itself, in HU
        np.testing.assert_array_equal(_read(folder / "imagesTs" / f"{case}_0000.nii.gz"),
                                      _read(data / cases[case]["id"] / "image.nii.gz"))

    # nnU-Net's final validation gives a number: the Dice of the majority region k >= 2
    results = home / "nnunet" / "results" / "Dataset501_CurvasPancreas"
    summary = json.loads((next(results.glob(f"{trainer}__*")) / "fold_0" / "validation" / "summary.json").read_text())
    assert np.isfinite(summary["foreground_mean"]["Dice"]) and len(summary["mean"]) == 1

    # a new raw scan, as a team gives it to nnUNetv2_predict, predicts as its converted copy
    raw_in = tmp_path / "raw_scans"
    raw_in.mkdir()
    for case in test_cases:
        shutil.copy(data / cases[case]["id"] / "image.nii.gz", raw_in / f"{case}_0000.nii.gz")
    _nnunet("nnUNetv2_predict", "-i", str(raw_in), "-o", str(tmp_path / "pred_raw"), "-d", "501", "-c",
            "3d_fullres", "-f", "0", "-tr", trainer, "--save_probabilities", "-device", "cpu", "-npp", "1", "-nps",
            "1", env={**env, "nnUNet_raw": str(home / "nnunet" / "raw"), "nnUNet_results": str(results.parent),
                      "nnUNet_preprocessed": str(home / "nnunet" / "preprocessed"),
                      "nnUNet_extTrainer": str(home / "nnunet" / "trainers")})
    pred, maps = work / "pred", work / "maps"
    for case in test_cases:
        with np.load(pred / f"{case}.npz") as z, np.load(tmp_path / "pred_raw" / f"{case}.npz") as z_raw:
            q, q_raw = z["probabilities"].astype(np.float64), z_raw["probabilities"].astype(np.float64)
        gap = float(np.abs(q - q_raw).max())
        assert gap < 1e-4, f"{case}: the raw scan's level probabilities differ from the converted copy's by {gap}"
        # the exported maps are the readouts of the saved softmax over the R + 1 = 4 levels
        assert q.shape[0] == 4
        expected = _read(maps / "expected" / f"{case}.nii.gz")
        np.testing.assert_allclose(expected, (np.arange(4).reshape(4, 1, 1, 1) * q).sum(0) / 3, atol=1e-5)
        np.testing.assert_allclose(_read(maps / "majority" / f"{case}.nii.gz"), q[2:].sum(0), atol=1e-5)
        np.testing.assert_allclose(_read(maps / "expected_k" / f"{case}.nii.gz"), 3 * expected, atol=1e-5)
    report = json.loads((work / "eval" / "metrics.json").read_text())
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


@pytest.mark.slow
def test_several_structures_convert_train_predict_export_evaluate(tmp_path):
    """Three structures through the real nnU-Net: the joint vote count as nnU-Net's class, the ordinal loss
    on each structure's marginal levels, and maps per structure exported from the joint softmax."""
    pytest.importorskip("nnunetv2")
    sitk = pytest.importorskip("SimpleITK")
    from orcal.integrations.nnunet import joint_levels, marginal_matrix

    raw = tmp_path / "raw"
    options = ["--option", "n=10", "--option", "shape=(24,32,32)", "--option", "R=3", "--option", "num_structures=3"]
    assert main(["nnunet", "convert", "--dataset", "synthetic", *options, "--id", "991", "--name", "ORCStructures",
                 "--out", str(raw), "--quiet"]) == 0
    folder = raw / "Dataset991_ORCStructures"
    meta = json.loads((folder / "dataset.json").read_text())
    levels = joint_levels(3, 3)
    assert len(meta["labels"]) == len(levels) == 20 and meta["labels"]["k=0/1/2"] == 6
    assert meta["orcal"]["num_structures"] == 3
    pred = _plan_train_predict(991, folder, tmp_path)
    # nnU-Net's final validation: one Dice per structure (its majority region), a number, not NaN
    fold = next((tmp_path / "res" / "Dataset991_ORCStructures").glob("nnUNetTrainerORC_tiny__*")) / "fold_0"
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert len(summary["mean"]) == 3 and np.isfinite(summary["foreground_mean"]["Dice"])
    logged = re.findall(r"Mean Validation Dice:\s+(\S+)", next(fold.glob("training_log_*.txt")).read_text())
    assert logged and np.isfinite(float(logged[-1]))
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
    from orcal.integrations.nnunet import JointOrdinalLoss, joint_levels
    from orcal.integrations.nnunet.levels import joint_index

    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (2, 4, 5, 6, 3), generator=g)  # 4 raters, 2 structures
    k = orcal.orc_targets(labels, num_structures=2)
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


def test_convert_keeps_the_original_intensities_and_names_the_channel_honestly(tmp_path, capsys):
    """CT in HU is written in HU (nnU-Net normalises; orcal's window would clip a raw scan into the wrong
    units), with channel "CT"; synthetic images as generated, with a channel name that does not claim HU."""
    pytest.importorskip("SimpleITK")
    from orcal.data import load_dataset

    data, raw = tmp_path / "curvas", tmp_path / "raw"
    _curvas_ct(data, n=3, shape=(8, 8, 4))
    args = ["nnunet", "convert", "--dataset", "curvas", "--root", str(data), "--option", "label=1",
            "--option", "window=(-100,100)", "--option", "test_fraction=0.34", "--id", "7", "--name", "HU",
            "--out", str(raw), "--quiet"]
    assert main(args) == 0
    folder = raw / "Dataset007_HU"
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"}
    # options keep their JSON types: an int, a list (the window tuple), a float
    assert meta["orcal"]["options"] == {"label": 1, "window": [-100, 100], "test_fraction": 0.34}
    cases = json.loads((folder / "cases.json").read_text())
    hu = {case: _read(data / info["id"] / "image.nii.gz") for case, info in cases.items()}
    assert min(v.min() for v in hu.values()) < -100 < 100 < max(v.max() for v in hu.values())  # beyond the window
    for case, info in cases.items():
        kind = "imagesTs" if info["split"] == "test" else "imagesTr"
        np.testing.assert_array_equal(_read(folder / kind / f"{case}_0000.nii.gz"), hu[case])
    # the loader itself still scales, outside convert
    assert float(load_dataset("curvas", data, label=1)[0]["image"].max()) <= 1

    # converting onto it again is an error that says what to do, unless --overwrite
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already holds an nnU-Net dataset" in err and "--overwrite" in err and "Traceback" not in err
    assert main([*args, "--overwrite", "--channel-name", "HU-CT"]) == 0
    assert json.loads((folder / "dataset.json").read_text())["channel_names"] == {"0": "HU-CT"}

    assert main(["nnunet", "convert", "--dataset", "synthetic", "--option", "n=4", "--option", "shape=(8,8,4)",
                 "--option", "R=3", "--id", "8", "--name", "Syn", "--out", str(raw), "--quiet"]) == 0
    meta = json.loads((raw / "Dataset008_Syn" / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "channel0"} and meta["orcal"]["options"] == {"n": 4, "shape": [8, 8, 4],
                                                                                       "R": 3}
    item = load_dataset("synthetic", n=4, shape=(8, 8, 4), R=3, split="train")[0]
    case = next(c for c, v in json.loads((raw / "Dataset008_Syn" / "cases.json").read_text()).items()
                if v["id"] == item["id"])
    np.testing.assert_allclose(_read(raw / "Dataset008_Syn" / "imagesTr" / f"{case}_0000.nii.gz"),
                               item["image"][0].numpy().transpose(2, 1, 0), atol=1e-6)


def test_dataset_json_is_read_typed_and_damage_names_the_file(tmp_path):
    from orcal.integrations.nnunet import read_orcal_meta

    assert read_orcal_meta({"orcal": {"num_raters": 3, "num_structures": None}}) == (3, None)
    assert read_orcal_meta({"orcal": {"num_raters": "3", "num_structures": "2"}}) == (3, 2)  # older files
    assert read_orcal_meta({"labels": {}}) == (None, None)
    with pytest.raises(ValueError, match=r"my/dataset.json: orcal.num_raters must be an integer"):
        read_orcal_meta({"orcal": {"num_raters": "three"}}, "my/dataset.json")
    with pytest.raises(ValueError, match=r"orcal.num_structures must be an integer in 1\.\.255, got 2\.5"):
        read_orcal_meta({"orcal": {"num_raters": 3, "num_structures": 2.5}})
    path = tmp_path / "dataset.json"
    path.write_text('{"orcal": {"num_raters": 3,')
    with pytest.raises(ValueError, match=re.escape(str(path))):
        read_orcal_meta(path)


def _prediction(folder: Path, R: int = 3, dataset_json: str | None = None) -> None:
    """A tiny nnUNetv2_predict output: <case>.npz with the softmax over R + 1 levels and <case>.nii.gz."""
    from orcal.io import write_array

    folder.mkdir(parents=True)
    q = np.random.default_rng(0).dirichlet(np.ones(R + 1), size=(2, 3, 4)).transpose(3, 0, 1, 2)
    np.savez(folder / "case_a.npz", probabilities=q.astype(np.float32))
    write_array(folder / "case_a.nii.gz", np.zeros((4, 3, 2), dtype=np.uint8))
    if dataset_json is not None:
        (folder / "dataset.json").write_text(dataset_json)


def test_export_refuses_a_majority_outside_1_to_R_and_names_a_damaged_dataset_json(tmp_path, capsys):
    pytest.importorskip("SimpleITK")
    pred = tmp_path / "pred"
    _prediction(pred, dataset_json=json.dumps({"orcal": {"num_raters": 3, "num_structures": None}}))
    for m in ("0", "4", "-1"):
        assert main(["nnunet", "export", str(pred), "--out", str(tmp_path / "maps"), "--majority", m]) == 2
        assert "majority (with R = 3) must lie in 1..3" in capsys.readouterr().err
    assert main(["nnunet", "export", str(pred), "--out", str(tmp_path / "maps"), "--majority", "3"]) == 0
    (pred / "dataset.json").write_text("{not json")
    assert main(["nnunet", "export", str(pred), "--out", str(tmp_path / "maps")]) == 2
    assert str(pred / "dataset.json") in capsys.readouterr().err


def test_trainer_module_offers_the_short_schedules():
    pytest.importorskip("nnunetv2")
    import inspect

    from orcal.integrations import nnunet

    assert nnunet.nnUNetTrainerORC_1epoch.__name__ == "nnUNetTrainerORC_1epoch"
    names = ["nnUNetTrainerORC_smoke", *(f"nnUNetTrainerORC_{e}epochs" for e in nnunet.EPOCH_VARIANTS[1:])]
    for name in names:
        cls = getattr(nnunet, name)
        assert issubclass(cls, nnunet.nnUNetTrainerORC)
        # nnU-Net stores a trainer's __init__ arguments by name and rebuilds it from them
        assert list(inspect.signature(cls.__init__).parameters)[1:] == ["plans", "configuration", "fold",
                                                                        "dataset_json", "device"]


def test_trainer_modules_old_and_new_find_the_same_classes(tmp_path):
    """A trainer module written now imports orcal.integrations.nnunet; one written by an earlier release
    (``from orcal.nnunet import ...``) still finds the same classes, with a DeprecationWarning."""
    pytest.importorskip("nnunetv2")
    import importlib.util

    from orcal.integrations import nnunet

    path = nnunet.write_trainer_module(tmp_path / "new")
    assert "from orcal.integrations.nnunet import (" in path.read_text()
    old = tmp_path / "old" / nnunet.TRAINER_MODULE
    old.parent.mkdir()
    old.write_text(path.read_text().replace("orcal.integrations.nnunet", "orcal.nnunet"))
    sys.modules.pop("orcal.nnunet", None)
    for file, warns in ((path, False), (old, True)):
        spec = importlib.util.spec_from_file_location(f"trainers_{file.parent.name}", file)
        module = importlib.util.module_from_spec(spec)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            spec.loader.exec_module(module)
        assert any(issubclass(w.category, DeprecationWarning) for w in caught) == warns
        assert module.nnUNetTrainerORC is nnunet.nnUNetTrainerORC
        assert module.nnUNetTrainerORC_smoke is nnunet.nnUNetTrainerORC_smoke
    assert nnunet.nnUNetTrainerORC.__module__ == "orcal.integrations.nnunet"
