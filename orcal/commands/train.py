"""Train a segmentation model with ordinal rater consensus or a baseline multi-rater strategy.

Examples:
  orcal train --dataset synthetic --method ordinal --arch unet-small --epochs 5 --out runs/orc
  orcal train --dataset lidc --root data/lidc --method soft --epochs 50 --out runs/lidc-soft
  orcal train --dataset synthetic --option shape=32,32,32 --arch unet3d --patch-size 16 --out runs/3d
  torchrun --nproc_per_node=2 -m orcal train --dataset synthetic --out runs/ddp
  orcal train --out runs/orc --resume            # continue runs/orc/last.pt with the run's own options
  orcal train --out runs/orc --resume --epochs 8 # ... and extend it to 8 epochs

With --resume the options come from the checkpoint: give only --out (and what may change: --epochs to extend
the run, --device, --amp, --num-workers, --root, --threads, --quiet); an option that differs from the run's
own is an error naming it.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from orcal.commands._args import STRUCTURES_HELP, add_quiet, key_value, loader_options, patch_size, structures

#: Defaults of the options that are not TrainConfig fields of the same value (every default is None in the
#: parser, so that an option given on the command line can be told from one left out: see :func:`given`).
DEFAULTS: dict[str, Any] = {"out": "runs/train", "option": [], "model_option": [], "no_val": False,
                            "no_augment": False, "resume": False}


def _none(text: str) -> str | None:
    return None if text.lower() in ("none", "") else text


def configure(parser: argparse.ArgumentParser) -> None:
    from orcal.training.config import TrainConfig

    d = TrainConfig()
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", help=f"dataset name (default: {d.dataset})")
    data.add_argument("--root", help="dataset folder (not needed for synthetic)")
    data.add_argument("--task", help="structure / task where a dataset has several")
    data.add_argument("--option", action="append", type=key_value, metavar="KEY=VALUE",
                      help="dataset option, repeatable (e.g. n=64, R=5, shape=64,64, val_fraction=0.1)")
    data.add_argument("--structures", type=structures, help=STRUCTURES_HELP)
    data.add_argument("--val-fraction", type=float, help="fraction of training cases to validate on")
    data.add_argument("--no-val", action="store_true", default=None, help="no validation: keep the last epoch")
    method = parser.add_argument_group("method")
    from orcal import fusion

    method.add_argument("--method", choices=fusion.names(),
                        help=f"training target, a registered strategy (default: {d.method})")
    method.add_argument("--rps-weight", type=float, help=f"weight of the RPS term (ordinal; default {d.rps_weight})")
    method.add_argument("--majority", type=int, help="majority threshold m (default R // 2 + 1)")
    method.add_argument("--sigma", type=float, help="Gaussian width for soft_gaussian / svls")
    model = parser.add_argument_group("model")
    model.add_argument("--arch",
                       help="FPN, Unet, ... (segmentation_models_pytorch), unet-small, unet3d, monai:<Net>; "
                            "auto (default): FPN in 2D, unet3d in 3D")
    model.add_argument("--encoder", help=f"encoder of 2D smp models (default {d.encoder})")
    model.add_argument("--encoder-weights", type=_none,
                       help="none (default) or imagenet (needs the weights downloaded or cached)")
    model.add_argument("--model-option", action="append", type=key_value, metavar="KEY=VALUE",
                       help="argument of the network (repeatable), e.g. base_channels=16, or for monai:DynUNet "
                            "kernel_size=[3,3,3] strides=[1,2,2] upsample_kernel_size=[2,2]")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, help=f"default {d.epochs}; with --resume, more than the run's extends it")
    opt.add_argument("--batch-size", type=int, help=f"per process (default {d.batch_size})")
    opt.add_argument("--lr", type=float, help=f"default {d.lr:g}")
    opt.add_argument("--weight-decay", type=float, help=f"default {d.weight_decay:g}")
    opt.add_argument("--patch-size", type=patch_size,
                     help="training patch: 96 (a cube in 3D, a square in 2D) or 96,96,64 (default: whole images)")
    opt.add_argument("--patches-per-image", type=int, help=f"default {d.patches_per_image}")
    opt.add_argument("--max-steps", type=int, help="at most this many steps per epoch")
    opt.add_argument("--no-augment", action="store_true", default=None, help="no random flips")
    run = parser.add_argument_group("run")
    run.add_argument("--seed", type=int, help=f"default {d.seed}")
    run.add_argument("--out", help=f"checkpoint folder (default {DEFAULTS['out']})")
    run.add_argument("--resume", action="store_true", default=None,
                     help="continue from OUT/last.pt with the options stored in it")
    run.add_argument("--device", help="auto (default), cpu, cuda, cuda:1")
    run.add_argument("--amp", choices=("auto", "bf16", "off"), help="auto (default): bfloat16 autocast on CUDA, "
                                                                      "off on CPU")
    run.add_argument("--num-workers", type=int, help=f"default {d.num_workers}")
    run.add_argument("--threads", type=int,
                     help="CPU threads of this process (default: torch's; small networks often run faster on one)")
    add_quiet(run)


#: TrainConfig fields set by one command-line option each: field -> (option's dest, flag).
_FIELDS = {"dataset": ("dataset", "--dataset"), "root": ("root", "--root"), "task": ("task", "--task"),
           "val_fraction": ("val_fraction", "--val-fraction"), "method": ("method", "--method"),
           "rps_weight": ("rps_weight", "--rps-weight"), "majority": ("majority", "--majority"),
           "arch": ("arch", "--arch"), "encoder": ("encoder", "--encoder"),
           "encoder_weights": ("encoder_weights", "--encoder-weights"), "epochs": ("epochs", "--epochs"),
           "batch_size": ("batch_size", "--batch-size"), "lr": ("lr", "--lr"),
           "weight_decay": ("weight_decay", "--weight-decay"), "patch_size": ("patch_size", "--patch-size"),
           "patches_per_image": ("patches_per_image", "--patches-per-image"),
           "max_steps_per_epoch": ("max_steps", "--max-steps"), "seed": ("seed", "--seed"),
           "device": ("device", "--device"), "amp": ("amp", "--amp"), "num_workers": ("num_workers", "--num-workers")}


def given(args: argparse.Namespace) -> dict[str, tuple[Any, str]]:
    """The TrainConfig fields the command line sets explicitly: ``{field: (value, how it was given)}``.

    Dict-valued fields (``dataset_options``, ``model_options``, ``fusion_options``) hold only the keys given.
    """
    out: dict[str, tuple[Any, str]] = {}
    for name, (dest, flag) in _FIELDS.items():
        value = getattr(args, dest, None)
        if value is not None:
            out[name] = (value, flag)
    if args.option or args.structures is not None:
        out["dataset_options"] = (loader_options(args), "--option/--structures")
    if args.model_option:
        out["model_options"] = (dict(args.model_option), "--model-option")
    if args.sigma is not None:
        out["fusion_options"] = ({"sigma": args.sigma}, "--sigma")
    if args.no_val:
        out["val_split"] = (None, "--no-val")
    if args.no_augment:
        out["augment"] = (False, "--no-augment")
    return out


def _same(a: Any, b: Any) -> bool:
    """Equal as stored in a checkpoint (tuples and lists alike)."""
    from orcal.training.config import plain

    def norm(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: norm(v) for k, v in x.items()}
        if isinstance(x, tuple | list):
            return [norm(v) for v in x]
        return x

    return norm(plain(a)) == norm(plain(b))


def resumed_config(args: argparse.Namespace, last: Path):
    """The checkpoint's own TrainConfig, with what the command line may change; raises ``ValueError`` naming
    every option that differs from the run's."""
    from orcal.training.checkpoint import RESUME_MAY_CHANGE, load_checkpoint
    from orcal.training.config import TrainConfig

    ckpt = load_checkpoint(last, ("config", "epoch"))
    old = TrainConfig.from_dict(ckpt["config"])
    changes: dict[str, Any] = {}
    conflicts = []
    for name, (value, flag) in given(args).items():
        before = getattr(old, name)
        if isinstance(before, dict):  # only the keys given are compared and set
            value = {**before, **value}
            differs = [f"{k}={value[k]!r} (the run has {before[k]!r})" if k in before else f"{k}={value[k]!r} "
                       "(the run has none)" for k in value if k not in before or not _same(before[k], value[k])]
            text = f"{flag} " + ", ".join(differs)
        else:
            differs = [] if _same(before, value) else [value]
            text = f"{flag} {value!r} (the run has {before!r})"
        if differs and name not in RESUME_MAY_CHANGE:
            conflicts.append(text)
        changes[name] = value
    if conflicts:
        may = ", ".join("--" + n.replace("_", "-") for n in sorted(RESUME_MAY_CHANGE - {"resume", "out_dir",
                                                                                         "log_every"}))
        raise ValueError(f"cannot resume {last}: {'; '.join(conflicts)}. With --resume the run's own options are "
                         f"read from the checkpoint: leave these out (only {may} may change), or start a new run "
                         "with another --out")
    return dataclasses.replace(old, **changes, out_dir=str(args.out), resume=True)


