"""Progress bars that appear only where someone watches them.

A bar redraws itself many times a second; written to a file or a pipe (``orcal demo 2> log``, CI logs) its frames
pile up as hundreds of kilobytes of carriage returns. Bars are therefore drawn only when ``stderr`` is a terminal
(or in a Jupyter kernel), as tqdm's ``disable=None`` does, and never under ``--quiet``.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["progress_bar", "show_progress"]


def show_progress(enabled: bool = True) -> bool:
    """Whether to draw progress bars: ``enabled`` and ``stderr`` is a terminal or a notebook shows it."""
    if not enabled:
        return False
    if "ipykernel" in sys.modules:  # a notebook's stderr is no TTY, yet shows tqdm's widget
        return True
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):  # a closed or detached stream
        return False


def progress_bar(iterable: Any = None, *, enabled: bool = True, **kwargs: Any) -> Any:
    """``tqdm.auto.tqdm(iterable, **kwargs)``, disabled unless :func:`show_progress` says to draw it."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not show_progress(enabled), **kwargs)
