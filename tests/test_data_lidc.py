import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from orcal.data import UnsafePickleError, load_dataset, safe_load
from orcal.data.safe_pickle import safe_loads

Image = pytest.importorskip("PIL.Image")

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "lidc-idri-slices"
NO_REAL = f"needs the public LIDC-IDRI-slices copy at {REAL} (not part of the repository)"


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


def write_lidc_slices(root: Path, patients=4, nodules=2, slices=3, size=16, blank_reader=3) -> Path:
    rng = np.random.default_rng(0)
    for p in range(1, patients + 1):
        for n in range(nodules):
            base = root / f"LIDC-IDRI-{p:04d}" / f"nodule-{n}"
            for k in range(slices):
                _png(base / "images" / f"slice-{k}.png", rng.integers(0, 256, (size, size)))
                for r in range(4):
                    m = np.zeros((size, size))
                    if r != blank_reader and k > 0:
                        m[4:4 + r + k, 5:10] = 255
                    _png(base / f"mask-{r}" / f"slice-{k}.png", m)
    return root


def test_lidc_slices_items_splits_and_blank_readers(tmp_path):
    root = write_lidc_slices(tmp_path)
    ds = load_dataset("lidc_slices", root)
    assert len(ds) == 4 * 2 * 3
    item = ds[1]
    assert item["image"].shape == (1, 16, 16) and item["image"].dtype == torch.float32
    assert item["masks"].shape == (4, 16, 16) and item["masks"].dtype == torch.uint8
    assert item["masks"][3].sum() == 0 and item["masks"][0].sum() == 5  # the blank reader is kept
    assert set(item["masks"].unique().tolist()) <= {0, 1}
    assert item["id"] == "LIDC-IDRI-0001/nodule-0/slice-1"
    parts = {s: load_dataset("lidc_slices", root, split=s, val_fraction=0.25, test_fraction=0.25, seed=1)
             for s in ("train", "val", "test")}
    patients = {s: {c.split("/")[0] for c in d.ids} for s, d in parts.items()}
    assert sum(len(d) for d in parts.values()) == len(ds)
    assert not (patients["train"] & patients["val"] or patients["train"] & patients["test"]
                or patients["val"] & patients["test"])
    cropped = load_dataset("lidc_slices", root, crop=8)[1]
    assert cropped["image"].shape == (1, 8, 8)
    assert torch.equal(cropped["masks"], item["masks"][:, 4:12, 4:12])
    assert len(load_dataset("lidc_slices", root, min_raters_foreground=1)) == 4 * 2 * 2
    with pytest.raises(ValueError, match="min_raters_foreground"):
        load_dataset("lidc_slices", root, min_raters_foreground=5)


def test_lidc_slices_errors(tmp_path):
    root = write_lidc_slices(tmp_path, patients=2)
    with pytest.raises(FileNotFoundError, match="Cancer Imaging Archive"):
        load_dataset("lidc_slices", tmp_path / "absent")
    with pytest.raises(ValueError, match="empty"):
        load_dataset("lidc_slices", root, split="val", val_fraction=0.0, test_fraction=0.5)
    bad = root / "LIDC-IDRI-0002" / "nodule-1" / "mask-2" / "slice-1.png"
    _png(bad, np.arange(256).reshape(16, 16))
    with pytest.raises(ValueError, match=f"{bad}.*binary"):
        load_dataset("lidc_slices", root)[-2]
    _png(bad, np.zeros((8, 16)))
    with pytest.raises(ValueError, match="shape"):
        load_dataset("lidc_slices", root)[-2]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n trunc")
    with pytest.raises(ValueError, match=str(bad)):
        load_dataset("lidc_slices", root)[-2]
    bad.unlink()
    with pytest.raises(FileNotFoundError, match="missing rater file .*mask-2"):
        load_dataset("lidc_slices", root)


