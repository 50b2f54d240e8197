"""Tensor subclasses (MONAI's ``MetaTensor``) at the ops' door: read as plain tensors, and kept away from custom ops
inside ``torch.compile``, which cannot dispatch them."""

from __future__ import annotations

import torch


def plain_tensor(x):
    """A ``torch.Tensor`` subclass (MONAI's ``MetaTensor``) as a plain tensor over the same data; autograd stays
    attached. Anything else is returned as it is. Every public op reads its tensors through this, so a
    subclass's ``__torch_function__`` never sees orcal's custom ops (which subclasses cannot dispatch)."""
    if not isinstance(x, torch.Tensor) or type(x) is torch.Tensor:
        return x
    # A view taken with the subclass's __torch_function__ off is a plain tensor, in eager mode and in a
    # torch.compile graph alike (as_subclass, or any op the subclass sees, cannot be traced on a MetaTensor).
    with torch._C.DisableTorchFunctionSubclass():
        return x.view_as(x)


def _is_subclass(x) -> bool:
    return isinstance(x, torch.Tensor) and type(x) is not torch.Tensor and not isinstance(x, torch.nn.Parameter)


def subclass_backend(op: str, which: str, backend: str, *inputs) -> str:
    """The backend for an op given a tensor subclass inside ``torch.compile``. There a MetaTensor graph input
    reaches a custom op as the subclass at run time (the unwrapping view is re-wrapped by the subclass), and
    torch's check of custom ops refuses it; the reference, made of aten ops, compiles (fullgraph) instead."""
    if which == "torch" or not torch.compiler.is_compiling() or not any(_is_subclass(x) for x in inputs):
        return which
    if backend != "auto":
        raise TypeError(f"orcal::{op} with backend={backend!r} cannot take a tensor subclass "
                        f"({', '.join(sorted({type(x).__name__ for x in inputs if _is_subclass(x)}))}) inside "
                        "torch.compile; pass plain tensors (MetaTensor.as_tensor()) or backend='auto'")
    return "torch"
