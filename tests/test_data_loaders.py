import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from orcal.data import DATASETS, load_dataset

nib = pytest.importorskip("nibabel")
Image = pytest.importorskip("PIL.Image")

RNG = np.random.default_rng(0)


def _nii(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(arr), np.eye(4)), str(path))


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(path)


def _blob(shape, r, value=1):
    m = np.zeros(shape, dtype=np.uint8)
    m[tuple(slice(2, 2 + r) for _ in shape)] = value
    return m


def _splits_disjoint(name, root, **kw):
    ids = {s: set(load_dataset(name, root, split=s, **kw).ids) for s in ("train", "val", "test")}
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
    return ids


def test_dataset_names():
    assert set(DATASETS) == {"synthetic", "lidc_slices", "lidc_volumes", "lidc", "cocahis", "refuge", "longciu",
                             "qubiq", "curvas", "folder"}
    with pytest.raises(ValueError, match="valid datasets"):
        load_dataset("lidc-idri", "x")


# ----------------------------------------------------------------------------------------------- cocahis


def write_cocahis(root: Path, n=6, size=8) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with h5py.File(root / "CoCaHis.hdf5", "w") as f:
        he = f.create_group("HE")
        for stain in ("raw", "sn1", "sn2"):
            he.create_dataset(stain, data=RNG.integers(0, 256, (n, size, size, 3), dtype=np.uint8))
        he.attrs["train_test_split"] = np.array([b"train", b"train", b"train", b"train", b"test", b"test"])
        he.attrs["patient_num"] = np.array([1, 1, 2, 3, 4, 4])
        he.attrs["image_num"] = np.arange(n)
        gt = f.create_group("GT")
        for r in range(1, 8):
            fg = 255 if r % 2 else 1  # both foreground codes occur in the published file
            masks = np.stack([_blob((size, size), 1 + (r + i) % 4, fg) for i in range(n)])
            gt.create_dataset(f"GT{r}", data=masks)
        gt.create_dataset("GT_majority_vote", data=np.zeros((n, size, size), np.uint8))
    return root


