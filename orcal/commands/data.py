"""Inspect multi-rater datasets: size, raters, label balance and inter-rater agreement.

Example:  orcal data info /data/lidc-idri-slices --dataset lidc_slices
          orcal data info - --dataset synthetic --option n=200 --json
"""

from __future__ import annotations

import argparse
import ast
import json
import math

from orcal.commands._args import add_quiet


def _option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a plain string


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    info = sub.add_parser("info", help="cases, raters, image size, label balance and inter-rater agreement")
    info.add_argument("root", nargs="?", default="-",
                      help="dataset root folder or file ('-' or omitted for synthetic)")
    info.add_argument("--dataset", required=True, help="dataset name (see orcal.data.DATASETS)")
    info.add_argument("--task", default=None, help="task, where the dataset has several")
    info.add_argument("--split", default=None, choices=("train", "val", "test"),
                      help="one split (default: all cases)")
    info.add_argument("--option", "-o", action="append", type=_option, default=[], metavar="KEY=VALUE",
                      help="loader option, e.g. crop=64 or n=200 (repeatable)")
    info.add_argument("--label", type=int, default=None, metavar="N",
                      help="the structure to read from multi-label rater maps (the loader option label=N)")
    info.add_argument("--limit", type=int, default=None, help="look at the first N cases only")
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    add_quiet(info)


def _fmt(x: float) -> str:
    return "nan" if isinstance(x, float) and math.isnan(x) else f"{x:.4f}"


def _print_text(report: dict) -> None:
    st = report["agreement"]
    task = f" (task {report['task']})" if report["task"] else ""
    print(f"dataset            : {report['dataset']}{task}")
    print(f"split              : {report['split'] or 'all'}")
    print(f"cases              : {report['cases']}" + (f" (first {st['n_images']} read)"
                                                        if st["n_images"] != report["cases"] else ""))
    print(f"raters             : {', '.join(map(str, st['raters']))}")
    print(f"image size         : {report['image_shapes']} (channels {report['channels']})")
    print("foreground fraction: " + ", ".join(f"r{i}={_fmt(v)}"
                                              for i, v in enumerate(st["foreground_fraction_per_rater"])))
    print("empty annotations  : " + ", ".join(f"r{i}={_fmt(v)}"
                                              for i, v in enumerate(st["empty_fraction_per_rater"])))
    print(f"mean pairwise Dice : {_fmt(st['mean_pairwise_dice'])} "
          f"(pooled {_fmt(st['pooled_pairwise_dice'])})")
    print(f"any disagreement   : {_fmt(st['disagreement_fraction'])} of voxels some rater marked")
    print("votes k (all)      : " + ", ".join(f"{k}:{_fmt(v)}" for k, v in enumerate(st["k_hist"])))
    print("votes k (union)    : " + ", ".join(f"{k}:{_fmt(v)}" for k, v in enumerate(st["k_hist_union"])
                                              if k > 0))


def info(args: argparse.Namespace) -> dict:
    """Compute the report of ``orcal data info``."""
    from orcal._progress import progress_bar
    from orcal.data import load_dataset
    from orcal.data.agreement import AgreementAccumulator

    root = None if args.root in (None, "", "-") else args.root
    options = dict(args.option)
    if getattr(args, "label", None) is not None:
        options["label"] = args.label
    ds = load_dataset(args.dataset, root, split=args.split, task=args.task, **options)
    n = len(ds) if args.limit is None else min(len(ds), max(int(args.limit), 0))
    acc = AgreementAccumulator()
    shapes, channels = set(), set()
    for i in progress_bar(range(n), desc=f"{args.dataset}: cases", unit="case", enabled=not args.quiet):
        item = ds[i]
        shapes.add(tuple(item["image"].shape[1:]))
        channels.add(int(item["image"].shape[0]))
        acc.update(item["masks"])
    stats = acc.compute()
    shown = " ".join("x".join(map(str, s)) for s in sorted(shapes)[:5]) + (" ..." if len(shapes) > 5 else "")
    return {"dataset": args.dataset, "task": args.task, "split": args.split, "root": root, "cases": len(ds),
            "channels": sorted(channels), "image_shapes": shown, "agreement": stats}


def run(args: argparse.Namespace) -> int:
    report = info(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_text(report)
    return 0
