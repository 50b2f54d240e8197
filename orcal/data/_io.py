"""File reading for the loaders: :mod:`orcal.io` (errors name the file; empty, oversized and truncated
files are refused)."""

from orcal.io import MAX_FILE_BYTES, read_array

__all__ = ["MAX_FILE_BYTES", "read_array"]
