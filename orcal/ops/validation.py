"""The checks of the ops' tensor inputs (SPEC §8): layouts, dtypes, devices, vote counts, masks of valid voxels and
probabilities, each error naming the argument. The scalar and generic checks are :mod:`orcal.ops.checks`."""

from __future__ import annotations

import torch

from orcal.ops._schema import FLOAT_DTYPES, MAX_RATERS
from orcal.ops.checks import check_int, check_tensor, data_check, integer_range, integer_valued
from orcal.ops.reference import majority_threshold


def check_spatial(name: str, x: torch.Tensor, extra_dims: int) -> None:
    """``x`` must be (B, [C,] H, W) or (B, [C,] D, H, W): ``extra_dims`` is 1 with a channel axis."""
    if x.ndim not in (2 + extra_dims + 1, 3 + extra_dims + 1):
        layout = "(B, C, *S)" if extra_dims else "(B, *S)"
        raise ValueError(f"{name} must be {layout} with S 2D or 3D, i.e. {3 + extra_dims} or "
                         f"{4 + extra_dims} dims; got shape {tuple(x.shape)}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    present = {k: v.device for k, v in tensors.items() if v is not None}
    if len(set(present.values())) > 1:
        raise ValueError(f"all tensors must be on the same device, got {present}")


def check_float(name: str, x: torch.Tensor) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")


def check_valid(valid: torch.Tensor | None, shape: torch.Size, what: str) -> None:
    """``valid`` must be None or a bool tensor of ``shape`` (that of ``what``)."""
    if valid is None:
        return
    check_tensor("valid", valid)
    if valid.dtype != torch.bool:
        raise TypeError(f"valid must be a bool tensor, got {valid.dtype}")
    if valid.shape != shape:
        raise ValueError(f"valid must have the shape of {what} {tuple(shape)}, got {tuple(valid.shape)}")


def as_votes(k: torch.Tensor, shape: torch.Size, num_raters: int, name: str = "k",
             device: torch.device | None = None) -> torch.Tensor:
    """Check vote counts ``k`` (B, *S) and return them as uint8 (a copy only if the dtype differs)."""
    check_tensor(name, k)
    if k.dtype.is_complex or k.dtype == torch.bool:
        raise TypeError(f"{name} (vote counts) must be an integer tensor (uint8), got {k.dtype}")
    if k.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)} (the prediction without its channel axis), "
                         f"got {tuple(k.shape)}")
    if device is not None and k.device != device:
        raise ValueError(f"{name} must be on the prediction's device {device}, got {k.device}")
    k = integer_valued(k, name, "vote counts", 0, num_raters)  # MONAI's resampled float32 counts
    if k.dtype != torch.uint8:
        if k.numel() and k.device.type != "meta":
            lo, hi = integer_range(k)
            data_check((lo >= 0) & (hi <= num_raters),
                        lambda: f"{name} must lie in 0..R = 0..{num_raters}; found {int(lo)}..{int(hi)}")
        k = k.to(torch.uint8)
    return k


def loss_targets(k: torch.Tensor, valid: torch.Tensor | None, spatial: torch.Size, ignore_index: int | None,
                 name: str = "k") -> tuple[torch.Tensor, torch.Tensor | None]:
    """The targets of a loss as the ecosystem hands them over: ``(B, *S)`` or channel-first ``(B, 1, *S)``,
    any integer dtype or a float holding integers, and ``ignore_index`` voxels (nnU-Net's -1 padding) turned
    into invalid ones. Returns ``(k, valid)`` with ``k`` ``(B, *S)`` (its own dtype) and the combined mask."""
    check_tensor(name, k)
    if k.ndim == len(spatial) + 1 and k.shape[1] == 1:
        k = k[:, 0]
    k = integer_valued(k, name, "vote counts", -32768, 32767)  # 0..255 and a negative ignore_index fit
    if ignore_index is not None and k.shape == spatial:
        k, valid = drop_ignored(k, valid, check_int("ignore_index", ignore_index))
    return k, valid


def channel_first_votes(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None, kind: str
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Vote counts ``k`` of a metric given channel-first, ``(B, 1, *S)`` as MONAI and nnU-Net hold them, as
    ``(B, *S)`` (and ``valid`` likewise). ``k`` has a channel axis when it has as many dimensions as a
    prediction that has one: ordinal logits, or a ``(B, 1, *S)`` probability map; a 3D volume of depth 1 in
    the plain layout reads the same either way, since the statistics are sums over voxels."""
    has_channel = target.ndim == 5 or (target.ndim == 4 and pred.ndim == 4 and (kind == "ordinal"
                                                                                 or pred.shape[1] == 1))
    if not has_channel or target.shape[1] != 1:
        return target, valid
    if valid is not None and valid.ndim == target.ndim and valid.shape[1] == 1:
        valid = valid[:, 0]
    return target[:, 0], valid


def drop_ignored(target: torch.Tensor, valid: torch.Tensor | None, ignore_index: float
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``target`` with its ``ignore_index`` voxels set to 0, and ``valid`` without them."""
    ignored = target == ignore_index
    target = torch.where(ignored, torch.zeros((), dtype=target.dtype, device=target.device), target)
    return target, ~ignored if valid is None else valid & ~ignored


def check_majority(num_raters: int, majority: int | None) -> int:
    """The majority threshold ``m`` in 1..R; ``R // 2 + 1`` by default."""
    if majority is None:
        return majority_threshold(num_raters)
    return check_int(f"majority (with R = {num_raters})", majority, 1, num_raters)


def check_no_majority(readout: str, majority: int | None) -> None:
    """The half-tie readout has its own thresholds (R/2 and R/2 + 1): a ``majority`` given with it is refused
    rather than silently ignored."""
    if majority is not None:
        raise ValueError(f"readout={readout!r} averages the majority readouts at m = R/2 and R/2 + 1 and takes no "
                         f"majority (got majority={majority!r}): pass majority=None, or readout='majority' for "
                         "one threshold")


def check_ordinal_logits(logits: torch.Tensor, name: str = "logits") -> int:
    """Check ordinal logits ``(B, R+1, *S)`` and return ``R``."""
    check_tensor(name, logits)
    check_spatial(name, logits, 1)
    check_float(name, logits)
    R = logits.shape[1] - 1
    if not 1 <= R <= MAX_RATERS:
        raise ValueError(f"{name} must have R + 1 channels for R in 1..{MAX_RATERS} raters, "
                         f"got {logits.shape[1]} channels")
    return R


def probability_error(kind: str, first: float, count: int, name: str = "pred") -> str:
    """The message for ``count`` probabilities that are NaN or outside [0, 1] (the first one ``first``)."""
    if kind == "prob":
        return (f"{name} must hold probabilities in [0, 1]; found {first} ({count} bad values). "
                "Pass kind='logit' for logits.")
    return (f"{name} (kind={kind!r}) gives {count} probabilities that are NaN or outside [0, 1], the first "
            f"{first}: the logits hold NaN or infinite values")


def check_probabilities(p: torch.Tensor, valid: torch.Tensor | None = None, name: str = "pred",
                        kind: str = "prob") -> None:
    """Raise if a probability that counts is NaN or outside [0, 1] (what was found, and how many)."""
    if p.device.type == "meta":
        return
    considered = p if valid is None else p[valid]
    if considered.numel() == 0:
        return
    bad = torch.isnan(considered) | (considered < 0) | (considered > 1)
    data_check(~bad.any(), lambda: probability_error(kind, considered[bad][0].item(), int(bad.sum()), name))
