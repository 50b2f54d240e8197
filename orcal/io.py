"""Read and write image and mask arrays: NIfTI (nibabel), PNG / JPEG / BMP / TIFF (Pillow) and ``.npy``.

Every error names the file. Arrays are returned in the file's own axis order and dtype (NIfTI: nibabel's
``(x, y, z)`` order with any intensity scaling applied; images: ``(H, W)`` or ``(H, W, C)``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from orcal.ops.masks import binary_mask, mask_plane, select_labels, structure_map

NIFTI_EXTENSIONS = (".nii.gz", ".nii")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NUMPY_EXTENSIONS = (".npy",)
EXTENSIONS = NIFTI_EXTENSIONS + IMAGE_EXTENSIONS + NUMPY_EXTENSIONS

#: Files larger than this are refused before reading (a wrong path or a hostile file).
MAX_FILE_BYTES = 8 * 1024**3

__all__ = ["EXTENSIONS", "binary_mask", "check_same_grid", "extension", "file_format", "mask_plane", "natural_key",
           "nifti_affine", "rater_files", "read_array", "read_mask", "write_array"]


def file_format(path: str | os.PathLike) -> str:
    """The format of ``path`` from its extension: ``"nifti"``, ``"image"`` or ``"npy"``."""
    name = Path(path).name.lower()
    if name.endswith(NIFTI_EXTENSIONS):
        return "nifti"
    if name.endswith(IMAGE_EXTENSIONS):
        return "image"
    if name.endswith(NUMPY_EXTENSIONS):
        return "npy"
    raise ValueError(f"{path}: unsupported file type; supported extensions are {', '.join(EXTENSIONS)}")


def extension(path: str | os.PathLike) -> str:
    """The (possibly double, as ``.nii.gz``) extension of ``path``, lower case."""
    name = Path(path).name.lower()
    for ext in EXTENSIONS:
        if name.endswith(ext):
            return ext
    return Path(path).suffix.lower()


def read_array(path: str | os.PathLike) -> np.ndarray:
    """Read the array stored in ``path`` (format chosen by extension).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: unsupported extension, empty or oversized file, or a file that cannot be decoded.
    """
    path = Path(path)
    kind = file_format(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path}: the file is empty")
    if size > MAX_FILE_BYTES:
        raise ValueError(f"{path}: {size / 1024**3:.1f} GiB is over the {MAX_FILE_BYTES / 1024**3:.0f} GiB "
                         "limit for one file")
    try:
        if kind == "nifti":
            import nibabel as nib

            return np.asarray(nib.load(str(path)).dataobj)
        if kind == "image":
            from PIL import Image

            with Image.open(path) as img:
                return np.array(img)
        # allow_pickle=False: a .npy file must never execute code when read
        return np.load(path, allow_pickle=False)
    except Exception as err:  # decoding errors of three libraries: report them uniformly
        raise ValueError(f"{path}: could not read it as {kind} ({type(err).__name__}: {err})") from err


def natural_key(text: str) -> list:
    """Sort key that orders ``slice-2`` before ``slice-10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(text))]


def rater_files(folder: str | os.PathLike, pattern: str = "*", exclude: tuple = ()) -> list[Path]:
    """The rater files of one case folder: files with a supported extension whose name matches ``pattern``
    (``fnmatch``), in natural order (``rater2`` before ``rater10``). Every reader of rater folders uses it."""
    import fnmatch

    folder = Path(folder)
    return sorted((p for p in folder.iterdir() if p.is_file() and p not in exclude
                   and p.name.lower().endswith(EXTENSIONS) and fnmatch.fnmatch(p.name, pattern)),
                  key=lambda p: natural_key(p.name))


def read_spacing(path: str | os.PathLike) -> tuple[float, ...] | None:
    """The voxel size (mm per axis, in the array's axis order) of a NIfTI file; None for other formats."""
    if file_format(path) != "nifti":
        return None
    import nibabel as nib

    img = nib.load(str(path))
    return tuple(float(z) for z in img.header.get_zooms()[: len(img.shape)])


#: Largest difference (mm) between two NIfTI affines read as one voxel grid: float32 rounding of the header.
GRID_ATOL = 1e-3


