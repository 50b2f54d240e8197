"""Images without raters, for prediction: files, a folder of files, or a folder of ``<case>/image.<ext>``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from orcal.io import EXTENSIONS, extension, natural_key

from ._io import read_array
from .base import scale_intensity


def image_files(sources: Sequence[str | os.PathLike]) -> dict[str, Path]:
    """``{case id: image file}`` of ``sources``: image files (the id is the name without its extension), folders
    of image files, or folders of case folders holding ``image.<ext>`` (the id is the case folder's name)."""
    found: dict[str, Path] = {}

    def add(case: str, path: Path) -> None:
        if case in found:
            raise ValueError(f"two images for case {case!r}: {found[case]} and {path}")
        found[case] = path

    for source in sources:
        path = Path(source)
        if path.is_file():
            add(path.name[: -len(extension(path))], path)
        elif path.is_dir():
            files = sorted((p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(EXTENSIONS)),
                           key=lambda p: natural_key(p.name))
            for f in files:
                add(f.name[: -len(extension(f))], f)
            for d in sorted((p for p in path.iterdir() if p.is_dir()), key=lambda p: natural_key(p.name)):
                images = [p for p in d.iterdir() if p.name.lower().startswith("image.")
                          and p.name.lower().endswith(EXTENSIONS)]
                if len(images) == 1:
                    add(d.name, images[0])
        else:
            raise FileNotFoundError(f"no such image file or folder: {path}")
    if not found:
        raise FileNotFoundError(f"no image file (NIfTI, PNG/JPG/TIFF or .npy) in {', '.join(map(str, sources))}")
    return found


class ImageFiles(Dataset):
    """Items ``{"image" (C, *S) float32, "masks" (0, *S) uint8, "id"}`` of image files, for
    :func:`orcal.training.predict.predict_logits` (no rater masks: an empty rater axis).

    Args:
        sources: files and folders (see :func:`image_files`).
        spatial_dims: 2 or 3, the model's.
        in_channels: the model's input channels; a file with one more axis than ``spatial_dims`` must hold
            them first or last.
        intensity: the loaders' intensity rule (``"auto"``, ``"percentile"``, ``"none"`` or a ``(low, high)``
            window such as a CT window in HU): use the training data's.
    """

    def __init__(self, sources: Sequence[str | os.PathLike], spatial_dims: int, in_channels: int = 1,
                 intensity: str | tuple[float, float] = "auto"):
        self.files = image_files(sources)
        self.ids = list(self.files)
        self.spatial_dims, self.in_channels, self.intensity = int(spatial_dims), int(in_channels), intensity

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, index: int) -> Path:
        """The file item ``index`` was read from (its NIfTI affine is kept by the predictions)."""
        return self.files[self.ids[index]]

    def __getitem__(self, index: int) -> dict:
        path = self.image_path(index)
        arr = read_array(path)
        C, d = self.in_channels, self.spatial_dims
        if arr.ndim == d and C == 1:
            arr = arr[None]
        elif arr.ndim == d + 1 and arr.shape[0] == C:
            pass
        elif arr.ndim == d + 1 and arr.shape[-1] == C:
            arr = np.moveaxis(arr, -1, 0)
        else:
            raise ValueError(f"{path}: image shape {arr.shape} is not a {d}D image with {C} channel(s) (first or "
                             "last), as the model expects")
        image = scale_intensity(arr, self.intensity, str(path))
        return {"image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
                "masks": torch.zeros((0, *image.shape[1:]), dtype=torch.uint8), "id": self.ids[index]}
