"""Argument checks shared by every public function (SPEC §8): each error names the argument."""

from __future__ import annotations

import math
import numbers
import warnings

import torch

from orcal.ops._schema import async_checks


def check_int(name: str, value: object, low: int | None = None, high: int | None = None) -> int:
    """An integer argument: a Python or NumPy integer (never a bool, a float or a string) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"{low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must lie in {bounds}, got {value}")
    return value


def renamed(new: str, value: object, old: str, old_value: object, where: str) -> object:
    """The value of keyword ``new`` given as ``new`` or under its deprecated name ``old`` (kept for one release):
    ``old`` warns (a ``DeprecationWarning`` that names ``new``); both, with different values, is an error.
    ``None`` means "not given" for both."""
    if old_value is None:
        return value
    warnings.warn(f"{where}: {old}= is deprecated and will be removed in the next release; use {new}=",
                  DeprecationWarning, stacklevel=3)
    if value is not None and value != old_value:
        raise ValueError(f"{where}: {new}={value!r} and {old}={old_value!r} differ; {old} is the deprecated name of "
                         f"{new}, give {new} only")
    return old_value


def check_real(name: str, value: object, low: float = 0.0) -> float:
    """A finite real argument ``>= low``: a Python or NumPy number (never a bool or a string)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or value < low:
        raise ValueError(f"{name} must be a finite number >= {low}, got {value}")
    return value


def check_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def integer_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(min, max)`` of an integer tensor on any device: min/max exist for the signed types everywhere, so
    uint8 goes through int16 and the wider unsigned types through int64."""
    if not x.dtype.is_signed:
        x = x.to(torch.int16 if x.dtype == torch.uint8 else torch.int64)
    return torch.aminmax(x)


#: How to keep counts and label maps integers through MONAI's resampling (every float-count error says it).
NEAREST_HINT = ("resample label maps and vote counts with nearest-neighbour interpolation (MONAI: "
                "Spacingd(keys, pixdim, mode=('bilinear', 'nearest')) with one mode per key, image first), or pass "
                "an integer tensor")


def integer_valued(x: torch.Tensor, name: str, what: str, low: int = 0, high: int = 255) -> torch.Tensor:
    """Counts or labels given as a float tensor (what MONAI's ``Spacingd``/``Orientationd`` and loaders make of
    them) as an integer tensor (uint8 when ``low >= 0``, else int16), when every value is an exact integer in
    ``low..high``; other tensors are returned as they are. A non-integer value (interpolated by a resampling)
    is a ``TypeError`` that says how to keep them integers; one outside the range a ``ValueError``."""
    if not x.dtype.is_floating_point:
        return x
    if x.numel() and x.device.type != "meta":
        whole = x == x.round()  # False for NaN and inf
        data_check(whole.all(), lambda: f"{name} ({what}) is a {x.dtype} tensor holding non-integer values "
                                        f"(e.g. {x[~whole].flatten()[0].item()}): {NEAREST_HINT}", TypeError)
        lo, hi = torch.aminmax(x)
        data_check((lo >= low) & (hi <= high),
                   lambda: f"{name} ({what}) must lie in {low}..{high}; found {lo.item():g}..{hi.item():g}")
    return x.to(torch.uint8 if low >= 0 else torch.int16)


def data_check(ok: torch.Tensor, message, error: type[Exception] = ValueError) -> None:
    """Raise ``error(message())`` unless ``ok`` (a bool tensor) holds. Inside ``torch.compile``, while a CUDA
    graph is captured and with ``ORCAL_ASYNC_CHECKS=1`` the check is an asynchronous assertion instead (no
    data-dependent branch, no graph break, no host synchronisation)."""
    if torch.compiler.is_compiling() or async_checks(ok.device):
        torch._assert_async(ok, "orcal: an argument holds values outside its range (see SPEC §8)")
    elif not bool(ok):
        raise error(message())
