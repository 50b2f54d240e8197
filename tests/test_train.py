"""The training driver: learning, every method, seeding, resume, atomic checkpoints, DDP, prediction, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from orcal.data import load_dataset
from orcal.fusion import METHODS
from orcal.train import TrainConfig, atomic_save, load_model, predict, train

REPO = Path(__file__).resolve().parents[1]
DATA = {"n": 12, "shape": (16, 16), "R": 3, "seed": 3}


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models run fastest single-threaded, and results do not depend on the thread count.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(**kw) -> TrainConfig:
    base = dict(dataset="synthetic", dataset_options=dict(DATA), arch="unet-small",
                model_options={"base_channels": 4, "depth": 2}, epochs=1, batch_size=4, lr=1e-2, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_loss_decreases_on_learnable_toy():
    # from a plain zero bias, so that the decrease measures learning from the image
    result = train(tiny(epochs=5, val_split=None, augment=False, prior_bias=False), progress=False)
    losses = [h["train_loss"] for h in result.history]
    assert len(losses) == 5 and losses[-1] < 0.8 * losses[0]
    assert result.best_epoch == 5 and result.best_val_loss is None
    assert not result.model.training


@pytest.mark.parametrize("head", ["ordinal", "binary"])
def test_prior_bias_starts_at_the_label_frequencies(head):
    from orcal.data import load_dataset
    from orcal.training.data import label_prior as _label_prior

    ds = load_dataset("synthetic", None, **DATA)
    bias = _label_prior(ds, head, num_raters=3)
    k = torch.cat([ds[i]["masks"].long().sum(0).reshape(-1) for i in range(len(ds))])
    freq = torch.bincount(k, minlength=4).double() / k.numel()
    if head == "ordinal":
        torch.testing.assert_close(torch.softmax(bias.double(), 0), freq, atol=0.01, rtol=0)
    else:
        assert torch.sigmoid(bias.double()).item() == pytest.approx(float(k.double().mean() / 3), abs=0.01)
    from orcal.models import build_model, init_output_bias

    model = build_model("unet-small", head=head, num_raters=3, base_channels=4, depth=2)
    init_output_bias(model, bias)
    out = model(torch.zeros(1, 1, 8, 8))  # zero input: the output is the bias plus what the body adds
    assert [m.bias for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1].tolist() == bias.tolist()
    assert out.shape[1] == bias.numel()


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_one_step(method):
    if method == "nacl":
        pytest.importorskip("monai")  # NACL is MONAI's loss (orcal[monai])
    cfg = tiny(method=method, max_steps_per_epoch=1, fusion_options={"sigma": 1.0})
    result = train(cfg, progress=False)
    assert result.head == ("ordinal" if method == "ordinal" else "binary")
    out = result.model(torch.zeros(1, 1, 16, 16))
    assert out.shape == (1, 4 if method == "ordinal" else 1, 16, 16)
    h = result.history[0]
    assert torch.isfinite(torch.tensor(h["train_loss"])) and torch.isfinite(torch.tensor(h["val_loss"]))


def test_seeded_training_is_reproducible():
    a = weights(train(tiny(max_steps_per_epoch=2, epochs=2, method="random"), progress=False).model)
    b = weights(train(tiny(max_steps_per_epoch=2, epochs=2, method="random"), progress=False).model)
    c = weights(train(tiny(max_steps_per_epoch=2, epochs=2, method="random", seed=1), progress=False).model)
    assert same(a, b)
    assert not same(a, c)


class Killed(Exception):
    pass


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    cfg = dict(epochs=4, max_steps_per_epoch=2, batch_size=2)
    full = train(tiny(out_dir=str(tmp_path / "full"), **cfg), progress=False)

    def kill(epoch, step, loss):
        if epoch == 2 and step == 1:  # mid-epoch 3, after the checkpoint of epoch 2
            raise Killed

    with pytest.raises(Killed):
        train(tiny(out_dir=str(tmp_path / "cut"), **cfg), progress=False, callback=kill)
    last = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert last["epoch"] == 2

    seen = []
    resumed = train(tiny(out_dir=str(tmp_path / "cut"), resume=True, **cfg), progress=False,
                    callback=lambda e, s, loss: seen.append(e))
    assert sorted(set(seen)) == [2, 3]  # continued at epoch 3 (0-based 2), nothing before
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in full.history]
    assert resumed.best_epoch == full.best_epoch
    assert same(weights(resumed.model), weights(full.model))
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["model"]
    assert same(a, b)


def test_resume_refuses_a_different_model(tmp_path):
    train(tiny(out_dir=str(tmp_path), max_steps_per_epoch=1), progress=False)
    with pytest.raises(ValueError, match="cannot resume"):
        train(tiny(out_dir=str(tmp_path), max_steps_per_epoch=1, resume=True, epochs=2, method="soft"),
              progress=False)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    atomic_save({"x": torch.ones(3)}, path)

    def broken(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"x": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temporary file left


def test_checkpoints_and_load_model(tmp_path):
    result = train(tiny(out_dir=str(tmp_path), epochs=2, max_steps_per_epoch=1), progress=False)
    assert result.checkpoint_path == str(tmp_path / "best.pt")
    assert {p.name for p in tmp_path.iterdir()} == {"best.pt", "last.pt"}
    model, config = load_model(result.checkpoint_path)
    assert config == result.config
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), result.model(x))
    assert model.orcal_spec["head"] == "ordinal" and model.orcal_spec["num_raters"] == 3
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        load_model(tmp_path / "bad.pt")


def test_predict_2d_whole_images_and_readouts():
    result = train(tiny(max_steps_per_epoch=1), progress=False)
    ds = load_dataset("synthetic", split="test", **DATA)
    out = list(predict(result, ds))
    assert [o[0] for o in out] == ds.ids
    for _, p, masks, valid in out:
        assert p.shape == (16, 16) and p.dtype == torch.float32 and masks.shape == (3, 16, 16) and valid is None
        assert 0 <= float(p.min()) and float(p.max()) <= 1
    expected = list(predict(result.model, ds, readout="expected"))
    assert not torch.equal(out[0][1], expected[0][1])


def test_3d_patches_and_sliding_window_prediction():
    data = {"n": 6, "shape": (12, 12, 12), "R": 2, "seed": 1}
    cfg = tiny(dataset_options=data, arch="unet3d", model_options={"base_channels": 4, "depth": 1},
               patch_size=8, batch_size=2, max_steps_per_epoch=1)
    result = train(cfg, progress=False)
    assert result.spatial_dims == 3 and torch.isfinite(torch.tensor(result.history[0]["val_loss"]))
    ds = load_dataset("synthetic", split="test", **data)
    seen = []
    orig_forward = result.model.forward
    result.model.forward = lambda x: (seen.append(tuple(x.shape[2:])), orig_forward(x))[1]
    out = list(predict(result, ds, batch_size=4))
    assert set(seen) == {(8, 8, 8)}  # tiles, not whole volumes
    for _, p, masks, _ in out:
        assert p.shape == (12, 12, 12) and masks.shape == (2, 12, 12, 12)
        assert torch.isfinite(p).all() and 0 <= float(p.min()) and float(p.max()) <= 1


def test_bf16_autocast_on_cpu():
    result = train(tiny(max_steps_per_epoch=1, amp="bf16"), progress=False)
    assert torch.isfinite(torch.tensor(result.history[0]["train_loss"]))


def test_collate_pads_different_sizes_and_refuses_mixed_raters():
    from orcal.train import collate

    a = {"image": torch.ones(1, 4, 6), "masks": torch.ones(2, 4, 6, dtype=torch.uint8), "id": "a"}
    b = {"image": torch.ones(1, 6, 5), "masks": torch.ones(2, 6, 5, dtype=torch.uint8), "id": "b"}
    batch = collate([a, b])
    assert batch["image"].shape == (2, 1, 6, 6) and batch["masks"].shape == (2, 2, 6, 6)
    assert batch["id"] == ["a", "b"]
    assert int(batch["valid"][0].sum()) == 24 and int(batch["valid"][1].sum()) == 30
    assert int(batch["masks"][0, 0].sum()) == 24  # padding is background and invalid
    c = {"image": torch.ones(1, 4, 6), "masks": torch.ones(3, 4, 6, dtype=torch.uint8), "id": "c"}
    with pytest.raises(ValueError, match="raters"):
        collate([a, c])


def test_fusion_options_reach_the_strategy_that_takes_them():
    from orcal.training.objective import Objective as _Objective

    opts = {"sigma": 2.0, "alpha": 0.5}
    assert _Objective(tiny(method="svls", fusion_options=opts)).options == {"sigma": 2.0}
    assert _Objective(tiny(method="simple", fusion_options=opts, majority=1)).options == {"alpha": 0.5,
                                                                                          "majority": 1}
    assert _Objective(tiny(method="soft", fusion_options=opts)).options == {}


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="method"):
        train(tiny(method="mean"), progress=False)
    with pytest.raises(ValueError, match="epochs"):
        train(tiny(epochs=0), progress=False)
    with pytest.raises(ValueError, match="resume"):
        train(tiny(resume=True), progress=False)
    with pytest.raises(ValueError, match="fusion_options"):
        train(tiny(fusion_options={"sigmaa": 1.0}), progress=False)
    with pytest.raises(TypeError, match="config"):
        train({"epochs": 1})


DDP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    import orcal.train as T
    import orcal.training.loop as loop

    torch.set_num_threads(1)
    calls = []
    real_save = loop.atomic_save
    loop.atomic_save = lambda obj, path: (calls.append(str(path)), real_save(obj, path))
    out = sys.argv[2]
    result = T.train(T.TrainConfig(**json.loads(sys.argv[1])), progress=False,
                     callback=lambda e, s, loss: calls.append(f"step {e} {s}"))
    rank = int(os.environ["RANK"])
    torch.save(result.model.state_dict(), os.path.join(out, f"weights{rank}.pt"))
    with open(os.path.join(out, f"calls{rank}.json"), "w") as f:
        json.dump({"calls": calls, "world": int(os.environ["WORLD_SIZE"]), "history": result.history}, f)
""")


