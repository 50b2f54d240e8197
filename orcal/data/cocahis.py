"""CoCaHis: H&E frozen sections of colon cancer liver metastases, seven raters, one HDF5 file."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .base import Case, MultiRaterDataset, binary_mask, check_root, make_item, official_split, scale_intensity


def _strings(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(values).ravel()]


class CoCaHis(MultiRaterDataset):
    """CoCaHis (Sitnik et al., 2021), 2D RGB histology with seven raters.

    Layout: ``ROOT/CoCaHis.hdf5`` (or ROOT is the file) holding

    * group ``HE``: datasets ``raw``, ``sn1``, ``sn2`` (N x H x W x 3 uint8; ``stain=`` picks, default "raw"),
      attributes ``train_test_split`` ("train"/"test" per image), ``patient_num`` and ``image_num``;
    * group ``GT``: ``GT1`` .. ``GT7`` (N x H x W, foreground 1 or 255) and ``GT_majority_vote``.

    Published: https://cocahis.irb.hr (the CoCaHis dataset page). ``split``: the file's train/test split;
    "val" is carved from train by patient (``val_fraction``, ``seed``). The majority vote is not a rater.
    """

    name = "cocahis"
    published = "https://cocahis.irb.hr (CoCaHis, Sitnik et al., Biomed. Signal Process. Control 2021)"
    layout = "CoCaHis.hdf5 with groups HE (raw/sn1/sn2) and GT (GT1..GT7)"
    stains = ("raw", "sn1", "sn2")

    def __init__(self, root, split: str | None = None, task: str | None = None, stain: str = "raw",
                 val_fraction: float = 0.1, seed: int = 0, transform: Callable | None = None):
        import h5py

        if task not in (None, "tumor"):
            raise ValueError(f"unknown task {task!r} for dataset 'cocahis'; valid tasks: tumor")
        if stain not in self.stains:
            raise ValueError(f"unknown stain {stain!r}; valid: {', '.join(self.stains)}")
        path = check_root(root, self.name, self.published, self.layout)
        if path.is_dir():
            path = path / "CoCaHis.hdf5"
            if not path.is_file():
                raise FileNotFoundError(f"expected {path}; layout: {self.layout}")
        self.path, self.stain = path, stain
        try:
            with h5py.File(path, "r") as f:
                for where in ("HE", f"HE/{stain}", "GT"):
                    if where not in f:
                        raise ValueError(f"{path}: missing {where!r}; expected {self.layout}")
                n, h, w = f[f"HE/{stain}"].shape[:3]
                self.raters = sorted((k for k in f["GT"] if k[2:].isdigit()), key=lambda k: int(k[2:]))
                if not self.raters:
                    raise ValueError(f"{path}: group GT has no GT1..GT7 datasets")
                for k in self.raters:
                    if f["GT"][k].shape[:3] != (n, h, w):
                        shape = f["GT"][k].shape
                        raise ValueError(f"{path}: rater mask GT/{k} has shape {shape}, the images "
                                         f"HE/{stain} have {(n, h, w)}")
                attrs = f["HE"].attrs
                for a in ("train_test_split", "patient_num"):
                    if a not in attrs:
                        raise ValueError(f"{path}: group HE lacks the attribute {a!r}")
                official = _strings(attrs["train_test_split"])
                patients = _strings(attrs["patient_num"])
                images = _strings(attrs["image_num"]) if "image_num" in attrs else [str(i) for i in range(n)]
        except OSError as err:
            raise ValueError(f"cannot read {path}: {err}") from err
        if not len(official) == len(patients) == n:
            raise ValueError(f"{path}: attributes train_test_split/patient_num must have one entry "
                             f"per image ({n})")
        bad = set(official) - {"train", "test"}
        if bad:
            raise ValueError(f"{path}: train_test_split holds {sorted(bad)}; expected 'train' or 'test'")
        cases = [Case(f"patient{patients[i]}-image{images[i]}", patients[i], (i, official[i]))
                 for i in range(n)]
        cases = official_split(cases, split, lambda c: c.info[1], val_fraction, seed)
        super().__init__(cases, split, transform)

    def load_case(self, case: Case) -> dict:
        import h5py

        i = case.info[0]
        with h5py.File(self.path, "r") as f:
            image = np.asarray(f[f"HE/{self.stain}"][i])
            masks = [binary_mask(np.asarray(f["GT"][k][i]), f"{self.path} GT/{k}[{i}]") for k in self.raters]
        return make_item(np.moveaxis(scale_intensity(image, (0.0, 255.0), f"{self.path} HE/{self.stain}[{i}]"),
                                     -1, 0), masks, case.id)
