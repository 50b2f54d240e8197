"""The half-tie readout ``P(k > R/2) + P(k = R/2) / 2`` (SPEC §2) on every backend, the heads that list it, and
the experiment rows that show it where ``R`` is even."""

from __future__ import annotations

import pytest
import torch
from backend_cases import _logits, run_triton_cases

import orcal
from orcal.heads import Head
from orcal.ops import reference


def test_triton_cases():
    """The backend cases of this file on the Triton kernels, in Triton's interpreter (a child process)."""
    run_triton_cases(__file__)


def _by_definition(z: torch.Tensor) -> torch.Tensor:
    q = torch.softmax(z.double(), dim=1)
    R = z.shape[1] - 1
    tie = 0.5 * q[:, R // 2] if R % 2 == 0 else 0.0
    return q[:, R // 2 + 1:].sum(1) + tie


@pytest.mark.parametrize("R", [1, 2, 3, 4, 7, 8])
def test_half_tie_readout_is_its_definition(be, R):
    backend, device = be
    z = _logits(2, R, (6, 5), seed=R, device=device)
    p = orcal.foreground_probability(z, "half_tie", backend=backend)
    assert p.dtype == z.dtype and p.shape == (2, 6, 5)
    torch.testing.assert_close(p.double().cpu(), _by_definition(z.cpu()), atol=1e-6, rtol=0)
    if R % 2:  # no tie exists: it is the majority readout
        assert torch.equal(p, orcal.foreground_probability(z, "majority", backend=backend))
    else:  # a tie of R/2 votes counts half: strictly between the two majority readouts where q_{R/2} > 0
        lo = orcal.foreground_probability(z, "majority", R // 2 + 1, backend=backend)
        hi = orcal.foreground_probability(z, "majority", R // 2, backend=backend)
        assert bool(((lo < p) & (p < hi)).all())


def test_half_tie_statistics_match_the_reference(be):
    backend, device = be
    R = 4
    z = _logits(3, R, (8, 7), seed=1, device=device)
    k = torch.randint(0, R + 1, (3, 8, 7), generator=torch.Generator().manual_seed(2)).to(device)
    got = orcal.calibration_stats(z, k, R, kind="ordinal", readout="half_tie", backend=backend)
    want = reference.calibration_stats(_by_definition(z.cpu()).float(), k.cpu(), R, 15, 4096)
    for name, value in got.as_dict().items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            torch.testing.assert_close(value.cpu().double(), want.as_dict()[name].double(), atol=1e-4, rtol=1e-5)
        elif isinstance(value, torch.Tensor):  # counts: a probability may sit on a bin edge, one bin apart at most
            assert (value.cpu() - want.as_dict()[name]).abs().sum() <= 2, name
    # the Dice counts keep the majority threshold m: a tie is background for them as for the majority readout
    dice_m = orcal.calibration_stats(z, k, R, kind="ordinal", readout="majority", backend=backend)
    assert torch.equal(got.tp + got.fn, dice_m.tp + dice_m.fn)


def test_half_tie_takes_no_majority():
    z = torch.randn(1, 5, 4, 4)
    with pytest.raises(ValueError, match="half_tie.*majority=2"):
        orcal.foreground_probability(z, "half_tie", majority=2)
    with pytest.raises(ValueError, match="readout must be one of"):
        orcal.foreground_probability(z, "half-tie")


def test_heads_list_the_half_tie_readout_where_a_tie_can_happen():
    assert Head("ordinal", num_raters=3).readouts == ("majority", "expected")
    assert Head("ordinal", num_raters=4).readouts == ("majority", "expected", "half_tie")
    assert "half_tie" in Head("ordinal").readouts  # R unknown: it may be even
    assert Head("ordinal", num_raters=4).op_majority("half_tie+ts", 2) is None
    assert Head("ordinal", num_raters=4).op_majority("majority", 2) == 2
    with pytest.raises(ValueError, match="readout must be one of"):
        Head("ordinal", num_raters=3).readout("half_tie")


def test_temperature_scaler_fits_the_half_tie_readout():
    from orcal.metrics import TemperatureScaler

    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 5, 16, 16, generator=g)
    masks = torch.rand(4, 4, 16, 16, generator=g) < torch.softmax(z, 1)[:, 2:].sum(1, keepdim=True)
    scaler = TemperatureScaler("ordinal", "half_tie")
    scaler.update(3 * z, masks)  # over-confident logits: T > 1
    assert scaler.fit() > 1


def test_readout_transform_half_tie():
    pytest.importorskip("monai")
    from orcal.integrations.monai import ORCReadoutd

    z = torch.randn(5, 6, 6)
    out = ORCReadoutd("pred", readout="half_tie")({"pred": z})["pred"]
    torch.testing.assert_close(out.double(), _by_definition(z[None]).float().double(), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="majority"):
        ORCReadoutd("pred", readout="half_tie", majority=3)


def test_experiment_rows_show_the_half_tie_readout_only_where_recorded():
    from orcal.experiment import DatasetSpec, ExperimentConfig, candidate_runs, select_rows

    cfg = ExperimentConfig(datasets=[DatasetSpec("synthetic")], methods=("ordinal",))
    cands = candidate_runs(cfg)

    def record(readouts):
        return {"readouts": {r: {"val": {"mr_ece": 0.1}} for r in readouts}}

    even = select_rows(cfg, cands, {"ordinal": record(("majority", "expected", "half_tie"))})
    odd = select_rows(cfg, cands, {"ordinal": record(("majority", "expected"))})
    assert "ordinal/half_tie" in even and "ordinal/half_tie" not in odd
    from orcal.experiment.tables import row_label
    assert row_label("ordinal/half_tie") == "ORC (half-tie)"
