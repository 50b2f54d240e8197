"""Hostile inputs to the ops (SPEC §8), on every backend: infinite logits, logits without their axes, label
maps with the wrong values and empty batches of several structures.

As in tests/test_hardening.py, each case runs on the reference and the compiled CPU kernels here, and on the
Triton kernels in Triton's interpreter in a child process (``test_triton_cases``).
"""

from __future__ import annotations

import math

import pytest
import torch
from test_hardening import BACKENDS, run_triton_cases

import orcal
from orcal.ops import reference

INF, NAN = math.inf, math.nan


@pytest.fixture(params=BACKENDS)
def be(request):
    return request.param


def test_triton_cases():
    """The backend cases of this file on the Triton kernels, in Triton's interpreter (a child process)."""
    run_triton_cases(__file__)


# --- infinite logits: the expected readout gives the limit (SPEC §2) ----------------------------------------

EXPECTED_LIMITS = [  # (logits of R = 4, expected readout)
    ([INF, 0, 0, 0, 0], 0.0),              # level 0 certain
    ([0, 1, INF, -3, 0], 0.5),             # a level below the majority certain
    ([0, 0, 0, 0, INF], 1.0),              # the top level certain
    ([-INF, INF, -INF, 2, 0], 0.25),       # with -inf beside it
    ([-INF, -INF, 0, 0, -INF], 0.625),     # -inf levels only drop out
    ([INF, 0, 0, INF, 0], NAN),            # two certain levels: no limit
    ([INF, 0, NAN, 0, 0], NAN),            # NaN stays NaN
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_infinite_logits_expected_readout_is_the_limit(be, dtype):
    backend, dev = be
    z = torch.tensor([row for row, _ in EXPECTED_LIMITS], dtype=torch.float64).T  # (R + 1, cases)
    z = z.view(1, 5, 1, -1).repeat(2, 1, 3, 1).to(dtype).to(dev)
    want = torch.tensor([p for _, p in EXPECTED_LIMITS], dtype=torch.float64)
    for got in (orcal.foreground_probability(z, "expected", backend=backend),
                reference.foreground_probability(z, "expected")):
        got = got.double().cpu()
        assert got.shape == (2, 3, len(want))
        torch.testing.assert_close(got, want.expand_as(got), equal_nan=True, atol=1e-3, rtol=0)
    # the structure-major view of SPEC §11 reads the same
    two = torch.cat([z, z.flip(1)], 1)
    p = orcal.foreground_probability(two, "expected", backend=backend, num_structures=2).double().cpu()
    torch.testing.assert_close(p[:, 0], want.expand(2, 3, -1), equal_nan=True, atol=1e-3, rtol=0)


def test_infinite_logits_readouts_agree_where_both_have_a_limit(be):
    """One certain level: both readouts follow from it (the majority readout is 1 iff the level is >= m)."""
    backend, dev = be
    z = torch.zeros(1, 5, 1, 5)
    for level in range(5):
        z[0, level, 0, level] = INF
    z = z.to(dev)
    expected = orcal.foreground_probability(z, "expected", backend=backend).cpu().flatten()
    majority = orcal.foreground_probability(z, "majority", backend=backend).cpu().flatten()
    assert expected.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert majority.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]


# --- logits and label maps without their layout --------------------------------------------------------------

def _layout_cases(dev):
    k = torch.zeros(1, dtype=torch.uint8, device=dev)
    return [
        ("readout-0d", lambda b: orcal.foreground_probability(torch.tensor(1.0, device=dev), backend=b), "logits"),
        ("readout-1d", lambda b: orcal.foreground_probability(torch.zeros(4, device=dev), backend=b), "logits"),
        ("readout-structures-0d", lambda b: orcal.foreground_probability(torch.tensor(1.0, device=dev), backend=b,
                                                                          num_structures=2), "logits"),
        ("loss-0d", lambda b: orcal.ordinal_loss(torch.tensor(0.0, device=dev), k[0], backend=b), "logits"),
        ("loss-1d", lambda b: orcal.ordinal_loss(torch.zeros(4, device=dev), k, backend=b), "logits"),
        ("stats-ordinal-1d", lambda b: orcal.calibration_stats(torch.zeros(4, device=dev), k.expand(3), num_raters=3,
                                                               kind="ordinal", backend=b), "pred"),
        ("stats-structures-1d", lambda b: orcal.calibration_stats(
            torch.zeros(4, device=dev), torch.zeros(1, 3, 4, 4, dtype=torch.uint8, device=dev), num_structures=2,
            backend=b), "pred"),
        # label maps: the error names the argument the caller gave
        ("stats-labels-range", lambda b: orcal.calibration_stats(
            torch.rand(1, 2, 4, 4, device=dev), torch.full((1, 3, 4, 4), 5, dtype=torch.uint8, device=dev),
            num_structures=2, backend=b), "target must hold labels 0..C = 0..2"),
        ("orc-labels-range", lambda b: orcal.orc_targets(torch.full((1, 3, 4, 4), 5, dtype=torch.uint8, device=dev),
                                                         backend=b, num_classes=2), "masks must hold labels 0..C"),
        ("stats-num_structures-float", lambda b: orcal.calibration_stats(
            torch.rand(1, 2, 4, 4, device=dev), torch.zeros(1, 3, 4, 4, dtype=torch.uint8, device=dev),
            num_structures=2.0, backend=b), "num_structures"),
        ("readout-num_structures-str", lambda b: orcal.foreground_probability(
            torch.zeros(1, 8, 4, 4, device=dev), backend=b, num_structures="2"), "num_structures"),
    ]


@pytest.mark.parametrize("case", range(len(_layout_cases("cpu"))),
                         ids=[c[0] for c in _layout_cases("cpu")])
def test_layout_errors_name_the_argument(be, case):
    backend, dev = be
    _, call, words = _layout_cases(dev)[case]
    with pytest.raises((ValueError, TypeError), match=words):
        call(backend)


def test_empty_batches_of_several_structures(be):
    backend, dev = be
    logits = torch.zeros(0, 8, 4, 4, device=dev)
    k = torch.zeros(0, 2, 4, 4, dtype=torch.uint8, device=dev)
    labels = torch.zeros(0, 3, 4, 4, dtype=torch.uint8, device=dev)
    assert orcal.foreground_probability(logits, backend=backend, num_structures=2).shape == (0, 2, 4, 4)
    assert float(orcal.ordinal_loss(logits, k, backend=backend)) == 0
    assert orcal.orc_targets(labels, backend=backend, num_classes=2).shape == (0, 2, 4, 4)
    assert orcal.calibration_stats(torch.zeros(0, 2, 4, 4, device=dev), labels, num_structures=2,
                                   backend=backend).n_images == 0
    assert orcal.calibration_stats(logits, k, num_raters=3, kind="ordinal", backend=backend).n_images == 0
