"""Multi-annotation strategies (SPEC §6): turn ``R`` binary rater masks into one training target.

Every strategy maps ``masks`` ``(B, R, *S)`` (bool, or integers / floats in {0, 1}; ``S`` 2D or 3D) to a
float32 target ``(B, *S)`` in [0, 1] on the same device, batched, without modifying its input.
``ordinal`` is the exception: it returns the ORC vote count ``k`` as uint8 (SPEC §1).

Hard outputs (``median``, ``hard=True``) use a strict majority: a voxel is foreground when its soft value
is above 0.5, so that for an even number of raters a tie is background, as with ``m = R // 2 + 1``.

The strategies live in a registry: :func:`register` adds one (a function and a few facts about it), and
from then on it works in :func:`make_target`, ``orcal train --method``, ``orcal fuse --method``,
``orcal experiment`` and the report's tables::

    >>> import torch
    >>> from orcal import fusion
    >>> masks = torch.tensor([[[[1, 0]], [[1, 1]], [[0, 0]]]])     # (B, R, H, W): 3 raters, 1 x 2 pixels
    >>> fusion.make_target("soft", masks)
    tensor([[[0.6667, 0.3333]]])
    >>> _ = fusion.register("unanimous", lambda m: fusion.check_masks(m).all(1).float(), label="Unanimous")
    >>> fusion.make_target("unanimous", masks)
    tensor([[[0., 0.]]])
    >>> fusion.unregister("unanimous")
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

from orcal import losses as _losses
from orcal.fusion.simple import simple
from orcal.fusion.smoothing import PADDINGS, gaussian_kernel1d, soft_gaussian, svls, svls_kernel
from orcal.fusion.staple import staple
from orcal.fusion.voting import label_smoothing, median, ordinal, random_rater, soft
from orcal.heads import KINDS
from orcal.ops.masks import as_bool_masks

check_masks = as_bool_masks  # the strategies' mask rule (orcal.ops.masks), under its public name

__all__ = ["METHODS", "PADDINGS", "STRATEGIES", "Strategy", "check_masks", "default_names", "gaussian_kernel1d", "get",
           "groups", "label_smoothing", "make_target", "median", "names", "ordinal", "random_rater", "register",
           "simple", "soft", "soft_gaussian", "staple", "svls", "svls_kernel", "unregister"]


@dataclass(frozen=True)
class Strategy:
    """A registered strategy and what the tools need to know about it.

    Attributes:
        name: the key (``--method NAME``).
        fn: ``fn(masks, **options) -> target``.
        label: the row label in tables and figures.
        options: keyword options a user may set (``fusion_options`` in training, flags of ``orcal fuse``);
            options meant for another strategy are dropped when one options dict drives several methods.
        head: ``"binary"`` (one logit trained with BCE to a target in [0, 1]) or ``"ordinal"`` (``R + 1``
            levels trained with the ordinal loss to the vote count).
        needs_generator: the function takes ``generator=``; training passes one seeded per epoch and rank.
        uses_majority: the function takes ``majority=``; training passes the run's majority threshold.
        loss: for a binary head, the class of the loss trained to the target instead of BCE: ``loss(**options)``
            is a module ``(logit, target, valid=None) -> mean over valid voxels`` (``orcal.losses``).
        loss_options: keyword options of ``loss`` a user may set (``fusion_options`` in training).
        group: a name under which ``orcal experiment --methods`` selects the method with others; a method in a
            group runs only when asked for (the default methods are those without one).
        version: raised when the method's target or loss changes, so that results kept from an older version
            are not reused (it is part of an experiment run's fingerprint from 2 on).
    """

    name: str
    fn: Callable[..., torch.Tensor]
    label: str
    options: tuple[str, ...] = ()
    head: str = "binary"
    needs_generator: bool = False
    uses_majority: bool = False
    loss: Callable[..., Callable[..., torch.Tensor]] | None = None
    loss_options: tuple[str, ...] = ()
    group: str | None = None
    version: int = 1


_REGISTRY: dict[str, Strategy] = {}

#: The registered strategies, ``{name: Strategy}`` in registration order: a read-only, live view; change it
#: with :func:`register`.
STRATEGIES: Mapping[str, Strategy] = MappingProxyType(_REGISTRY)


def register(name: str, fn: Callable[..., torch.Tensor], *, label: str | None = None, options=(),
             head: str = "binary", needs_generator: bool = False, uses_majority: bool = False,
             loss: Callable[..., Callable[..., torch.Tensor]] | None = None, loss_options=(),
             group: str | None = None, version: int = 1, replace: bool = False) -> Strategy:
    """Add a strategy to the registry (see :class:`Strategy`) and return its entry."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a strategy name must be an identifier (it is a --method value), got {name!r}")
    if not callable(fn):
        raise TypeError(f"fn of strategy {name!r} must be callable, got {type(fn).__name__}")
    if head not in KINDS:
        raise ValueError(f"head of strategy {name!r} must be one of {KINDS}, got {head!r}")
    if loss is not None and (head != "binary" or not callable(loss)):
        raise ValueError(f"loss of strategy {name!r} must be callable and needs head='binary'")
    if name in _REGISTRY and not replace:
        raise ValueError(f"strategy {name!r} is already registered; pass replace=True to replace it")
    entry = Strategy(name, fn, label or name, tuple(options), head, needs_generator, uses_majority, loss,
                     tuple(loss_options), group, int(version))
    _REGISTRY[name] = entry
    return entry


