"""Argument types shared by the sub-commands."""

from __future__ import annotations

import argparse
import ast


def key_value(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE read as a Python literal (``3``, ``1.5``, ``(64,64)``), else kept as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"options are KEY=VALUE, got {text!r}")
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value  # a plain string
    return key.strip(), parsed


def patch_size(text: str) -> int | tuple[int, ...] | None:
    """``64`` (a square or cube), ``64,64`` / ``96x96x96`` (one size per axis), or none (whole images)."""
    if text.lower() in ("none", "whole", ""):
        return None
    try:
        sizes = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"patch size must look like 64, 64,64 or 96x96x96, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"patch size must hold positive ints, got {text!r}")
    return sizes[0] if len(sizes) == 1 else sizes


def structures(text: str) -> str | list[int]:
    """``all`` or comma-separated labels (``1,3``): the ``structures`` loader option (SPEC §11)."""
    if text.strip().lower() == "all":
        return "all"
    try:
        labels = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"structures are 'all' or labels such as 1,2,3, got {text!r}") from None
    if not labels:
        raise argparse.ArgumentTypeError(f"structures are 'all' or labels such as 1,2,3, got {text!r}")
    return labels


STRUCTURES_HELP = ("several structures at once (SPEC §11): 'all' (CURVAS, LongCIU, REFUGE) or labels such as 1,3 "
                   "(CURVAS, LongCIU, folder); for synthetic data use --option num_structures=C")


QUIET_HELP = "no progress bars (they are drawn only when stderr is a terminal)"


def add_quiet(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *aliases: str) -> None:
    """``--quiet``, the one name every command gives to hiding its progress bars (``aliases``: older names)."""
    parser.add_argument("--quiet", *aliases, dest="quiet", action="store_true", help=QUIET_HELP)


def loader_options(args: argparse.Namespace) -> dict:
    """``--option KEY=VALUE`` pairs, with ``--structures`` as the loaders' ``structures`` option."""
    options = dict(getattr(args, "option", []) or [])
    if getattr(args, "structures", None) is not None:
        options["structures"] = args.structures
    return options
