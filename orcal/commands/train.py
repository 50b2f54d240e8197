"""Train a segmentation model with ordinal rater consensus or a baseline multi-rater strategy.

Examples:
  orcal train --dataset synthetic --method ordinal --arch unet-small --epochs 5 --out runs/orc
  orcal train --dataset lidc --root data/lidc --method soft --epochs 50 --out runs/lidc-soft
  orcal train --dataset synthetic --option shape=(32,32,32) --arch unet3d --patch-size 16 --out runs/3d
  torchrun --nproc_per_node=2 -m orcal train --dataset synthetic --out runs/ddp
  orcal train --out runs/orc --resume         # continue from runs/orc/last.pt
"""

from __future__ import annotations

import argparse

from orcal.commands._args import STRUCTURES_HELP, key_value, loader_options, patch_size, structures


def _none(text: str) -> str | None:
    return None if text.lower() in ("none", "") else text


def configure(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="synthetic", help="dataset name (default: synthetic)")
    data.add_argument("--root", default=None, help="dataset folder (not needed for synthetic)")
    data.add_argument("--task", default=None, help="structure / task where a dataset has several")
    data.add_argument("--option", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                      help="dataset option, repeatable (e.g. n=64, R=5, shape=(64,64), val_fraction=0.1)")
    data.add_argument("--structures", type=structures, default=None, help=STRUCTURES_HELP)
    data.add_argument("--val-fraction", type=float, default=None, help="fraction of training cases to validate on")
    data.add_argument("--no-val", action="store_true", help="no validation: keep the last epoch")
    method = parser.add_argument_group("method")
    from orcal import fusion

    method.add_argument("--method", default="ordinal", choices=fusion.names(),
                        help="training target, a registered strategy (default: ordinal)")
    method.add_argument("--rps-weight", type=float, default=1.0, help="weight of the RPS term (ordinal)")
    method.add_argument("--majority", type=int, default=None, help="majority threshold m (default R // 2 + 1)")
    method.add_argument("--sigma", type=float, default=None, help="Gaussian width for soft_gaussian / svls")
    model = parser.add_argument_group("model")
    model.add_argument("--arch", default="auto",
                       help="FPN, Unet, ... (segmentation_models_pytorch), unet-small, unet3d, monai:<Net>; "
                            "auto: FPN in 2D, unet3d in 3D")
    model.add_argument("--encoder", default="resnet18", help="encoder of 2D smp models (default resnet18)")
    model.add_argument("--encoder-weights", type=_none, default=None,
                       help="none (default) or imagenet (needs the weights downloaded or cached)")
    model.add_argument("--model-option", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                       help="argument of the network (repeatable), e.g. base_channels=16, or for monai:DynUNet "
                            "kernel_size=[3,3,3] strides=[1,2,2] upsample_kernel_size=[2,2]")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=10)
    opt.add_argument("--batch-size", type=int, default=8, help="per process")
    opt.add_argument("--lr", type=float, default=1e-3)
    opt.add_argument("--weight-decay", type=float, default=1e-4)
    opt.add_argument("--patch-size", type=patch_size, default=None,
                     help="training patch: 96 (a cube in 3D, a square in 2D) or 96,96,64 (default: whole images)")
    opt.add_argument("--patches-per-image", type=int, default=1)
    opt.add_argument("--max-steps", type=int, default=None, help="at most this many steps per epoch")
    opt.add_argument("--no-augment", action="store_true", help="no random flips")
    run = parser.add_argument_group("run")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--out", default="runs/train", help="checkpoint folder (default runs/train)")
    run.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1")
    run.add_argument("--amp", default="auto", choices=("auto", "bf16", "off"),
                     help="auto: bfloat16 autocast on CUDA, off on CPU")
    run.add_argument("--num-workers", type=int, default=0)
    run.add_argument("--threads", type=int, default=None,
                     help="CPU threads of this process (default: torch's; small networks often run faster on one)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import json
    import os

    import torch

    from orcal.train import TrainConfig, train

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    fusion = {"sigma": args.sigma} if args.sigma is not None else {}
    config = TrainConfig(
        dataset=args.dataset, root=args.root, task=args.task, dataset_options=loader_options(args),
        val_split=None if args.no_val else "val", val_fraction=args.val_fraction, method=args.method,
        rps_weight=args.rps_weight, majority=args.majority, fusion_options=fusion, arch=args.arch,
        encoder=args.encoder, encoder_weights=args.encoder_weights, model_options=dict(args.model_option),
        patch_size=args.patch_size,
        patches_per_image=args.patches_per_image, augment=not args.no_augment, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, max_steps_per_epoch=args.max_steps,
        seed=args.seed, out_dir=args.out, resume=args.resume, amp=args.amp, device=args.device,
        num_workers=args.num_workers)
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