def unregister(name: str) -> None:
    """Remove a strategy added with :func:`register`."""
    get(name)
    del _REGISTRY[name]


def names() -> tuple[str, ...]:
    """The registered strategies, in registration order (the built-ins in the paper's order first)."""
    return tuple(_REGISTRY)


def groups() -> dict[str, tuple[str, ...]]:
    """The method groups (:attr:`Strategy.group`): ``{group: names}`` in registration order."""
    out: dict[str, tuple[str, ...]] = {}
    for entry in _REGISTRY.values():
        if entry.group is not None:
            out[entry.group] = (*out.get(entry.group, ()), entry.name)
    return out


def default_names() -> tuple[str, ...]:
    """The methods an experiment runs when none are named: the registered ones outside any group."""
    return tuple(name for name, entry in _REGISTRY.items() if entry.group is None)


def get(name: str) -> Strategy:
    """The registry entry of ``name``; a clear error for anything else."""
    if not isinstance(name, str):
        raise TypeError(f"method must be a string, one of {', '.join(names())}; got {type(name).__name__}")
    entry = _REGISTRY.get(name)
    if entry is None:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(names())}")
    return entry


def make_target(method: str, masks: torch.Tensor, num_structures: int | None = None, **options) -> torch.Tensor:
    """The training target of strategy ``method`` (one of :func:`names`) for ``masks`` ``(B, R, *S)``.

    ``options`` go to the strategy's function (e.g. ``sigma`` for ``soft_gaussian`` and ``svls``,
    ``seed`` / ``generator`` for ``random``, ``alpha`` for ``simple``, ``confidence_weight`` for ``staple``).
    With ``num_structures = C`` (SPEC §11), ``masks`` are rater label maps (0..C) and the strategy runs on
    each structure's binary masks (``labels == c``, one-vs-rest), giving ``(B, C, *S)``: STAPLE, for one,
    is then run per label, which is not SimpleITK's ``MultiLabelSTAPLE`` (a single multi-class estimate).
    """
    if num_structures is not None:
        from orcal.ops.structures import check_labels

        C = check_labels(masks, num_structures, "masks")
        return torch.stack([make_target(method, masks == c, **options) for c in range(1, C + 1)], 1)
    fn = get(method).fn
    try:
        return fn(masks, **options)
    except TypeError as err:
        if "unexpected keyword argument" in str(err):
            raise TypeError(f"method {method!r} does not take that option: {err}") from None
        raise


def __getattr__(name: str):
    if name == "METHODS":  # the current registry (built-ins plus anything registered since)
        return names()
    raise AttributeError(f"module 'orcal.fusion' has no attribute {name!r}")


# The built-ins, in the paper's order (the order of the report's rows).
register("random", random_rater, label="Random Sampling", options=("seed",), needs_generator=True)
register("median", median, label="Median Consensus", options=("majority",), uses_majority=True)
register("soft", soft, label="Soft Consensus")
register("soft_gaussian", soft_gaussian, label="Soft Consensus-G", options=("sigma", "padding"))
register("simple", simple, label="SIMPLE", options=("alpha", "max_rounds", "hard", "majority"), uses_majority=True)
register("staple", staple, label="STAPLE", options=("confidence_weight", "max_iter", "tol", "hard"))
register("svls", svls, label="SVLS", options=("sigma",))
register("ordinal", ordinal, label="ORC", head="ordinal")
# Calibration losses of other work, each trained on the majority label its authors use (orcal.losses); run with
# `orcal experiment --methods calibration-losses`.
register("nacl", median, label="NACL", options=("majority",), uses_majority=True, loss=_losses.NACLBinaryLoss,
         loss_options=("nacl_alpha", "nacl_kernel_size", "nacl_kernel_ops", "nacl_distance", "nacl_sigma"),
         group="calibration-losses")
register("hl1_ace", median, label="hL1-ACE", options=("majority",), uses_majority=True,
         loss=_losses.HardL1ACELoss, loss_options=("ace_weight", "ace_bins", "ace_base"), group="calibration-losses",
         version=2)  # 2: added to DiceCE, as its authors add it (it was BCE)
register("label_smoothing", label_smoothing, label="Label Smoothing", options=("smoothing", "majority"),
         uses_majority=True, group="calibration-losses")
register("focal", median, label="Focal", options=("majority",), uses_majority=True, loss=_losses.BinaryFocalLoss,
         loss_options=("focal_gamma", "focal_alpha"), group="calibration-losses")
