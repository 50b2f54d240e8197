"""The examples in the docstrings run (the cheap ones: each takes a few seconds at most)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["orcal.heads", "orcal.fusion", "orcal.metrics.registry", "orcal.data", "orcal.train", "orcal.experiment",
           "orcal.metrics.calibrate", "orcal.metrics.comparison", "orcal.metrics.conformal",
           "orcal.metrics.conformal_sets"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0, f"{result.failed} of {result.attempted} examples failed"