def test_distributed_two_processes_gloo(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    cfg = dict(dataset_options=DATA, arch="unet-small", model_options={"base_channels": 4, "depth": 2},
               epochs=2, batch_size=2, lr=1e-2, max_steps_per_epoch=2, out_dir=str(tmp_path / "run"),
               device="cpu")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), json.dumps(cfg), str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    w0 = torch.load(tmp_path / "weights0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "weights1.pt", weights_only=True)
    assert same(w0, w1)
    c0 = json.loads((tmp_path / "calls0.json").read_text())
    c1 = json.loads((tmp_path / "calls1.json").read_text())
    assert c0["world"] == c1["world"] == 2
    saves0 = [c for c in c0["calls"] if c.endswith(".pt")]
    assert saves0 and all(c.startswith(str(tmp_path / "run")) for c in saves0)
    assert [c for c in c1["calls"] if c.endswith(".pt")] == []  # only rank 0 writes
    assert sum(c.startswith("step") for c in c1["calls"]) == 4  # rank 1 trained its shard
    drop = [{k: v for k, v in h.items() if k != "seconds"} for h in c0["history"]], \
        [{k: v for k, v in h.items() if k != "seconds"} for h in c1["history"]]
    assert drop[0] == drop[1]  # losses are all-reduced: every rank reports the same
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert same(ckpt["model"], w0) or ckpt["best_epoch"] != 2


def test_cli_train(tmp_path, capsys):
    from orcal.cli import main

    out = tmp_path / "cli"
    code = main(["train", "--option", "n=8", "--option", "shape=(16,16)", "--option", "R=3", "--arch", "unet-small",
                 "--epochs", "1", "--batch-size", "4", "--max-steps", "1", "--out", str(out), "--quiet",
                 "--method", "soft_gaussian", "--sigma", "1.5"])
    assert code == 0
    text = capsys.readouterr().out
    assert "best epoch 1/1" in text and str(out / "best.pt") in text
    summary = json.loads((out / "history.json").read_text())
    assert summary["best_epoch"] == 1
    assert load_model(out / "best.pt")[1].fusion_options == {"sigma": 1.5}
    assert "val MR-ECE" in text and "val Dice" in text
    # network arguments and the thread count from the command line
    before = torch.get_num_threads()
    assert main(["train", "--option", "n=8", "--option", "shape=(16,16)", "--option", "R=3", "--arch", "unet-small",
                 "--model-option", "base_channels=4", "--model-option", "depth=2", "--threads", "1", "--epochs", "1",
                 "--max-steps", "1", "--out", str(tmp_path / "opts"), "--quiet"]) == 0
    torch.set_num_threads(before)
    assert load_model(tmp_path / "opts" / "best.pt")[1].model_options == {"base_channels": 4, "depth": 2}


def test_validation_reports_mr_ece_and_dice():
    from orcal.metrics import MultiRaterCalibration
    from orcal.training.predict import predict_logits

    result = train(tiny(epochs=1), progress=False)  # one epoch: the kept model is the one validated
    last = result.history[-1]
    val = load_dataset("synthetic", split="val", **DATA)
    calib = MultiRaterCalibration(kind="ordinal", readout="expected", agreement=False)
    seg = MultiRaterCalibration(kind="ordinal", readout="majority", agreement=False)
    for _, logits, masks, valid in predict_logits(result, val, device="cpu", batch_size=4, amp="off"):
        calib.update(logits, masks, valid=valid)
        seg.update(logits, masks, valid=valid)
    assert last["val_mr_ece"] == pytest.approx(calib.compute()["mr_ece"], rel=1e-5, abs=1e-7)
    assert last["val_dice"] == pytest.approx(seg.compute()["dice"], rel=1e-5, abs=1e-7)
    assert last["val_mr_ece"] > 0


def test_cli_resume_reads_the_options_from_the_checkpoint(tmp_path, capsys):
    """``orcal train --out OUT --resume`` needs no other option: the run's own come from OUT/last.pt."""
    from orcal.cli import main

    out = tmp_path / "run"
    first = ["--option", "n=8", "--option", "shape=16,16", "--option", "R=3", "--arch", "unet-small",
             "--model-option", "base_channels=4", "--model-option", "depth=1", "--batch-size", "4", "--lr", "0.005",
             "--max-steps", "1", "--method", "soft_gaussian", "--sigma", "1.5", "--out", str(out), "--quiet"]
    assert main(["train", "--epochs", "1", *first]) == 0
    config = torch.load(out / "last.pt", weights_only=True)["config"]
    assert config["dataset_options"]["shape"] == (16, 16)  # shape=16,16 reads as a tuple
    assert main(["train", "--out", str(out), "--epochs", "2", "--resume", "--quiet"]) == 0
    resumed = torch.load(out / "last.pt", weights_only=True)
    assert resumed["epoch"] == 2 and resumed["config"] == {**config, "epochs": 2, "resume": True}
    # the same options repeated are fine; a different one is an error naming the option and both values
    assert main(["train", *first, "--epochs", "3", "--resume"]) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--epochs", "4", "--resume", "--lr", "0.01", "--sigma", "2",
                 "--option", "n=8", "--option", "R=4", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--lr 0.01 (the run has 0.005)" in err and "--sigma sigma=2.0 (the run has 1.5)" in err
    assert "R=4 (the run has 3)" in err and "n=8" not in err
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 3  # nothing trained


def test_resume_refuses_fewer_epochs_than_planned_even_quietly(tmp_path, capsys):
    """A run planned for 6 epochs, killed after 2, resumed with --epochs 3: refused, naming 6 and 3."""
    from orcal.cli import main

    out = tmp_path / "run"
    args = ["--option", "n=8", "--option", "shape=16,16", "--option", "R=3", "--arch", "unet-small",
            "--model-option", "base_channels=4", "--model-option", "depth=1", "--max-steps", "1", "--out", str(out)]

    def kill(epoch, step, loss):
        if epoch == 2:
            raise Killed

    with pytest.raises(Killed):
        train(TrainConfig(dataset_options={"n": 8, "shape": (16, 16), "R": 3}, arch="unet-small",
                          model_options={"base_channels": 4, "depth": 1}, max_steps_per_epoch=1, epochs=6,
                          out_dir=str(out)), progress=False, callback=kill)
    assert main(["train", *args, "--epochs", "3", "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "epochs=3" in err and "planned for 6 epochs (2 done)" in err
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 2
    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 0  # finishes the run as planned
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 6


def test_train_help_examples_are_valid_shell():
    """Every example line of ``orcal train --help`` parses in a POSIX shell and with the command's parser."""
    import shlex

    from orcal.cli import build_parser
    from orcal.commands import train as command

    parser = build_parser()
    for line in command.__doc__.splitlines():
        line = line.split("#")[0].strip()
        if not line.startswith("orcal train"):
            continue
        assert subprocess.run(["sh", "-n", "-c", line]).returncode == 0, line
        parser.parse_args(shlex.split(line)[1:])
    help_text = subprocess.run([sys.executable, "-m", "orcal", "train", "--help"], capture_output=True, text=True,
                               cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO))).stdout
    assert "shape=32,32,32" in help_text and "=(" not in help_text


@pytest.mark.slow
def test_cli_under_torchrun_then_resume_on_one_process(tmp_path):
    out = tmp_path / "ddp"
    args = ["--option", "n=12", "--option", "shape=(16,16)", "--option", "R=3", "--arch", "unet-small",
            "--batch-size", "2", "--out", str(out), "--device", "cpu", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "orcal", "train", "--epochs", "2", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("best epoch") == 1  # one summary, from rank 0
    proc = subprocess.run([sys.executable, "-m", "orcal", "train", "--epochs", "3", "--resume", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dims", [2, 3])
def test_cuda_bf16_training_and_prediction(dims):
    if dims == 2:
        data, extra = DATA, {}
    else:
        data = {"n": 6, "shape": (12, 12, 12), "R": 2, "seed": 1}
        extra = {"arch": "unet3d", "model_options": {"base_channels": 4, "depth": 1}, "patch_size": 8}
    result = train(tiny(device="cuda", dataset_options=data, max_steps_per_epoch=2, **extra), progress=False)
    assert next(result.model.parameters()).is_cuda
    assert torch.isfinite(torch.tensor(result.history[0]["val_loss"]))
    ds = load_dataset("synthetic", split="test", **data)
    for _, p, masks, _ in predict(result, ds):
        assert p.device.type == "cpu" and p.dtype == torch.float32 and p.shape == masks.shape[1:]
        assert 0 <= float(p.min()) and float(p.max()) <= 1
