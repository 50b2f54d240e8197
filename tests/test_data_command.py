import json
from pathlib import Path

import numpy as np
import pytest

from orcal.cli import main

Image = pytest.importorskip("PIL.Image")


def write_lidc_slices(root: Path, patients: int = 3, size: int = 8) -> Path:
    """A tiny LIDC-IDRI-slices layout; reader 3 leaves everything blank."""
    for p in range(1, patients + 1):
        base = root / f"LIDC-IDRI-{p:04d}" / "nodule-0"
        for sub in ["images"] + [f"mask-{r}" for r in range(4)]:
            (base / sub).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(np.full((size, size), 40 * k, np.uint8)).save(base / "images" / f"slice-{k}.png")
            for r in range(4):
                m = np.zeros((size, size), np.uint8)
                if r < 3:
                    m[2:3 + r, 2:5] = 255
                Image.fromarray(m).save(base / f"mask-{r}" / f"slice-{k}.png")
    return root


def test_data_info_synthetic_json(capsys):
    argv = ["data", "info", "--dataset", "synthetic", "-o", "n=6", "-o", "shape=(16, 16)", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    st = report["agreement"]
    assert report["cases"] == 6 and st["raters"] == [5] and report["image_shapes"] == "16x16"
    assert len(st["k_hist"]) == 6 and np.isclose(sum(st["k_hist"]), 1.0)
    assert len(st["foreground_fraction_per_rater"]) == 5 and 0 <= st["mean_pairwise_dice"] <= 1


def test_data_info_text_on_a_folder_layout(tmp_path, capsys):
    root = write_lidc_slices(tmp_path, patients=3)
    assert main(["data", "info", str(root), "--dataset", "lidc_slices", "--split", "train"]) == 0
    out = capsys.readouterr().out
    for key in ("cases", "raters", "image size", "foreground fraction", "mean pairwise Dice",
                "any disagreement", "votes k"):
        assert key in out
    assert "r3=1.0000" in out  # reader 3 left every slice of the tiny layout blank


def test_data_info_errors_are_reported(tmp_path, capsys):
    assert main(["data", "info", str(tmp_path / "none"), "--dataset", "lidc_slices"]) == 2
    assert "published" in capsys.readouterr().err
    assert main(["data", "info", "-", "--dataset", "refuge", "--task", "cup"]) == 2
    assert "needs a root" in capsys.readouterr().err


def test_data_info_label_of_multi_label_maps(tmp_path, capsys):
    import json

    import numpy as np

    d = tmp_path / "case"
    d.mkdir()
    np.save(d / "image.npy", np.zeros((4, 5), np.float32))
    for r in range(2):
        lab = np.zeros((4, 5), np.uint8)
        lab[0, : r + 1], lab[2:, :] = 1, 2
        np.save(d / f"rater{r}.npy", lab)
    assert main(["data", "info", str(tmp_path), "--dataset", "folder"]) == 2
    assert "--label N" in capsys.readouterr().err
    assert main(["data", "info", str(tmp_path), "--dataset", "folder", "--label", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["agreement"]["foreground_fraction_per_rater"] == [0.05, 0.1]