def test_lidc_volumes_stack_each_nodule(tmp_path):
    root = write_lidc_slices(tmp_path, slices=3)
    slices = load_dataset("lidc_slices", root)
    vols = load_dataset("lidc_volumes", root)
    assert len(vols) == 4 * 2 and vols.display_name == "LIDC-IDRI 3D"
    item = vols[0]
    assert item["id"] == "LIDC-IDRI-0001/nodule-0"
    assert item["image"].shape == (1, 3, 16, 16) and item["masks"].shape == (4, 3, 16, 16)
    for k in range(3):  # the volume is the nodule's slices in order, readers and all
        s = slices[k]
        assert s["id"] == f"LIDC-IDRI-0001/nodule-0/slice-{k}"
        assert torch.equal(item["image"][:, k], s["image"]) and torch.equal(item["masks"][:, k], s["masks"])
    assert load_dataset("lidc_volumes", root, crop=8)[0]["masks"].shape == (4, 3, 8, 8)
    parts = {sp: set(load_dataset("lidc_volumes", root, split=sp, val_fraction=0.25, test_fraction=0.25).groups)
             for sp in ("train", "val", "test")}
    assert not (parts["train"] & parts["val"] or parts["train"] & parts["test"] or parts["val"] & parts["test"])
    assert len(load_dataset("lidc_volumes", root, min_raters_foreground=3)) == 8  # 3 readers mark every nodule


@pytest.mark.skipif(not REAL.is_dir(), reason=NO_REAL)
def test_lidc_volumes_on_the_real_export():
    ds = load_dataset("lidc_volumes", REAL)
    assert len(ds) == 781
    item = ds[0]
    assert item["image"].shape[0] == 1 and item["masks"].shape[0] == 4 and item["image"].shape[2:] == (128, 128)


def _pickle(tmp_path, n=6, size=8) -> Path:
    rng = np.random.default_rng(0)
    data = {f"case{i}": {"image": rng.random((size, size)).astype(np.float32),
                         "masks": [(rng.random((size, size)) > 0.5).astype(np.uint8) for _ in range(4)],
                         "series_uid": f"1.2.{i // 2}", "pixel_spacing": [0.7, 0.7]} for i in range(n)}
    path = tmp_path / "data_lidc.pickle"
    path.write_bytes(pickle.dumps(data, protocol=4))
    return path


def test_lidc_pickle_loads_and_splits_by_series(tmp_path):
    path = _pickle(tmp_path)
    ds = load_dataset("lidc", tmp_path)
    assert len(ds) == 6 and ds[0]["masks"].shape == (4, 8, 8) and ds[0]["image"].shape == (1, 8, 8)
    assert len(load_dataset("lidc", path, crop=4)[0]["image"][0]) == 4
    series = {}
    for s in ("train", "val", "test"):
        d = load_dataset("lidc", path, split=s, val_fraction=0.34, test_fraction=0.34)
        series[s] = set(d.groups)
    assert not (series["train"] & series["val"] or series["train"] & series["test"]
                or series["val"] & series["test"])


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > should_not_exist",))


def test_restricted_unpickler_refuses_code(tmp_path):
    path = tmp_path / "evil.pickle"
    path.write_bytes(pickle.dumps({"a": {"image": _Evil(), "masks": [], "series_uid": "x"}}))
    with pytest.raises(UnsafePickleError, match=r"refusing to load .*system"):
        load_dataset("lidc", path)
    with pytest.raises(UnsafePickleError, match="evil.pickle"):
        safe_load(path)
    assert not (tmp_path / "should_not_exist").exists()
    with pytest.raises(UnsafePickleError):
        safe_loads(pickle.dumps(eval))
    with pytest.raises(ValueError, match="not a valid pickle"):
        safe_loads(b"\x80\x04garbage")
    arr = np.arange(6, dtype=np.int16).reshape(2, 3)
    for proto in range(6):
        np.testing.assert_array_equal(safe_loads(pickle.dumps({"x": [arr]}, protocol=proto))["x"][0], arr)


@pytest.mark.skipif(not REAL.is_dir(), reason=NO_REAL)
def test_real_lidc_slices_end_to_end():
    full = load_dataset("lidc_slices", REAL)
    assert len(full) > 1000
    split_patients = {}
    for s in ("train", "val", "test"):
        d = load_dataset("lidc_slices", REAL, split=s)
        split_patients[s] = set(d.groups)
        item = d[len(d) // 2]
        assert item["image"].shape == (1, 128, 128) and item["masks"].shape == (4, 128, 128)
        assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    assert sum(len(p) for p in split_patients.values()) == len(set(full.groups))
    tr, va, te = split_patients["train"], split_patients["val"], split_patients["test"]
    assert not (tr & va or tr & te or va & te)
    # blank readers are kept as empty annotations
    assert any(int(full[i]["masks"].flatten(1).amax(1).sum()) < 4 for i in range(0, len(full), 50))
