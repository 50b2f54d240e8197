"""Careless use of training (SPEC §8): resuming with changed settings or from damaged checkpoints, an output
path that is a file, leftover temporaries, patch sizes, and loss modules given rater stacks and padding. Each is
an error that names the setting or the file, or the right answer."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from backend_cases import _logits

import orcal


def _tiny_run(out: Path, **kw):
    from orcal.train import TrainConfig, train

    base = dict(dataset="synthetic", dataset_options={"n": 8, "shape": (16, 16), "R": 3, "seed": 3},
                arch="unet-small", model_options={"base_channels": 4, "depth": 1}, epochs=2, batch_size=4,
                lr=1e-3, max_steps_per_epoch=1, out_dir=str(out))
    base.update(kw)
    return train(TrainConfig(**base), progress=False)


def test_extending_a_finished_run_keeps_learning(tmp_path):
    out = tmp_path / "a"
    assert [h["lr"] for h in _tiny_run(out).history] == pytest.approx([1e-3, 5e-4])
    lrs = [h["lr"] for h in _tiny_run(out, epochs=4, resume=True).history]
    assert lrs[:2] == pytest.approx([1e-3, 5e-4])
    assert lrs[2:] == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in (2, 3)])
    assert min(lrs) > 0


@pytest.mark.parametrize("change", [{"lr": 2e-3}, {"rps_weight": 0.5}, {"majority": 1},
                                    {"fusion_options": {"sigma": 2.0}},
                                    {"dataset_options": {"n": 9, "shape": (16, 16), "R": 3, "seed": 3}},
                                    {"patch_size": 8}, {"weight_decay": 0.0}])
def test_resume_refuses_changed_settings(tmp_path, change):
    out = tmp_path / "a"
    _tiny_run(out, epochs=1)
    key = next(iter(change))
    with pytest.raises(ValueError, match=f"cannot resume .*last.pt.*{key}="):
        _tiny_run(out, resume=True, **change)


def test_resume_with_only_best_pt_refuses_to_overwrite_it(tmp_path):
    out = tmp_path / "a"
    _tiny_run(out, epochs=1)
    (out / "last.pt").unlink()
    before = (out / "best.pt").read_bytes()
    with pytest.raises(ValueError, match="best.pt .* but no last.pt"):
        _tiny_run(out, resume=True)
    assert (out / "best.pt").read_bytes() == before


def test_incomplete_checkpoints_name_the_file(tmp_path):
    from orcal.train import atomic_save, load_model

    out = tmp_path / "a"
    _tiny_run(out, epochs=1)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    del ckpt["rng"]
    atomic_save(ckpt, out / "last.pt")
    with pytest.raises(ValueError, match="last.pt is incomplete: it lacks rng"):
        _tiny_run(out, resume=True)
    best = torch.load(out / "best.pt", weights_only=True)
    name = next(iter(best["model"]))
    best["model"][name] = torch.zeros(1)
    atomic_save(best, out / "broken.pt")
    with pytest.raises(ValueError, match="broken.pt does not fit its own model"):
        load_model(out / "broken.pt")
    del best["model_spec"]["arch"]
    atomic_save(best, out / "nospec.pt")
    with pytest.raises(ValueError, match="nospec.pt is incomplete"):
        load_model(out / "nospec.pt")


def test_out_naming_a_file_and_leftover_temporaries(tmp_path, capsys):
    from orcal.cli import main

    path = tmp_path / "file"
    path.write_text("not a folder")
    assert main(["train", "--out", str(path), "--epochs", "1", "--quiet"]) == 2
    assert "is an existing file" in capsys.readouterr().err
    out = tmp_path / "a"
    out.mkdir()
    stale = out / ".last.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    _tiny_run(out, epochs=1)
    assert not stale.exists() and (out / "last.pt").is_file()


def test_a_single_patch_size_means_a_cube():
    from orcal.commands._args import patch_size as _patch_size
    from orcal.models import as_tuple

    assert _patch_size("16") == 16 and _patch_size("16,8") == (16, 8) and _patch_size("none") is None
    assert as_tuple(16, 3) == (16, 16, 16) and as_tuple((16,), 3) == (16, 16, 16) and as_tuple((4, 5), 2) == (4, 5)
    with pytest.raises(ValueError, match="patch_size"):
        as_tuple((4, 5), 3)


def test_loss_modules_take_rater_stacks_and_padding():
    from orcal.losses import OrdinalLoss, SoftBCELoss

    masks = (torch.rand(2, 3, 4, 5, generator=torch.Generator().manual_seed(4)) < 0.5)
    z = _logits(2, 3, (4, 5))
    k = orcal.orc_targets(masks)
    torch.testing.assert_close(OrdinalLoss(from_masks=True)(z, masks.float()), OrdinalLoss()(z, k[:, None].float()))
    logit = torch.randn(2, 1, 4, 5)
    soft = masks.float().mean(1)
    torch.testing.assert_close(SoftBCELoss(from_masks=True)(logit, masks.float()), SoftBCELoss()(logit, soft))
    torch.testing.assert_close(SoftBCELoss()(logit, soft[:, None]), SoftBCELoss()(logit, soft))
    padded = soft.clone()
    padded[:, 0] = -1
    torch.testing.assert_close(SoftBCELoss(ignore_index=-1)(logit, padded), SoftBCELoss()(logit, soft, padded != -1))
    with pytest.raises(ValueError, match="binary"):
        OrdinalLoss(from_masks=True)(z, masks.float() * 2)
    assert "from_masks=True" in repr(OrdinalLoss(from_masks=True, ignore_index=-1))