def build_config(args: argparse.Namespace):
    """The run's TrainConfig: from the command line, or with ``--resume`` from ``OUT/last.pt``."""
    from orcal.training.checkpoint import LAST
    from orcal.training.config import TrainConfig

    for name, value in DEFAULTS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    last = Path(args.out) / LAST
    if args.resume and last.is_file():
        return resumed_config(args, last)
    fields = {name: value for name, (value, _) in given(args).items()}
    return TrainConfig(**fields, out_dir=args.out, resume=args.resume)


def run(args: argparse.Namespace) -> int:
    import json
    import os

    import torch

    from orcal.train import train

    config = build_config(args)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    result = train(config, progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        best = result.history[result.best_epoch - 1] if result.history else {}
        val = best.get("val_loss")
        scores = "" if val is None else f", val MR-ECE {best['val_mr_ece']:.4f}, val Dice {best['val_dice']:.4f}"
        print(f"best epoch {result.best_epoch}/{config.epochs}: val loss "
              f"{'-' if val is None else f'{val:.4f}'}{scores}, train loss {best.get('train_loss', float('nan')):.4f}")
        shown = "" if result.num_structures is None else f", {result.num_structures} structures"
        print(f"head {result.head}, {result.num_raters} raters{shown}; checkpoint {result.checkpoint_path}")
        summary = {"best_epoch": result.best_epoch, "best_val_loss": result.best_val_loss,
                   "checkpoint": result.checkpoint_path, "history": result.history}
        with open(os.path.join(args.out, "history.json"), "w") as f:
            json.dump(summary, f, indent=1)
    return 0
