"""orcal.io: round trips per format, NIfTI affine kept, errors that name the file."""

from __future__ import annotations

import numpy as np
import pytest

from orcal.io import extension, file_format, read_array, write_array

nib = pytest.importorskip("nibabel")


def _affine():
    a = np.diag([0.5, 0.7, 2.0, 1.0])
    a[:3, 3] = [10.0, -3.0, 4.5]
    return a


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
def test_nifti_round_trip_keeps_values_and_dtype(tmp_path, ext):
    arr = np.random.default_rng(0).random((4, 5, 3)).astype(np.float32)
    path = write_array(tmp_path / f"x{ext}", arr)
    out = read_array(path)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, arr)
    np.testing.assert_array_equal(nib.load(str(path)).affine, np.eye(4))


def test_nifti_like_keeps_affine(tmp_path):
    ref = tmp_path / "ref.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 3), np.uint8), _affine()), str(ref))
    arr = np.linspace(0, 1, 60, dtype=np.float32).reshape(4, 5, 3)
    path = write_array(tmp_path / "sub" / "out.nii.gz", arr, like=ref)
    img = nib.load(str(path))
    np.testing.assert_allclose(img.affine, _affine())
    np.testing.assert_array_equal(read_array(path), arr)


def test_nifti_like_with_scaling_does_not_rescale(tmp_path):
    ref = tmp_path / "ref.nii"
    img = nib.Nifti1Image(np.zeros((3, 3, 2), np.int16), _affine())
    img.header.set_slope_inter(2.0, 1.0)
    nib.save(img, str(ref))
    arr = np.full((3, 3, 2), 0.25, np.float32)
    np.testing.assert_array_equal(read_array(write_array(tmp_path / "o.nii", arr, like=ref)), arr)


def test_png_round_trip_and_bool(tmp_path):
    arr = (np.arange(20, dtype=np.uint8) * 12).reshape(4, 5)
    np.testing.assert_array_equal(read_array(write_array(tmp_path / "a.png", arr)), arr)
    mask = arr > 100
    np.testing.assert_array_equal(read_array(write_array(tmp_path / "b.png", mask)), mask * 255)


def test_png_rejects_float(tmp_path):
    with pytest.raises(ValueError, match="a.png"):
        write_array(tmp_path / "a.png", np.zeros((3, 3), np.float32))


def test_npy_round_trip(tmp_path):
    arr = np.random.default_rng(1).random((2, 3, 4)).astype(np.float32)
    out = read_array(write_array(tmp_path / "x.npy", arr))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, arr)


def test_npy_refuses_pickles(tmp_path):
    path = tmp_path / "obj.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="obj.npy"):
        read_array(path)


def test_missing_file_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        read_array(tmp_path / "nope.nii.gz")


@pytest.mark.parametrize("name", ["bad.nii.gz", "bad.png", "bad.npy"])
def test_corrupt_file_named(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"this is not an image at all")
    with pytest.raises(ValueError, match=name):
        read_array(path)


def test_empty_file_named(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.png"):
        read_array(path)


def test_unknown_extension(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("1")
    with pytest.raises(ValueError, match=r"x\.txt.*\.nii\.gz"):
        read_array(path)
    with pytest.raises(ValueError, match="x.txt"):
        write_array(path, np.zeros(3))


def test_format_and_extension():
    assert file_format("a/B.NII.GZ") == "nifti"
    assert file_format("a.jpeg") == "image"
    assert file_format("a.npy") == "npy"
    assert extension("case/rater1.nii.gz") == ".nii.gz"
    assert extension("x.PNG") == ".png"
