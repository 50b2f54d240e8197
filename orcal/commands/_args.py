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