def test_cocahis(tmp_path):
    root = write_cocahis(tmp_path)
    ds = load_dataset("cocahis", root)
    item = ds[0]
    assert item["image"].shape == (3, 8, 8) and item["masks"].shape == (7, 8, 8)
    assert set(item["masks"].unique().tolist()) == {0, 1}
    assert int(item["masks"][0].sum()) == 4  # GT1 (stored as 255) of image 0 is a 2x2 square
    raw = load_dataset("cocahis", root)[0]["image"]
    assert not torch.equal(raw, load_dataset("cocahis", root, stain="sn1")[0]["image"])
    assert len(load_dataset("cocahis", root, split="test")) == 2
    ids = _splits_disjoint("cocahis", root, val_fraction=0.34)
    patients = {s: {i.split("-")[0] for i in v} for s, v in ids.items()}
    assert not patients["train"] & patients["val"] and len(ids["val"]) >= 1
    with pytest.raises(ValueError, match="stain"):
        load_dataset("cocahis", root, stain="sn3")
    with h5py.File(root / "CoCaHis.hdf5", "a") as f:
        del f["GT/GT3"]
        f["GT"].create_dataset("GT3", data=np.zeros((6, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="GT3"):
        load_dataset("cocahis", root)
    (root / "CoCaHis.hdf5").write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="CoCaHis.hdf5"):
        load_dataset("cocahis", root)


# ------------------------------------------------------------------------------------------------ refuge


def write_refuge(root: Path, size=12) -> Path:
    for folder, ids in (("Training-400", ["g0001", "n0001", "n0002", "n0003"]), ("Test-400", ["T0001"])):
        for cid in ids:
            d = root / folder / cid
            d.mkdir(parents=True)
            Image.fromarray(RNG.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"{cid}.jpg")
            for r in range(1, 8):
                _png(d / f"{cid}_seg_disc_{r}.png", _blob((size, size), 6, 255))
                _png(d / f"{cid}_seg_cup_{r}.png", _blob((size, size), 1 + r % 3, 255))
    return root


def test_refuge(tmp_path):
    root = write_refuge(tmp_path)
    cup = load_dataset("refuge", root, task="cup")
    item = cup[0]
    assert item["image"].shape == (3, 12, 12) and item["masks"].shape == (7, 12, 12)
    assert [int(m.sum()) for m in item["masks"][:3]] == [4, 9, 1]
    assert int(load_dataset("refuge", root, task="disc")[0]["masks"].sum()) == 7 * 36
    assert load_dataset("refuge", root, task="cup", split="test").ids == ["T0001"]
    ids = _splits_disjoint("refuge", root, task="cup", val_fraction=0.25)
    assert len(ids["val"]) == 1 and len(ids["train"]) == 3
    with pytest.raises(ValueError, match="valid tasks: disc, cup"):
        load_dataset("refuge", root, task="rim")
    (root / "Training-400" / "n0002" / "n0002_seg_cup_5.png").unlink()
    with pytest.raises(FileNotFoundError, match="n0002_seg_cup_5.png"):
        [x for x in load_dataset("refuge", root, task="cup")]


# ----------------------------------------------------------------------------------------------- longciu


def write_longciu(root: Path, n=6, size=10) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    _nii(root / "longciu_img.nii.gz", RNG.uniform(-1500, 1500, (size, size, n)).astype(np.float32))
    for r in (1, 2, 3):
        lab = np.zeros((size, size, n), np.uint8)
        lab[2:5, 2:5] = 1
        lab[6:6 + r, 6:8] = 2
        _nii(root / f"longciu_{r}_tgt.nii.gz", lab)
    (root / "longciu_splits.json").write_text(json.dumps({"train": [0, 1, 2], "val": [3], "test": [4, 5]}))
    return root


def test_longciu(tmp_path):
    root = write_longciu(tmp_path)
    ds = load_dataset("longciu", root, task="consolidation")
    assert len(ds) == 6
    item = ds[2]
    assert item["image"].shape == (1, 10, 10) and item["masks"].shape == (3, 10, 10)
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    assert [int(m.sum()) for m in item["masks"]] == [2, 4, 6]
    assert [int(m.sum()) for m in load_dataset("longciu", root, task="ggo")[0]["masks"]] == [9, 9, 9]
    assert int(load_dataset("longciu", root, task="any")[0]["masks"][0].sum()) == 11
    test = load_dataset("longciu", root, split="test", task="ggo")
    assert test.ids == ["slice-004", "slice-005"]
    with pytest.raises(ValueError, match="ggo, consolidation, any"):
        load_dataset("longciu", root, task="lesion")
    lab = np.zeros((10, 10, 6), np.uint8)
    lab[0, 0, 0] = 3
    _nii(root / "longciu_2_tgt.nii.gz", lab)
    with pytest.raises(ValueError, match="longciu_2_tgt.*labels"):
        load_dataset("longciu", root)
    _nii(root / "longciu_2_tgt.nii.gz", np.zeros((10, 9, 6), np.uint8))
    with pytest.raises(ValueError, match="shape"):
        load_dataset("longciu", root)
    _nii(root / "longciu_2_tgt.nii.gz", np.zeros((10, 10, 6), np.uint8))
    (root / "longciu_3_tgt.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="longciu_3_tgt"):
        load_dataset("longciu", root)


# ------------------------------------------------------------------------------------------------- qubiq


def write_qubiq(root: Path, size=8) -> Path:
    for folder, n in (("Training", 5), ("Validation", 2)):
        for c in range(1, n + 1):
            d = root / "prostate" / folder / f"case{c:02d}"
            _nii(d / "image.nii.gz", RNG.normal(size=(size, size)).astype(np.float32))
            for t in (1, 2):
                for r in range(1, 7):
                    _nii(d / f"task{t:02d}_seg{r:02d}.nii.gz", _blob((size, size), 1 + (r + t) % 4))
        for c in range(1, 3):
            d = root / "brain-growth" / folder / f"case{c:02d}"
            _nii(d / "image.nii.gz", RNG.normal(size=(size, size, 1)).astype(np.float32))
            for r in range(1, 8):
                _nii(d / f"task01_seg{r:02d}.nii.gz", _blob((size, size), 3)[..., None])
    return root


def test_qubiq(tmp_path):
    root = write_qubiq(tmp_path)
    ds = load_dataset("qubiq", root, task="prostate:2")
    assert len(ds) == 7
    item = ds[0]
    assert item["image"].shape == (1, 8, 8) and item["masks"].shape == (6, 8, 8)
    assert [int(m.sum()) for m in item["masks"][:2]] == [16, 1]
    bg = load_dataset("qubiq", root, task="brain-growth")
    assert bg[0]["masks"].shape == (7, 8, 8) and bg[0]["image"].shape == (1, 8, 8)
    assert len(load_dataset("qubiq", root, task="prostate:1", split="test")) == 2
    ids = _splits_disjoint("qubiq", root, task="prostate:1", val_fraction=0.2)
    assert all(i.startswith("Validation/") for i in ids["test"]) and len(ids["val"]) == 1
    with pytest.raises(ValueError, match="prostate:1, prostate:2"):
        load_dataset("qubiq", root, task="prostate:3")
    with pytest.raises(FileNotFoundError, match="kidney"):
        load_dataset("qubiq", root, task="kidney")
    (root / "prostate" / "Training" / "case03" / "task01_seg04.nii.gz").unlink()
    ds = load_dataset("qubiq", root, task="prostate:1")
    with pytest.raises(FileNotFoundError, match="task01_seg04"):
        ds[2]


# ------------------------------------------------------------------------------------------------ curvas


def write_curvas(root: Path, n=5, shape=(6, 7, 5)) -> Path:
    for c in range(1, n + 1):
        d = root / f"UKCHLL{c:03d}"
        _nii(d / "image.nii.gz", RNG.uniform(-1000, 1000, shape).astype(np.int16))
        for r in (1, 2, 3):
            lab = np.zeros(shape, np.uint8)
            lab[:2, :2, :2] = 1
            lab[3:, 3:3 + r, :] = 2
            lab[0, 6, 0] = 3
            _nii(d / f"annotation_{r}.nii.gz", lab)
    return root


def test_curvas(tmp_path):
    root = write_curvas(tmp_path)
    ds = load_dataset("curvas", root, task="kidney")
    item = ds[0]
    assert item["image"].shape == (1, 6, 7, 5) and item["masks"].shape == (3, 6, 7, 5)
    assert [int(m.sum()) for m in item["masks"]] == [15, 30, 45]
    assert int(load_dataset("curvas", root, task="liver")[0]["masks"].sum()) == 3
    ids = _splits_disjoint("curvas", root, task="pancreas", val_fraction=0.2, test_fraction=0.2)
    assert sum(map(len, ids.values())) == 5
    with pytest.raises(ValueError, match="needs a task"):
        load_dataset("curvas", root)
    with pytest.raises(ValueError, match="pancreas, kidney, liver"):
        load_dataset("curvas", root, task="spleen")
    with pytest.raises(FileNotFoundError, match="curvas.grand-challenge.org"):
        load_dataset("curvas", tmp_path / "nowhere", task="liver")


def test_curvas_any_case_name_and_label_selection(tmp_path):
    root = write_curvas(tmp_path / "c", n=2)
    (root / "UKCHLL001").rename(root / "patient-a")  # the layout, not the published names, makes a case
    (root / "notes").mkdir()  # a folder without image.nii.gz is not a case
    ds = load_dataset("curvas", root, task="kidney")
    assert sorted(ds.ids) == ["UKCHLL002", "patient-a"]
    kidney = [int(m.sum()) for m in ds[0]["masks"]]
    assert [int(m.sum()) for m in load_dataset("curvas", root, label=2)[0]["masks"]] == kidney
    both = load_dataset("curvas", root, label=[1, 3])[0]["masks"]  # several labels read as one structure
    assert [int(m.sum()) for m in both] == [8 + 1] * 3
    with pytest.raises(ValueError, match="not both"):
        load_dataset("curvas", root, task="kidney", label=2)
    with pytest.raises(ValueError, match="positive integer"):
        load_dataset("curvas", root, label=0)[0]


def test_folder_reads_one_label_of_multi_label_maps(tmp_path):
    d = tmp_path / "case"
    d.mkdir()
    np.save(d / "image.npy", np.zeros((4, 5), np.float32))
    for r in range(2):
        lab = np.zeros((4, 5), np.uint8)
        lab[0, : r + 1] = 1
        lab[2:, :] = 2
        np.save(d / f"rater{r}.npy", lab)
    with pytest.raises(ValueError, match="label=N"):
        load_dataset("folder", tmp_path)[0]
    assert [int(m.sum()) for m in load_dataset("folder", tmp_path, label=1)[0]["masks"]] == [1, 2]
    assert [int(m.sum()) for m in load_dataset("folder", tmp_path, label=2)[0]["masks"]] == [10, 10]


# ------------------------------------------------------------------------------------------------ folder


def write_folder(root: Path) -> Path:
    for c in range(4):
        d = root / f"case{c}"
        d.mkdir(parents=True)
        _png(d / "image.png", RNG.integers(0, 256, (9, 10, 3)))
        for r in range(1, 4):
            _png(d / f"rater{r}.png", _blob((9, 10), r, 255))
        _png(d / "notes.png", np.zeros((9, 10)))  # not matched by the rater glob
    d = root / "vol"
    d.mkdir()
    np.save(d / "image.npy", RNG.normal(size=(4, 5, 6)).astype(np.float32))
    for r in range(1, 4):
        np.save(d / f"rater{r}.npy", _blob((4, 5, 6), r))
    return root


def test_folder(tmp_path):
    root = write_folder(tmp_path / "data")
    ds = load_dataset("folder", root)
    assert ds.ids == ["case0", "case1", "case2", "case3", "vol"]
    item = ds[0]
    assert item["image"].shape == (3, 9, 10) and item["masks"].shape == (3, 9, 10)
    assert [int(m.sum()) for m in item["masks"]] == [1, 4, 9]
    vol = ds[4]
    assert vol["image"].shape == (1, 4, 5, 6) and [int(m.sum()) for m in vol["masks"]] == [1, 8, 18]
    assert load_dataset("folder", root, rater_glob="rater[12]*")[0]["masks"].shape == (2, 9, 10)
    ids = _splits_disjoint("folder", root, val_fraction=0.2, test_fraction=0.2)
    assert sum(map(len, ids.values())) == 5
    nii = tmp_path / "nii"
    _nii(nii / "a" / "image.nii.gz", RNG.normal(size=(4, 4, 3)).astype(np.float32))
    _nii(nii / "a" / "rater_1.nii.gz", _blob((4, 4, 3), 2))
    assert load_dataset("folder", nii)[0]["masks"].shape == (1, 4, 4, 3)
    np.save(root / "vol" / "rater2.npy", np.arange(120).reshape(4, 5, 6))
    with pytest.raises(ValueError, match="rater2.npy.*binary"):
        ds[4]
    np.save(root / "vol" / "rater2.npy", np.zeros((4, 5, 7)))
    with pytest.raises(ValueError, match="rater2.npy.*shape"):
        ds[4]
    (root / "vol" / "rater2.npy").write_bytes(b"\x93NUMPY trunc")
    with pytest.raises(ValueError, match="rater2.npy"):
        ds[4]
    (root / "vol" / "rater2.npy").unlink()
    with pytest.raises(FileNotFoundError, match="missing rater file"):
        load_dataset("folder", root)


def test_folder_image_mask_mismatch_and_unknown_options(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    np.save(d / "image.npy", np.zeros((5, 5)))
    np.save(d / "rater1.npy", np.zeros((4, 4)))
    with pytest.raises(ValueError, match="image.npy.*shape"):
        load_dataset("folder", tmp_path)[0]
    with pytest.raises(TypeError, match="folder"):
        load_dataset("folder", tmp_path, crop=3)
    with pytest.raises(ValueError, match="unknown split"):
        load_dataset("folder", tmp_path, split="training")


def test_several_structures_from_the_loaders(tmp_path):
    """structures= reads several labels at once as rater label maps with num_structures (SPEC §11)."""
    import orcal

    curvas = write_curvas(tmp_path / "c", n=3)
    item = load_dataset("curvas", curvas, structures="all")[0]
    assert item["num_structures"] == 3 and item["masks"].dtype == torch.uint8 and int(item["masks"].max()) == 3
    k = orcal.orc_targets(item["masks"][None], num_structures=3)[0]
    for c, task in enumerate(("pancreas", "kidney", "liver")):  # structure c is the task's binary vote count
        assert torch.equal(k[c], load_dataset("curvas", curvas, task=task)[0]["masks"].sum(0, dtype=torch.uint8))
    liver_first = load_dataset("curvas", curvas, structures=[3, 1])[0]["masks"]
    assert int((liver_first == 1).sum()) == 3 * 1 and int((liver_first == 2).sum()) == 3 * 8
    assert load_dataset("curvas", curvas, structures="all").display_name == "curvas (structures 1,2,3)"
    with pytest.raises(ValueError, match="not both"):
        load_dataset("curvas", curvas, task="liver", structures="all")
    with pytest.raises(ValueError, match="'all' or a list"):
        load_dataset("curvas", curvas, structures="every")

    longciu = write_longciu(tmp_path / "l")
    item = load_dataset("longciu", longciu, structures="all")[2]
    assert item["num_structures"] == 2
    assert [int((m == 2).sum()) for m in item["masks"]] == [2, 4, 6]  # consolidation, as its own task reads it
    assert [int((m == 1).sum()) for m in item["masks"]] == [9, 9, 9]

    d = tmp_path / "f" / "case"
    d.mkdir(parents=True)
    np.save(d / "image.npy", np.zeros((4, 5), np.float32))
    for r in range(2):
        lab = np.zeros((4, 5), np.uint8)
        lab[0, : r + 1] = 7
        lab[2:, :] = 2
        np.save(d / f"rater{r}.npy", lab)
    item = load_dataset("folder", tmp_path / "f", structures=[7, 2])[0]
    assert item["num_structures"] == 2 and [int((m == 1).sum()) for m in item["masks"]] == [1, 2]
    with pytest.raises(ValueError, match="distinct positive labels"):
        load_dataset("folder", tmp_path / "f", structures=[2, 2])

    refuge = write_refuge(tmp_path / "r")
    item = load_dataset("refuge", refuge, structures="all")[0]  # disc rim 1, cup 2: the disc is labels 1 or 2
    assert item["num_structures"] == 2
    k = orcal.orc_targets(item["masks"][None], num_structures=2)[0]
    assert torch.equal(k[1], load_dataset("refuge", refuge, task="cup")[0]["masks"].sum(0, dtype=torch.uint8))
    assert torch.equal(k.sum(0), load_dataset("refuge", refuge, task="disc")[0]["masks"].sum(0, dtype=torch.uint8))
    with pytest.raises(ValueError, match="without a task"):
        load_dataset("refuge", refuge, task="cup", structures="all")
