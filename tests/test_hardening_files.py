"""Damaged and mismatched files (SPEC §8): mask files holding NaN or non-integer labels, damaged checkpoints,
NaN predictions, predictions and raters on different voxel grids, output paths that are files and damaged
run statistics. Each is an error that names the file, never a result computed from it; the commands exit 2
with the message, not a traceback."""

from __future__ import annotations

import contextlib
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from orcal.cli import main
from orcal.data.safe_pickle import UnsafePickleError, safe_loads
from orcal.ops.masks import binary_mask, select_labels, structure_map

nib = pytest.importorskip("nibabel")


def _cli(*argv: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main([str(a) for a in argv])
    return rc, err.getvalue()


# --- mask and label files -----------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf, 1.5])
@pytest.mark.parametrize("reader", ["binary", "label", "structures"])
def test_mask_files_refuse_nan_and_non_integer_values(bad, reader):
    arr = np.zeros((4, 4), dtype=np.float32)
    arr[0, 0] = 1
    arr[1, 1] = bad  # NaN != 0 would count as a vote; 1.5 as a foreground value or as no label
    read = {"binary": lambda a: binary_mask(a, "r1.nii.gz"),
            "label": lambda a: select_labels(a, 1, "r1.nii.gz"),
            "structures": lambda a: structure_map(a, [1], "r1.nii.gz")}[reader]
    with pytest.raises(ValueError, match=r"r1.nii.gz: .* must hold integer labels, found 1 non-integer or non-finite"):
        read(arr)
    arr[1, 1] = 0
    assert read(arr).sum() == 1
    assert binary_mask(arr * 255, "r1.nii.gz").sum() == 1  # 0/255 files stay a mask


# --- checkpoints and predictions ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    from orcal.train import TrainConfig, train

    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(dataset="synthetic", dataset_options={"n": 4, "shape": (16, 16), "R": 3, "seed": 3},
                      arch="unet-small", model_options={"base_channels": 4, "depth": 1}, epochs=1, batch_size=4,
                      lr=1e-3, max_steps_per_epoch=1, out_dir=str(out)), progress=False)
    return out


PREDICT = ("--dataset", "synthetic", "--option", "n=2", "--option", "shape=16,16", "--option", "R=3", "--quiet")


def _largest_weight(ckpt: dict) -> str:
    return max(ckpt["model"], key=lambda name: ckpt["model"][name].numel())


def test_checkpoint_with_flipped_bytes_is_refused(run, tmp_path):
    from orcal.training.checkpoint import load_model

    best = run / "best.pt"
    ckpt = torch.load(best, weights_only=True)
    assert "model_sha256" in ckpt
    weight = ckpt["model"][_largest_weight(ckpt)]
    raw = bytearray(best.read_bytes())
    at = bytes(raw).find(weight.contiguous().view(torch.uint8).numpy().tobytes()[:64])
    assert at > 0
    raw[at + 17] ^= 0x40  # one bit of one weight: the file still loads
    damaged = tmp_path / "flipped.pt"
    damaged.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="flipped.pt is damaged: its weights do not match the checksum"):
        load_model(damaged)
    rc, err = _cli("predict", damaged, *PREDICT, "--out", tmp_path / "p")
    assert rc == 2 and "flipped.pt is damaged" in err and not (tmp_path / "p").exists()
    load_model(best)  # the intact file loads


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_checkpoint_with_non_finite_weights_is_refused(run, tmp_path, value):
    from orcal.train import atomic_save
    from orcal.training.checkpoint import load_model

    ckpt = torch.load(run / "best.pt", weights_only=True)
    del ckpt["model_sha256"]  # as a checkpoint of an earlier version: no checksum
    ckpt["model"][_largest_weight(ckpt)].view(-1)[0] = value
    atomic_save(ckpt, tmp_path / "diverged.pt")
    with pytest.raises(ValueError, match="diverged.pt holds NaN or infinite weights in 1 tensor"):
        load_model(tmp_path / "diverged.pt")
    rc, err = _cli("predict", tmp_path / "diverged.pt", *PREDICT, "--out", tmp_path / "p")
    assert rc == 2 and "diverged.pt" in err


