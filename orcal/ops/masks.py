"""The one rule for rater masks, wherever they come from: tensors given to the ops and to the fusion
strategies, and arrays read from files by the loaders, ``orcal fuse`` and ``orcal evaluate``.

- :func:`check_masks`: the kernels' contract, ``(B, R, *S)`` bool or uint8 in {0, 1}.
- :func:`as_bool_masks`: the fusion strategies' contract, any real dtype holding 0/1, returned as bool.
- :func:`binary_mask` and :func:`mask_plane`: a rater's file array as uint8 {0, 1} (background 0 and one
  foreground value; colour images must be grey unless a channel is chosen).

Both tensor rules share the layout check; both file rules name the file in every error.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from orcal.ops._schema import MAX_RATERS
from orcal.ops.checks import check_int, data_check, integer_valued


def _check_layout(masks: object, name: str) -> torch.Tensor:
    if not isinstance(masks, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, R, H, W) or (B, R, D, H, W), "
                        f"got {type(masks).__name__}")
    if masks.ndim not in (4, 5):
        raise ValueError(f"{name} must be rater masks (B, R, H, W) or (B, R, D, H, W) (S 2D or 3D, i.e. 4 or 5 "
                         f"dimensions); got shape {tuple(masks.shape)} ({masks.ndim} dimensions)")
    R = masks.shape[1]
    if not 1 <= R <= MAX_RATERS:
        raise ValueError(f"{name} must hold at least one rater and at most {MAX_RATERS} (1..{MAX_RATERS} raters "
                         f"along dim 1), got {R}")
    return masks


def check_masks(masks: torch.Tensor, name: str = "masks", check_values: bool = True) -> None:
    """Rater masks for the kernels: ``(B, R, *S)``, bool or uint8; values in {0, 1} checked when asked (a full
    pass, which the compiled kernels do themselves)."""
    _check_layout(masks, name)
    if masks.dtype not in (torch.bool, torch.uint8):
        raise TypeError(f"{name} must be bool or uint8 in {{0, 1}}, got {masks.dtype}")
    if check_values and masks.dtype == torch.uint8 and masks.numel() and masks.device.type != "meta":
        top = masks.max()
        data_check(top <= 1, lambda: f"{name} must be binary (0/1); found value {int(top)}")


def rater_masks(masks: torch.Tensor, name: str = "masks") -> torch.Tensor:
    """:func:`check_masks` under the one rule for float inputs (SPEC §8): a float tensor holding only 0 and 1
    (MONAI's loaders and resampling give float32) is read as uint8; any other float value is refused."""
    masks = integer_valued(masks, name, "rater masks", 0, 1)
    check_masks(masks, name)
    return masks


def as_bool_masks(masks: torch.Tensor, name: str = "masks") -> torch.Tensor:
    """Rater masks of any real dtype holding 0/1 (bool, integers, floats), returned as a bool tensor."""
    _check_layout(masks, name)
    if masks.dtype.is_complex:
        raise TypeError(f"{name} must be bool or uint8 in {{0, 1}}, got dtype {masks.dtype}")
    if masks.dtype == torch.bool:
        return masks
    if masks.numel() and not bool(((masks == 0) | (masks == 1)).all()):
        bad = masks[(masks != 0) & (masks != 1)].flatten()[0].item()
        raise ValueError(f"{name} must be binary (values 0 or 1), found the value {bad}")
    return masks != 0


def _check_integer_labels(arr: np.ndarray, source: str, what: str = "a label map") -> None:
    """A float file array must hold finite integers: NaN would count as a vote (NaN != 0) and 1.5 as no
    label, both without a word."""
    if arr.dtype.kind in "fc":
        bad = ~np.isfinite(arr) | (arr != np.round(arr))
        if bad.any():
            raise ValueError(f"{source}: {what} must hold integer labels, found {int(bad.sum())} non-integer or "
                             f"non-finite values (e.g. {arr[bad].flat[0]})")


def binary_mask(arr: np.ndarray, source: str) -> np.ndarray:
    """A rater's mask array as uint8 {0, 1}; foreground may be stored as 1, 255 or any single non-zero value."""
    arr = np.asarray(arr)
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    _check_integer_labels(arr, source, "a mask")
    values = np.unique(arr)
    if values.size > 2 or (values.size == 2 and values[0] != 0):
        shown = ", ".join(str(v) for v in values[:8]) + (" ..." if values.size > 8 else "")
        raise ValueError(f"{source}: a binary mask must hold background 0 and one foreground value, "
                         f"found {values.size} values ({shown}); a label map with several structures needs the "
                         "label to read: label=N in the loaders, --label N in orcal fuse / evaluate / data info")
    return (arr != 0).astype(np.uint8)


def select_labels(arr: np.ndarray, labels: int | Sequence[int], source: str) -> np.ndarray:
    """The structure ``labels`` (one integer label or several) of a rater's label map, as uint8 {0, 1}.

    A label the map does not hold gives an empty mask (a rater may have drawn no such structure); a map
    with non-integer values is an error naming ``source``.
    """
    arr = np.asarray(arr)
    wanted = (labels,) if isinstance(labels, (int, np.integer)) else tuple(labels)
    if not wanted or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in wanted):
        raise ValueError(f"label must be a positive integer or a list of them (0 is background), got {labels!r}")
    _check_integer_labels(arr, source)
    return np.isin(arr, np.asarray(wanted)).astype(np.uint8)


