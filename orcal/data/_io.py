"""Reading arrays from files, with errors that name the file.

Uses :func:`orcal.io.read_array` when that module is available, else a small local reader for NIfTI,
PNG/JPG and ``.npy``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

#: Files larger than this are refused before reading (a guard against a wrong path or a hostile file).
MAX_FILE_BYTES = 8 * 1024**3

_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_NIFTI_EXT = (".nii", ".nii.gz")


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"expected a file at {path}, found none")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        limit = MAX_FILE_BYTES / 1024**3
        raise ValueError(f"{path} is {size / 1024**3:.1f} GiB, more than the {limit:.0f} GiB "
                         "allowed for one file")
    if size == 0:
        raise ValueError(f"{path} is empty (0 bytes)")


def _read_local(path: Path) -> np.ndarray:
    name = path.name.lower()
    try:
        if name.endswith(_NIFTI_EXT):
            import nibabel as nib

            return np.asarray(nib.load(str(path)).dataobj)
        if name.endswith(_IMAGE_EXT):
            from PIL import Image

            with Image.open(path) as im:
                im.load()
                if im.mode in ("P", "CMYK", "YCbCr", "LA", "PA", "RGBA", "1"):
                    im = im.convert("RGB" if im.mode in ("P", "CMYK", "YCbCr", "RGBA") else "L")
                return np.asarray(im)
        if name.endswith(".npy"):
            return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, SyntaxError) as err:  # truncated, corrupt or mislabelled files
        raise ValueError(f"cannot read {path}: {err}") from err
    except Exception as err:  # PIL's DecompressionBombError, nibabel's ImageFileError, ...
        raise ValueError(f"cannot read {path}: {type(err).__name__}: {err}") from err
    raise ValueError(f"cannot read {path}: unsupported file type (expected NIfTI .nii/.nii.gz, "
                     "PNG/JPG or .npy)")


def read_array(path: str | os.PathLike) -> np.ndarray:
    """Read one image or mask file into a numpy array; every failure names the file."""
    path = Path(path)
    _check_file(path)
    try:
        from orcal.io import read_array as shared_reader
    except ImportError:
        return _read_local(path)
    try:
        return np.asarray(shared_reader(path))
    except (ValueError, TypeError, FileNotFoundError):
        raise
    except Exception as err:
        raise ValueError(f"cannot read {path}: {type(err).__name__}: {err}") from err