def test_a_truncated_checkpoint_names_the_file(run, tmp_path):
    raw = (run / "best.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    rc, err = _cli("predict", tmp_path / "cut.pt", *PREDICT, "--out", tmp_path / "p")
    assert rc == 2 and "cut.pt could not be read" in err


@pytest.mark.parametrize("fmt", ["png", "npy"])
def test_predict_refuses_nan_maps_instead_of_writing_them(run, tmp_path, fmt):
    from orcal.data import load_dataset
    from orcal.training.checkpoint import load_model
    from orcal.training.predict import write_predictions

    model, _ = load_model(run / "best.pt")

    class Diverged(torch.nn.Module):  # a finite input, NaN out: written as 0 in an 8-bit file before
        def __init__(self):
            super().__init__()
            self.inner, self.orcal_spec = model, model.orcal_spec

        def forward(self, x):
            y = self.inner(x)
            return torch.where(torch.arange(y.shape[-1]) == 3, float("nan"), y)

    ds = load_dataset("synthetic", None, n=2, shape=(16, 16), R=3)
    with pytest.raises(ValueError, match=r"case synthetic-00000: the model gives \d+ NaN or infinite values"):
        write_predictions(Diverged(), ds, tmp_path / "p", fmt=fmt, device="cpu", progress=False)
    assert not list((tmp_path / "p").rglob(f"*.{fmt}"))


# --- voxel grids ----------------------------------------------------------------------------------------------

def _nii(path: Path, arr: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(arr, np.eye(4) if affine is None else affine), str(path))
    return path


MIRRORED = np.diag([-1.0, 1.0, 1.0, 1.0])  # x flipped
MIRRORED[0, 3] = 7.0
SHIFTED = np.eye(4)
SHIFTED[0, 3] = 2.0  # two voxels along x


@pytest.fixture
def case(tmp_path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    raters = tmp_path / "raters" / "case1"
    raters.mkdir(parents=True)
    for r in range(3):
        _nii(raters / f"r{r}.nii.gz", (rng.random((8, 8, 4)) < 0.5).astype(np.uint8))
    pred = tmp_path / "pred"
    pred.mkdir()
    _nii(pred / "case1.nii.gz", rng.random((8, 8, 4)).astype(np.float32))
    return pred, tmp_path / "raters"


def _evaluate(pred: Path, raters: Path, out: Path) -> tuple[int, str]:
    return _cli("evaluate", "--pred", pred, "--raters", raters, "--out", out, "--bootstrap", "0", "--no-progress")


def test_evaluate_on_one_grid_runs(case, tmp_path):
    pred, raters = case
    rc, err = _evaluate(pred, raters, tmp_path / "e")
    assert rc == 0, err


@pytest.mark.parametrize("affine", [MIRRORED, SHIFTED], ids=["mirrored", "shifted"])
def test_evaluate_refuses_a_prediction_on_another_grid(case, tmp_path, affine):
    pred, raters = case
    _nii(pred / "case1.nii.gz", np.full((8, 8, 4), 0.5, dtype=np.float32), affine)
    rc, err = _evaluate(pred, raters, tmp_path / "e")
    assert rc == 2 and "case1.nii.gz: its voxel grid (NIfTI affine) differs from that of" in err
    assert not (tmp_path / "e" / "metrics.json").exists()


def test_evaluate_and_fuse_refuse_raters_on_different_grids(case, tmp_path):
    pred, raters = case
    r2 = raters / "case1" / "r2.nii.gz"
    _nii(r2, np.asarray(nib.load(str(r2)).dataobj), SHIFTED)
    rc, err = _evaluate(pred, raters, tmp_path / "e")
    assert rc == 2 and "r2.nii.gz: its voxel grid" in err and "the raters of a case" in err
    rc, err = _cli("fuse", "--method", "soft", *sorted((raters / "case1").iterdir()), "--out", tmp_path / "f")
    assert rc == 2 and "r2.nii.gz: its voxel grid" in err


# --- output paths and run files -------------------------------------------------------------------------------

def test_out_pointing_at_a_file_names_it(case, run, tmp_path):
    pred, raters = case
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    for rc, err in (_evaluate(pred, raters, taken),
                    _cli("fuse", "--method", "soft", *sorted((raters / "case1").iterdir()), "--out", taken),
                    _cli("predict", run / "best.pt", *PREDICT, "--out", taken)):
        assert rc == 2 and str(taken) in err and "a file is in the way" in err
    assert taken.read_text() == "not a folder"


def test_a_truncated_run_statistics_file_is_named(tmp_path):
    from orcal.experiment.runs import load_run_stats, run_files

    class Run:
        key = "ordinal"

    stats = run_files(tmp_path, Run)["stats"]
    torch.save({"majority": {"n": torch.zeros(3)}}, stats)
    stats.write_bytes(stats.read_bytes()[:40])
    with pytest.raises(ValueError, match=rf"{stats.name}: the run's statistics could not be read .* delete it"):
        load_run_stats(tmp_path, Run)


def test_a_damaged_nnunet_dataset_json_is_named(tmp_path):
    pytest.importorskip("SimpleITK")
    pred = tmp_path / "pred"
    pred.mkdir()
    np.savez(pred / "case1.npz", probabilities=np.full((4, 2, 2, 2), 0.25, dtype=np.float32))
    (pred / "dataset.json").write_text('{"orcal": {"num_structures": 2')  # cut short
    rc, err = _cli("nnunet", "export", pred, "--out", tmp_path / "out")
    assert rc == 2 and "dataset.json: not a readable dataset.json" in err


def test_an_error_on_an_existing_folder_keeps_its_message(monkeypatch, tmp_path):
    """FileExistsError raised with a message (no filename) is printed as it is, not as 'None: None'."""
    from orcal.commands import fuse

    def refuse(args):
        raise FileExistsError(f"{tmp_path} already holds a dataset.json; remove it or choose another id or name")

    monkeypatch.setattr(fuse, "run", refuse)
    rc, err = _cli("fuse", "--method", "soft", "a.nii.gz", "b.nii.gz", "--out", tmp_path)
    assert rc == 2 and "already holds a dataset.json" in err and "None" not in err


def _png(path: Path, array: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(array).save(path)
    return path


def test_colour_masks_are_an_error_unless_a_channel_is_chosen(tmp_path):
    from orcal.data import load_dataset
    from orcal.io import read_mask

    fg = np.zeros((6, 6), np.uint8)
    fg[1:4, 2:5] = 255
    green = np.zeros((6, 6, 3), np.uint8)
    green[..., 1] = fg
    alpha = np.zeros((6, 6, 4), np.uint8)
    alpha[..., 3] = fg
    grey = np.repeat(fg[..., None], 3, axis=2)
    opaque = np.concatenate([grey, np.full((6, 6, 1), 255, np.uint8)], axis=2)
    for name, arr in (("green", green), ("alpha", alpha)):
        path = _png(tmp_path / f"{name}.png", arr)
        with pytest.raises(ValueError, match=f"{name}.png: a colour mask"):
            read_mask(path)
        assert (read_mask(path, channel=1 if name == "green" else 3) == (fg > 0)).all()
    for name, arr in (("grey", grey), ("opaque", opaque)):
        assert (read_mask(_png(tmp_path / f"{name}.png", arr)) == (fg > 0)).all()
    # the folder loader and orcal fuse read by the same rule
    case = tmp_path / "data" / "case1"
    case.mkdir(parents=True)
    np.save(case / "image.npy", np.random.rand(6, 6).astype(np.float32))
    for r in (1, 2):
        _png(case / f"rater{r}.png", green)
    with pytest.raises(ValueError, match="rater1.png: a colour mask"):
        load_dataset("folder", root=tmp_path / "data")[0]
    item = load_dataset("folder", root=tmp_path / "data", mask_channel=1)[0]
    assert (item["masks"][0].numpy() == (fg > 0)).all()
    from orcal.cli import main

    files = [str(case / "rater1.png"), str(case / "rater2.png")]
    assert main(["fuse", "--method", "soft", "--out", str(tmp_path / "o"), *files]) == 2
    assert main(["fuse", "--method", "soft", "--out", str(tmp_path / "o"), "--mask-channel", "1", *files]) == 0


def test_nan_pixel_names_the_file_at_load_time(tmp_path):
    from orcal.data import load_dataset

    case = tmp_path / "case1"
    case.mkdir()
    image = np.random.rand(6, 6).astype(np.float32)
    image[2, 3] = np.nan
    np.save(case / "image.npy", image)
    for r in (1, 2):
        np.save(case / f"rater{r}.npy", np.eye(6, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"image\.npy: the image holds 1 NaN or infinite values"):
        load_dataset("folder", root=tmp_path)[0]


def test_hostile_pickles_are_bounded():
    legit = {"image": np.random.rand(8, 8), "masks": [np.zeros((8, 8), np.uint8)] * 4, "uid": "1.2"}
    for protocol in (2, 4, 5):
        out = safe_loads(pickle.dumps(legit, protocol=protocol))
        assert np.array_equal(out["image"], legit["image"]) and len(out["masks"]) == 4
    # 38 bytes that ask for 100 GB
    bomb = b"\x80\x04\x8c\x08builtins\x8c\tbytearray\x93\x8a\x05\x00\xe8vH\x17\x85R."
    with pytest.raises(UnsafePickleError, match="bytearray"):
        safe_loads(bomb)
    with pytest.raises(UnsafePickleError, match="list"):
        safe_loads(pickle.dumps(_RangeListBomb()))
    nested = [np.zeros((64, 64), np.uint8)]
    for _ in range(40):  # 2^40 references to one mask in a 4 kB file
        nested = [nested, nested]
    with pytest.raises(UnsafePickleError, match="unfolds"):
        safe_loads(pickle.dumps({"masks": nested}))
    deep: list = []
    for _ in range(200):
        deep = [deep]
    with pytest.raises(UnsafePickleError, match="deep"):
        safe_loads(pickle.dumps(deep))
    loop: list = []
    loop.append(loop)
    with pytest.raises(UnsafePickleError, match="contains itself"):
        safe_loads(pickle.dumps(loop))


class _RangeListBomb:
    """Pickles as ``list(range(10**12))``: builtins.list called on a builtins.range."""

    def __reduce__(self):
        return list, (range(10**12),)


def test_fuse_cases_in_a_folder_with_glob_characters(tmp_path):
    from orcal.cli import main

    case = tmp_path / "d" / "case[1]"
    case.mkdir(parents=True)
    for r in (1, 2, 3):
        np.save(case / f"rater{r}.npy", np.eye(4, dtype=np.uint8))
    out = tmp_path / "o"
    assert main(["fuse", "--method", "soft", "--out", str(out), "--cases", str(tmp_path / "d" / "*"),
                 "--raters", "rater*.npy"]) == 0
    assert (out / "case[1].npy").is_file()
