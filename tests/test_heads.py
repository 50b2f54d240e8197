"""orcal.heads: one owner of a head's readouts, channels and row keys."""

from __future__ import annotations

import json

import pytest
import torch

from orcal.heads import EXPECTED_K, SIGMOID, Head, parse_row, scaled, unscaled


def test_readouts_channels_and_maps():
    ordinal, binary = Head("ordinal", num_raters=3, num_structures=2), Head("binary", num_structures=2)
    assert ordinal.readouts == ("majority", "expected") and ordinal.maps == ("majority", "expected", EXPECTED_K)
    assert binary.readouts == binary.maps == (SIGMOID,)  # a binary head's sigmoid is not a majority readout
    assert (ordinal.channels, binary.channels) == (8, 2)
    assert (ordinal.metric_kind, binary.metric_kind) == ("ordinal", "logit")
    with pytest.raises(ValueError, match="num_raters"):
        _ = Head("ordinal").channels
    with pytest.raises(ValueError, match="head must be one of"):
        Head("soft")
    with pytest.raises(ValueError, match="num_structures"):
        Head("binary", num_structures=0)


@pytest.mark.parametrize("kind, method, readout, row", [
    ("ordinal", "ordinal", "expected", "ordinal/expected"),
    ("ordinal", "ordinal", "majority+ts", "ordinal/majority+ts"),
    ("binary", "soft", "sigmoid", "soft"),
    ("binary", "soft", "sigmoid+ts", "soft+ts"),
])
def test_rows_are_written_and_read_in_one_place(kind, method, readout, row):
    head = Head(kind)
    assert head.row(method, readout) == row
    parsed = parse_row(row)
    assert parsed.method == method and parsed.scaled == unscaled(readout)[1]
    assert parsed.readout == (unscaled(readout)[0] if len(head.readouts) > 1 else None)


def test_old_binary_readout_name_is_read_and_unknown_names_are_refused():
    binary = Head("binary")
    assert binary.readout("majority") == SIGMOID and binary.readout(scaled("majority")) == scaled(SIGMOID)
    assert binary.op_readout("sigmoid") == "majority"  # the ops' argument, ignored for a binary logit
    with pytest.raises(ValueError, match="readout must be one of"):
        binary.readout("expected")
    with pytest.raises(ValueError, match="readout must be one of"):
        Head("ordinal").readout("sigmoid")


def test_run_records_from_before_the_rename_are_reused(tmp_path):
    """A binary run recorded with its readout under "majority" reads back under "sigmoid" (record, statistics,
    qualitative map), so a finished experiment is not rerun."""
    import numpy as np

    from orcal.experiment.config import Run
    from orcal.experiment.runs import load_case_maps, load_run, load_run_stats, run_files
    from orcal.ops.stats import CalibrationStats

    run = Run("soft", 1.0, "soft")
    files = run_files(tmp_path, run)
    files["json"].write_text(json.dumps({"fingerprint": "f", "readouts": {"majority": {"n_images": 1},
                                                                          "majority+ts": {"n_images": 1}}}))
    torch.save({"majority": CalibrationStats.empty(4, 8).as_dict()}, files["stats"])
    np.savez(files["case"], majority=np.zeros((2, 2), np.float32))
    assert sorted(load_run(tmp_path, run, "f")["readouts"]) == ["sigmoid", "sigmoid+ts"]
    assert list(load_run_stats(tmp_path, run)) == ["sigmoid"]
    assert list(load_case_maps(tmp_path, run)) == ["sigmoid"]