def check_structures(structures: Sequence[int], name: str = "structures") -> tuple[int, ...]:
    """Distinct positive integer labels, in the order given (at most 255: a uint8 label map)."""
    if isinstance(structures, (str, bytes)) or not isinstance(structures, Sequence):
        raise TypeError(f"{name} must be a list of labels, got {structures!r}")
    out = tuple(structures)
    if (not out or len(out) > 255 or len(set(out)) != len(out)
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in out)):
        raise ValueError(f"{name} must be distinct positive labels (0 is background), got {structures!r}")
    return tuple(int(v) for v in out)


def structure_map(arr: np.ndarray, structures: Sequence[int], source: str) -> np.ndarray:
    """A rater's label map with label ``structures[i]`` as ``i + 1`` and every other voxel 0, uint8: the
    rater label maps of SPEC §11 (structure ``c`` of the result is ``structures[c - 1]`` of the file)."""
    wanted = check_structures(structures)
    arr = np.asarray(arr)
    _check_integer_labels(arr, source)
    out = np.zeros(arr.shape, dtype=np.uint8)
    for i, value in enumerate(wanted):
        out[arr == value] = i + 1
    return out


def mask_plane(arr: np.ndarray, source: str, channel: int | None = None) -> np.ndarray:
    """The annotation plane of a mask stored as a colour image ``(H, W, C)`` (grey+alpha, RGB or RGBA).

    With ``channel`` that channel is taken (0 red / grey, 1 green, 2 blue, 3 alpha). Without it the image
    must be grey: every channel that varies holds the same values (a constant, fully opaque alpha channel is
    ignored). A mask drawn in colour, or stored in the alpha channel alone, is an error naming ``source``
    rather than silently read from channel 0.
    """
    arr = np.asarray(arr)
    if arr.ndim != 3:
        return arr
    C = arr.shape[2]
    if channel is not None:
        return arr[..., check_int("mask channel", channel, 0, C - 1)]
    colour = arr
    if C in (2, 4) and (arr[..., -1] == arr[..., -1].flat[0]).all():
        colour = arr[..., :-1]  # a constant alpha channel carries no annotation
    if (colour == colour[..., :1]).all():
        return colour[..., 0]
    names = ("red", "green", "blue", "alpha") if C >= 3 else ("grey", "alpha")
    varying = [names[c] for c in range(C) if not (arr[..., c] == arr[..., c].flat[0]).all()]
    raise ValueError(f"{source}: a colour mask (its {', '.join(varying)} channels differ); choose the channel that "
                     f"holds the annotation ({', '.join(f'{i} {n}' for i, n in enumerate(names[:C]))}), e.g. "
                     "mask_channel=1 in the loaders or --mask-channel 1 in orcal fuse")
