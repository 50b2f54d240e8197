"""The op contract of orcal.ops._schema against the C++ sources it mirrors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from orcal.ops._schema import FAKES, MAX_AUC_BINS, MAX_ECE_BINS, MAX_RATERS, StatsLayout

CSRC = Path(__file__).resolve().parents[1] / "csrc"


@pytest.mark.parametrize("n_bins, auc_bins", [(15, 4096), (1, 2), (1024, 2**20), (7, 33)])
def test_stats_layout_matches_the_header(n_bins, auc_bins):
    text = (CSRC / "common" / "stats_layout.h").read_text()
    columns = dict(re.findall(r"int64_t (\w+)\(\) const \{ return ([^;]+); \}", text))
    assert set(columns) == {name for name in vars(StatsLayout) if not name.startswith("_")} - {"n_bins", "auc_bins"}
    layout = StatsLayout(n_bins, auc_bins)
    for name, expression in columns.items():
        assert eval(expression, {}, {"n_bins": n_bins, "auc_bins": auc_bins}) == getattr(layout, name)(), name


def test_bounds_match_the_cpp_checks():
    checks = (CSRC / "common" / "op_checks.h").read_text()
    assert f"n_bins <= {MAX_ECE_BINS}" in checks and "auc_bins <= (1 << 20)" in checks and MAX_AUC_BINS == 1 << 20
    assert f"size(1) <= {MAX_RATERS}" in checks


def test_every_op_of_the_schema_has_a_shape_function():
    schema = (CSRC / "orcal.cpp").read_text()
    assert set(re.findall(r'm\.def\("(\w+)\(', schema)) == set(FAKES)
