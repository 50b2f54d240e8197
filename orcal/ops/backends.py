"""The backend table: which implementations of the op contract exist, when ``backend="auto"`` picks each one, and
why one asked for by name cannot run.

A backend is a ``torch.library`` namespace holding the four ops of ``csrc/orcal.cpp``'s schema (the contract of
:mod:`orcal.ops._schema`), registered here with one :func:`register_backend` call. ``"torch"`` is the reference
(:mod:`orcal.ops.reference`), always available and differentiable to any order: it is not in the table, and
``auto`` falls back to it. The ops call a backend only through :func:`call`, so a new one needs no other edit.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import torch

from orcal.ops._ext import compiled, has_kernel, why_no_kernel, why_no_triton
from orcal.ops._schema import FAKES, register
from orcal.ops.checks import check_choice

#: The four ops every backend implements (their shapes and the loss's autograd: :data:`orcal.ops._schema.FAKES`).
OPS = tuple(FAKES)
REFERENCE = "torch"


@dataclass(frozen=True)
class Backend:
    """One row of the table.

    Attributes:
        name: the ``backend=`` value (and what ``ORCAL_BACKEND`` may name).
        namespace: the ``torch.library`` namespace of its four ops, e.g. ``"orcal"`` for ``torch.ops.orcal``.
        unavailable: ``(op, device) -> None`` when it can run ``op`` on ``device``, else the reason and how to
            get it (the error for a backend asked for by name).
        device_types: the device types on which ``auto`` picks it, when available; None for every type.
        load: returns the object holding its ops, for a backend that registers them on first use (Triton
            imports triton then); None for ``torch.ops.<namespace>``.
    """

    name: str
    namespace: str
    unavailable: Callable[[str, torch.device], str | None]
    device_types: tuple[str, ...] | None = None
    load: Callable[[], object] | None = None

    def op(self, op: str):
        """The callable of ``op`` in this backend."""
        return getattr(self.load() if self.load is not None else getattr(torch.ops, self.namespace), op)


_TABLE: dict[str, Backend] = {}
#: The registered backends, ``{name: Backend}`` in registration order: a read-only, live view of the table (the
#: registries' one style). ``"torch"``, the reference, is not in it.
TABLE = MappingProxyType(_TABLE)


def _always(op: str, device: torch.device) -> None:
    return None


def register_backend(name: str, namespace: str, *, unavailable: Callable[[str, torch.device], str | None] | None = None,
                     device_types: Sequence[str] | None = None, load: Callable[[], object] | None = None) -> Backend:
    """Add a backend to the table: ``backend=name`` then runs the ops in ``namespace``.

    Implement the four ops of the schema (:data:`OPS`) in ``namespace`` and call
    :func:`orcal.ops._schema.register` for their shapes and the fused loss's autograd first. The ops hand a
    backend checked arguments; the values in the data (a non-binary mask, ``k > R``, a probability outside
    [0, 1]) are the backend's to refuse with a ``ValueError``, as the compiled kernels do. ``auto`` tries the
    backends in registration order on the ``device_types`` listed, before the ``"torch"`` reference.
    """
    if not isinstance(name, str) or not name.isidentifier() or name in ("auto", REFERENCE):
        raise ValueError(f"backend name must be an identifier other than 'auto' and {REFERENCE!r}, got {name!r}")
    if name in _TABLE:
        raise ValueError(f"backend {name!r} is already registered; unregister_backend({name!r}) first")
    entry = Backend(name, namespace, unavailable or _always, None if device_types is None else tuple(device_types),
                    load)
    _TABLE[name] = entry
    return entry


def unregister_backend(name: str) -> None:
    """Remove a backend added by :func:`register_backend`."""
    if name not in _TABLE:
        raise KeyError(f"no backend {name!r} is registered; registered: {tuple(_TABLE)}")
    del _TABLE[name]


class _Names(Sequence):
    """``("auto", "torch", *registered)``: a live view of the table, so a check against it sees new backends."""

    def __getitem__(self, index):
        return ("auto", REFERENCE, *_TABLE)[index]

    def __len__(self) -> int:
        return 2 + len(_TABLE)

    def __repr__(self) -> str:
        return repr(tuple(self))


#: Every value ``backend=`` takes.
BACKENDS: Sequence[str] = _Names()


def _constant_result(fn):
    """``torch.compiler.assume_constant_result`` without importing torch._dynamo when orcal is imported: that
    function only sets this mark (torch 2.9 to 2.14); tests/test_hardening.py compiles with fullgraph=True."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_result  # the choice is made once, outside a traced graph
def resolve_backend(op: str, backend: str, device: torch.device) -> str:
    """The backend that runs ``op`` on ``device``: ``"torch"`` or a name in the table."""
    check_choice("backend", backend, tuple(BACKENDS))
    if backend == "auto":
        forced = os.environ.get("ORCAL_BACKEND", "auto")
        check_choice("ORCAL_BACKEND", forced, tuple(BACKENDS))
        backend = forced
    if backend == "auto":
        for entry in _TABLE.values():
            if (entry.device_types is None or device.type in entry.device_types) \
                    and entry.unavailable(op, device) is None:
                return entry.name
        return REFERENCE
    if backend != REFERENCE:
        reason = _TABLE[backend].unavailable(op, device)
        if reason:
            raise RuntimeError(f"backend={backend!r} asked for orcal::{op} on {device.type}, but {reason}")
    return backend


def call(backend: str, op: str, device: torch.device, *args):
    """Run ``op`` of a backend in the table; running out of CPU memory there is Python's ``MemoryError`` (SPEC §8)."""
    try:
        return _TABLE[backend].op(op)(*args)
    except torch.OutOfMemoryError as err:
        if device.type != "cpu":
            raise
        raise MemoryError(f"orcal ran out of CPU memory: {err}") from err


# --- the built-in backends --------------------------------------------------------------------------------

def _no_kernel(op: str, device: torch.device) -> str | None:
    return None if has_kernel(op, device) else why_no_kernel(device)


def _triton_ops():
    # Imports triton and registers the orcal_triton:: ops on first use.
    return importlib.import_module("orcal.ops._triton._ops")


if compiled():
    register("orcal", "cpp")
register_backend("cpp", "orcal", unavailable=_no_kernel)  # compiled kernels wherever built (CPU, CUDA, meta)
register_backend("triton", "orcal_triton", unavailable=lambda op, device: why_no_triton(device),
                 device_types=("cuda",), load=_triton_ops)