def nifti_affine(path: str | os.PathLike) -> np.ndarray | None:
    """The voxel-to-world affine of a NIfTI file; None for other formats (they carry no grid)."""
    if file_format(path) != "nifti":
        return None
    import nibabel as nib

    try:
        return np.asarray(nib.load(str(path)).affine, dtype=np.float64)
    except Exception as err:
        raise ValueError(f"{path}: could not read it as nifti ({type(err).__name__}: {err})") from err


def check_same_grid(paths: Sequence[str | os.PathLike], what: str) -> None:
    """The NIfTI files among ``paths`` must share one voxel grid: a mask mirrored or shifted against the
    others has the same shape and would be scored voxel by voxel against the wrong anatomy."""
    grids = [(p, a) for p in paths if (a := nifti_affine(p)) is not None]
    for p, a in grids[1:]:
        if not np.allclose(a, grids[0][1], rtol=0, atol=GRID_ATOL):
            diff = float(np.abs(a - grids[0][1]).max())
            raise ValueError(f"{p}: its voxel grid (NIfTI affine) differs from that of {grids[0][0]} by up to "
                             f"{diff:.4g}: {what} must lie on one grid (mirrored, shifted or resampled files "
                             "are not compared voxel by voxel); resample them onto one grid first")


def read_mask(path: str | os.PathLike, channel: int | None = None, label: int | Sequence[int] | None = None,
              structures: Sequence[int] | None = None) -> np.ndarray:
    """Read one rater's binary mask as uint8 {0, 1} (see :func:`mask_plane` and :func:`binary_mask`).

    ``channel`` picks the channel of a colour image file; NIfTI and ``.npy`` arrays are read as they are.
    ``label`` reads one structure (or several, as one) of a multi-label map (:func:`select_labels`);
    ``structures`` reads several as a label map 0..C (:func:`structure_map`, SPEC §11).
    """
    arr = read_array(path)
    if file_format(path) == "image" and arr.ndim == 3:
        arr = mask_plane(arr, str(path), channel)
    elif channel is not None:
        raise ValueError(f"{path}: a mask channel ({channel}) applies to colour image files only")
    if structures is not None:
        if label is not None:
            raise ValueError("give label (one structure) or structures (several), not both")
        return structure_map(arr, structures, str(path))
    return binary_mask(arr, str(path)) if label is None else select_labels(arr, label, str(path))


def _nifti_like(like: str | os.PathLike | None):
    if like is None or file_format(like) != "nifti":
        return None, None
    import nibabel as nib

    try:
        ref = nib.load(str(like))
    except Exception as err:
        raise ValueError(f"{like}: could not read it as nifti ({type(err).__name__}: {err})") from err
    return ref.affine, ref.header


def write_array(path: str | os.PathLike, array, like: str | os.PathLike | None = None) -> Path:
    """Write ``array`` to ``path`` (format chosen by extension); parent folders are created.

    - NIfTI: the affine and header of ``like`` are kept when ``like`` is a NIfTI file (the data type
      follows ``array``); otherwise an identity affine.
    - Images: ``array`` must be ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)`` of uint8 (or uint16 for
      single-channel); bool is written as 0 / 255. Scale probabilities yourself.
    - ``.npy``: written as is.

    Returns the path written.
    """
    path = Path(path)
    kind = file_format(path)
    arr = np.asarray(array)
    if arr.dtype == np.bool_ and kind != "npy":
        arr = arr.astype(np.uint8) * (255 if kind == "image" else 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "nifti":
        import nibabel as nib

        affine, header = _nifti_like(like)
        img = nib.Nifti1Image(arr, np.eye(4) if affine is None else affine, header)
        img.set_data_dtype(arr.dtype)
        if header is not None:  # the reference's intensity scaling must not apply to our values
            img.header.set_slope_inter(1.0, 0.0)
        nib.save(img, str(path))
    elif kind == "image":
        from PIL import Image

        ok_shape = arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))
        ok_dtype = arr.dtype == np.uint8 or (arr.dtype == np.uint16 and arr.ndim == 2)
        if not (ok_shape and ok_dtype):
            raise ValueError(f"{path}: an image file takes a (H, W) or (H, W, 3|4) uint8 array, got shape "
                             f"{arr.shape} of {arr.dtype}")
        Image.fromarray(arr).save(path)
    else:
        np.save(path, arr, allow_pickle=False)
    return path
