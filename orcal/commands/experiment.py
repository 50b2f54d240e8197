"""Train every multi-annotation strategy and the ordinal method, evaluate, and write tables and a report.

Examples:
  orcal experiment --preset lidc --out lidc-results
  orcal experiment --dataset refuge:cup --root /data/REFUGE --epochs 50 --out refuge-cup
  orcal experiment --dataset synthetic --option n=64 --methods soft,ordinal --rps-weights 0,0.5,1,2
  orcal experiment --preset lidc --root LIDC-IDRI-slices --seeds 0,1,2 --select-on-val --out lidc-results

Each finished run is kept under OUT/runs/, so an interrupted experiment resumes where it stopped
(--force recomputes everything). --conformal ALPHA adds each row's conformal guarantees (SPEC §12), calibrated
on the validation split; finished runs recorded without them at that ALPHA are evaluated again from their kept
weights (trained again where those are gone).
"""

from __future__ import annotations

import argparse
import shlex
import sys

from orcal.commands._args import STRUCTURES_HELP, add_quiet, key_value, loader_options, patch_size, structures


def _int_or_none(text: str) -> int | None:
    return None if text.lower() in ("none", "0", "all") else int(text)


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _methods(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``experiment`` and ``demo`` (defaults None: the preset decides)."""
    g = parser.add_argument_group("training")
    g.add_argument("--methods", type=_methods, default=None,
                   help="comma-separated subset of: random, median, soft, soft_gaussian, staple, simple, svls, "
                        "ordinal (the default), and nacl, hl1_ace, label_smoothing, focal (the group "
                        "calibration-losses); a group name stands for its methods")
    g.add_argument("--epochs", type=int, default=None, help="training epochs per method")
    g.add_argument("--arch", default=None, help="network: fpn, unet, unet-small, ... (see orcal train --help)")
    g.add_argument("--encoder", default=None, help="encoder of the network, e.g. resnet18")
    g.add_argument("--encoder-weights", default=None,
                   help="pretrained encoder weights, e.g. imagenet (none: random initialisation)")
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--lr", type=float, default=None, help="learning rate")
    g.add_argument("--max-steps", type=_int_or_none, default=None,
                   help="at most this many optimiser steps per epoch (none: a full pass)")
    g.add_argument("--image-size", type=int, default=None,
                   help="side of the synthetic images, or the training patch size of other datasets (a square in "
                        "2D, a cube in 3D)")
    g.add_argument("--patch-size", type=patch_size, default=None,
                   help="training patch: 64 (a square in 2D, a cube in 3D) or 96,96,64; volumes are evaluated with "
                        "blended sliding windows of it (default: whole images)")
    g.add_argument("--patches-per-image", type=int, default=None,
                   help="training patches drawn from each image (volume) per epoch (default 1)")
    g.add_argument("--crop", type=int, default=None, help="centre crop of the dataset's images (e.g. LIDC: 64)")
    g.add_argument("--rps-weight", type=float, default=None, help="RPS weight of the ordinal method (1.0)")
    g.add_argument("--sigma", type=float, default=None, help="Gaussian width (voxels) of soft_gaussian and svls")
    g.add_argument("--hard-targets", action="store_true", default=None,
                   help="train STAPLE and SIMPLE on hard (thresholded) targets, as Langerak's SIMPLE is defined, "
                        "instead of their soft posterior / weighted vote (default: soft)")
    g.add_argument("--rps-weights", type=_floats, default=None,
                   help="also sweep the ordinal method's RPS weight over these values, e.g. 0,0.5,1,2")
    g.add_argument("--seed", type=int, default=None, help="training seed, and the seed of the bootstrap (0)")
    g.add_argument("--seeds", type=_ints, default=None,
                   help="train every method once per seed, e.g. 0,1,2; tables report the mean and std over seeds")
    g.add_argument("--sigmas", type=_floats, default=None,
                   help="also sweep the smoothing width σ of soft_gaussian and svls over these values")
    g.add_argument("--select-on-val", action="store_true", default=None,
                   help="choose σ and λ per method by validation MR-ECE alone (grids --sigmas, --rps-weights; "
                        "default σ 0.5,1,2 and λ 0.25,0.5,1,2,4,8,16), and each calibration loss's weight or "
                        "parameter on its grid, and report the chosen setting's test metrics")
    g.add_argument("--temperature-scaling", action=argparse.BooleanOptionalAction, default=None,
                   help="also report every row after post-hoc temperature scaling fitted on the validation "
                        "split (+ TS rows; default on)")
    g.add_argument("--device", default=None, help="auto (GPU when present), cpu, cuda, cuda:1, ...")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for training (default: torch's)")
    g.add_argument("--amp", choices=("auto", "bf16", "off"), default=None,
                   help="mixed precision: auto (bfloat16 on a GPU), bf16 or off")
    e = parser.add_argument_group("evaluation and output")
    e.add_argument("--n-boot", type=int, default=None, help="bootstrap resamples (1000)")
    e.add_argument("--fraction", type=float, default=None, help="bootstrap resample size, fraction of the test set")
    e.add_argument("--bootstrap-by", choices=("group", "image"), default=None,
                   help="resample the test set's groups (patients, cases, volumes) where the dataset names them, "
                        "or single images (default: group)")
    e.add_argument("--conformal", type=float, default=None, metavar="ALPHA",
                   help="also report each row's conformal guarantees against a random rater at level ALPHA in "
                        "(0, 1) (SPEC §12), calibrated on the validation split: the FNR threshold (test FNR, "
                        "mask size) and the volume intervals (coverage and width before and after "
                        "recalibration); the validation split needs at least 1/ALPHA - 1 images")
    e.add_argument("--force", action="store_true", help="recompute runs that finished earlier")
    add_quiet(e)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=None, help="named settings: demo, lidc, lidc3d, structures3d, paper")
    parser.add_argument("--dataset", action="append", default=[], metavar="NAME[:TASK]",
                        help="dataset to run on (repeatable), e.g. lidc_slices, refuge:cup, synthetic")
    parser.add_argument("--root", action="append", default=[],
                        help="dataset folder: once for all datasets, or once per --dataset in order")
    parser.add_argument("--option", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                        help="dataset loader option for every dataset, e.g. n=128 or min_raters_foreground=1")
    parser.add_argument("--structures", type=structures, default=None, help=STRUCTURES_HELP)
    parser.add_argument("--name", action="append", default=[],
                        help="display name of a dataset in the tables (once per --dataset, in order; default: "
                             "the name the data gives itself)")
    parser.add_argument("--out", default=None, help="output folder (default: orcal-experiment)")
    add_training_arguments(parser)


def build_config(args: argparse.Namespace, default_preset: str | None = None, default_out: str = "orcal-experiment"):
    """The :class:`~orcal.experiment.ExperimentConfig` the arguments describe."""
    from orcal.experiment import DatasetSpec, ExperimentConfig, preset_config

    options = loader_options(args)
    roots = list(getattr(args, "root", []) or [])
    names = list(getattr(args, "dataset", []) or [])
    preset = getattr(args, "preset", None) or (default_preset if not names else None)
    train_overrides = {
        "methods": args.methods, "epochs": args.epochs, "arch": args.arch, "encoder": args.encoder,
        "batch_size": args.batch_size, "lr": args.lr,
        "max_steps": args.max_steps, "rps_weight": args.rps_weight, "rps_weights": args.rps_weights,
        "seed": args.seed, "seeds": args.seeds, "sigmas": args.sigmas, "select_on_val": args.select_on_val,
        "temperature_scaling": args.temperature_scaling, "device": args.device, "threads": args.threads,
        "amp": args.amp, "n_boot": args.n_boot,
        "fraction": args.fraction, "bootstrap_by": getattr(args, "bootstrap_by", None),
        "conformal": getattr(args, "conformal", None),
        "out": getattr(args, "out", None) or default_out,
        "force": args.force, "progress": not args.quiet,
    }
    if preset and names:
        raise ValueError("give either --preset or --dataset, not both")
    if preset:
        if len(roots) > 1:
            raise ValueError("a preset takes at most one --root")
        cfg = preset_config(preset, roots[0] if roots else None, **train_overrides)
        for spec in cfg.datasets:
            spec.options.update(options)
    else:
        if not names:
            raise ValueError("name a dataset with --dataset NAME[:TASK] (or use --preset)")
        if len(roots) not in (0, 1, len(names)):
            raise ValueError(f"give --root once, or once per --dataset ({len(names)}), got {len(roots)}")
        per = roots * len(names) if len(roots) == 1 else (roots or [None] * len(names))
        labels = list(getattr(args, "name", []) or [])
        if labels and len(labels) != len(names):
            raise ValueError(f"give --name once per --dataset ({len(names)}), got {len(labels)}")
        specs = [DatasetSpec.parse(n, r, **options) for n, r in zip(names, per)]
        for spec, label in zip(specs, labels):
            spec.label = label
        kwargs = {k: v for k, v in train_overrides.items() if v is not None}
        cfg = ExperimentConfig(datasets=specs, **kwargs)
    if args.encoder_weights is not None:
        cfg.encoder_weights = None if args.encoder_weights.lower() == "none" else args.encoder_weights
    if getattr(args, "hard_targets", None):
        cfg.fusion_options["hard"] = True  # the "hard" option of every strategy that has one (STAPLE, SIMPLE)
    if args.sigma is not None:
        if not args.sigma > 0:
            raise ValueError(f"--sigma must be > 0, got {args.sigma}")
        cfg.fusion_options["sigma"] = args.sigma
    for spec in cfg.datasets:
        if args.crop is not None:
            spec.options["crop"] = args.crop
        if args.image_size is not None:
            if spec.name == "synthetic":
                dims = len(spec.options.get("shape", (0, 0)))
                spec.options["shape"] = (args.image_size,) * dims
            else:
                cfg.patch_size = args.image_size  # a square or a cube, as the data's dimensions say
    if args.patch_size is not None:
        cfg.patch_size = args.patch_size
    if args.patches_per_image is not None:
        if args.patches_per_image < 1:
            raise ValueError(f"--patches-per-image must be >= 1, got {args.patches_per_image}")
        cfg.train_options["patches_per_image"] = args.patches_per_image
    return cfg


def run(args: argparse.Namespace) -> int:
    from orcal.experiment import run_experiment

    cfg = build_config(args)
    command = "orcal " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None
    results = run_experiment(cfg, command=command)
    print_summary(results)
    print(f"report: {cfg.out}/report.md ({results['total_seconds'] / 60:.1f} min)")
    return 0


def print_summary(results) -> None:
    """Tables 1 and 2 (and the conformal tables), then the findings paragraph."""
    from orcal.experiment.tables import conformal_table, metric_results_table

    print()
    for metric, title in (("mr_ece", "Table 1: calibration"), ("auc", "Table 2: discrimination")):
        print(metric_results_table(results["runs"], metric, title=title).to_markdown())
    for key, entry in results.get("conformal", {}).items():
        print(f"Conformal guarantees, {key} (α = {entry['alpha']:g}, calibrated on the validation split)\n")
        print(conformal_table(entry))
    print(results.get("findings", ""))
