"""Several structures at once (SPEC §11): one-vs-rest ordinal consensus per structure, through the binary ops.

Ordinal logits of ``C`` structures are ``(B, C * (R + 1), *S)``, structure-major, so a contiguous tensor is
viewed as ``(B * C, R + 1, *S)`` without a copy: every compiled kernel runs unchanged on that view, and the
``B * C`` rows of its statistics are image-major (row ``b * C + c``). Vote counts are ``(B, C, *S)``, viewed
as ``(B * C, *S)``.
"""

from __future__ import annotations

import torch

from orcal.ops.checks import check_int, check_tensor, data_check, integer_range, integer_valued


def structures_of(logits: torch.Tensor, k: torch.Tensor) -> int | None:
    """``C`` when ``k`` holds one vote map per structure (it has as many dimensions as the logits and more
    than one channel), else None: ``k`` ``(B, *S)`` or ``(B, 1, *S)`` is the binary case."""
    if isinstance(k, torch.Tensor) and k.ndim == logits.ndim and k.ndim >= 3 and k.shape[1] > 1:
        return k.shape[1]
    return None


def raters_per_structure(channels: int, num_structures: int, name: str = "logits") -> int:
    """``R`` from the ``C * (R + 1)`` channels of multi-structure ordinal logits."""
    C = check_int("num_structures", num_structures, 1)
    if channels % C or channels // C < 2:
        raise ValueError(f"{name} has {channels} channels, which is not C * (R + 1) for C = {C} structures "
                         "and R >= 1 raters (channel c * (R + 1) + level)")
    return channels // C - 1


def check_head(channels: int, num_raters: int | None, num_structures: int | None, name: str = "logits") -> None:
    """Check an ordinal head's channels against the ``R`` raters and ``C`` structures it was said to have:
    ``C * (R + 1)`` (``R + 1`` for one structure). A head sized for other raters would otherwise train
    silently on other vote counts (the majority threshold moves with ``R``)."""
    C = 1 if num_structures is None else check_int("num_structures", num_structures, 1)
    if num_raters is None:
        raters_per_structure(channels, C, name)
        return
    R = check_int("num_raters", num_raters, 1, 255)
    if channels != C * (R + 1):
        said = f"num_raters = {R}" + (f" and num_structures = {C}" if num_structures is not None else "")
        need = f"C * (R + 1) = {C * (R + 1)}" if num_structures is not None else f"R + 1 = {R + 1}"
        raise ValueError(f"{name} has {channels} channels, but {said} need {need}: size the network's output "
                         f"channels (e.g. out_channels={C * (R + 1)}), or correct num_raters")


def fold(x: torch.Tensor, num_structures: int) -> torch.Tensor:
    """``(B, C * X, *S)`` as ``(B * C, X, *S)``, or ``(B, C, *S)`` as ``(B * C, *S)``: a view when ``x`` is
    contiguous (a copy otherwise, e.g. a channels-last tensor)."""
    B, C = x.shape[0], num_structures
    per = x.shape[1] // C
    return x.reshape(B * C, per, *x.shape[2:]) if per > 1 else x.reshape(B * C, *x.shape[2:])


def unfold(x: torch.Tensor, num_structures: int) -> torch.Tensor:
    """``(B * C, *S)`` as ``(B, C, *S)``."""
    return x.reshape(x.shape[0] // num_structures, num_structures, *x.shape[1:])


def fold_valid(valid: torch.Tensor | None, spatial: torch.Size, num_structures: int) -> torch.Tensor | None:
    """``valid`` for the folded rows: ``(B, *S)`` (shared by the structures) or ``(B, C, *S)``."""
    if valid is None:
        return None
    check_tensor("valid", valid)
    B, S = spatial[0], tuple(spatial[1:])
    if tuple(valid.shape) == (B, *S):
        valid = valid.unsqueeze(1).expand(B, num_structures, *S)
    elif tuple(valid.shape) != (B, num_structures, *S):
        raise ValueError(f"valid must be (B, *S) = {(B, *S)} or (B, C, *S) = {(B, num_structures, *S)}, "
                         f"got {tuple(valid.shape)}")
    return valid.reshape(B * num_structures, *S)


def check_labels(labels: torch.Tensor, num_structures: int, name: str = "labels") -> int:
    """Check rater label maps ``(B, R, *S)`` with values in 0..C (an integer dtype, or a float one holding
    integers, as MONAI hands label maps over); returns ``C``."""
    check_tensor(name, labels)
    C = check_int("num_structures", num_structures, 1, 255)
    if labels.dtype.is_complex:
        raise TypeError(f"{name} (rater label maps) must be an integer or bool tensor, got {labels.dtype}")
    if labels.ndim not in (4, 5):
        raise ValueError(f"{name} must be (B, R, *S) with S 2D or 3D, got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point:  # MONAI's float32 label maps: exact integers only
        integer_valued(labels, name, "rater label maps", 0, C)
        return C
    if labels.numel() and labels.device.type != "meta" and labels.dtype != torch.bool:
        lo, hi = integer_range(labels)
        data_check((lo >= 0) & (hi <= C), lambda: f"{name} must hold labels 0..C = 0..{C} (0 background); "
                                                  f"found {int(lo)}..{int(hi)}")
    return C
