"""Run the whole experiment on built-in synthetic multi-rater data (R = 5) and print both tables.

Every strategy and the ordinal method are trained on generated 2D images whose rater disagreement can be
learned from the image, evaluated with MR-ECE and AUC (also after temperature scaling), summarised in a
findings paragraph and reported in OUT (default ./orcal-demo): report.md, the tables as Markdown and CSV,
figures and results.json.
Nothing is downloaded; it takes a few minutes on a CPU and uses the GPU when there is one.
"""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    from orcal.commands.experiment import add_training_arguments

    parser.add_argument("--out", default="orcal-demo", help="output folder (default: ./orcal-demo)")
    parser.add_argument("--samples", type=int, default=None, help="number of synthetic images (train+val+test)")
    add_training_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import time

    from orcal.commands.experiment import build_config, print_summary
    from orcal.experiment import run_experiment

    args.preset, args.dataset, args.root, args.option = "demo", [], [], []
    cfg = build_config(args, default_preset="demo", default_out="orcal-demo")
    if args.samples is not None:
        if args.samples < 10:
            raise ValueError(f"--samples must be >= 10, got {args.samples}")
        cfg.datasets[0].options["n"] = args.samples
    start = time.perf_counter()
    results = run_experiment(cfg, command="orcal demo" + (f" --out {cfg.out}" if cfg.out != "orcal-demo" else ""))
    print_summary(results)
    minutes = (time.perf_counter() - start) / 60
    print(f"report: {cfg.out}/report.md  ({minutes:.1f} min on {results['settings']['device']})")
    return 0
