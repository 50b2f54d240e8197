"""Evaluate saved probability maps against multi-rater masks: MR-ECE, AUC, Brier, NLL, Dice with bootstrap CIs.

Predictions (--pred DIR) are matched to cases by file name, <case>.<ext> or <case>_prob.<ext>, with <ext>
NIfTI, PNG/JPEG (8-bit, divided by 255) or .npy: what `orcal predict` and `orcal fuse --cases` write.
Rater masks come from a dataset layout (--dataset NAME --root ROOT [--split --task]) or from a folder
--raters DIR holding DIR/<case>/<rater files>; --label N picks one structure of multi-label rater maps.
--conformal ALPHA --calibration DIR adds the conformal threshold and volume intervals of SPEC §12, fitted on the
calibration cases' maps in DIR, and their test risk and coverage on --pred, and the conformal voxel sets
(threshold, miscoverage against a random rater, fraction of uncertain voxels); --save-conformal FILE keeps
the fitted calibrators for `orcal predict --conformal FILE`.
Writes metrics.json, per_image.csv, metrics.md, reliability.png and agreement.png to --out.
"""

from __future__ import annotations

import argparse

from orcal.commands._args import add_quiet, key_value


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pred", required=True, metavar="DIR", help="folder of probability maps, one per case")
    source = parser.add_argument_group("rater masks (one of)")
    source.add_argument("--dataset", metavar="NAME", help="dataset layout read by orcal.data.load_dataset")
    source.add_argument("--root", metavar="DIR", help="root folder of --dataset")
    source.add_argument("--split", default=None, help="split of --dataset (train, val, test; default: all)")
    source.add_argument("--task", default=None, help="task of --dataset, where it has several")
    source.add_argument("--option", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                        help="loader option of --dataset (repeatable), e.g. n=64 or crop=64")
    source.add_argument("--raters", metavar="DIR", help="folder with one sub-folder of rater masks per case")
    source.add_argument("--rater-glob", default="*", help="file pattern of rater masks in --raters (default: *)")
    source.add_argument("--label", type=int, default=None, metavar="N",
                        help="the structure to evaluate in multi-label rater maps (default: masks are binary)")
    parser.add_argument("--out", default="evaluation", metavar="DIR", help="output folder (default: evaluation)")
    parser.add_argument("--bins", type=int, default=15, help="equal-width ECE bins (default: 15)")
    parser.add_argument("--auc-bins", type=int, default=4096, help="score bins of the streaming AUC (default: 4096)")
    parser.add_argument("--exact-auc", action="store_true", help="also compute the exact AUC (more memory)")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                        help="bootstrap resamples for the 95%% intervals; 0 skips (default: 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    parser.add_argument("--group-by", default="auto", metavar="UNIT",
                        help="what the bootstrap resamples: auto (the patients, cases or volumes --dataset names, "
                             "else images), image, or a regular expression whose first group (or whole match) "
                             "in a case id names its group, e.g. '^(LIDC-IDRI-[0-9]+)' (default: auto)")
    parser.add_argument("--kind", choices=("prob", "logit"), default="prob",
                        help="the maps hold probabilities or logits (default: prob)")
    parser.add_argument("--name", default=None, help="method name in the report (default: name of --pred)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="evaluate the cases that have a prediction instead of failing on missing ones")
    conformal = parser.add_argument_group("conformal guarantees against a random rater (SPEC §12)")
    conformal.add_argument("--conformal", type=float, default=None, metavar="ALPHA",
                           help="fit on --calibration the threshold bounding the expected false-negative rate by "
                                "ALPHA and the volume intervals of coverage 1 - ALPHA; report them on --pred")
    conformal.add_argument("--calibration", metavar="DIR", help="probability maps of the calibration cases (raters "
                                                                "from the same source, cases disjoint from --pred)")
    conformal.add_argument("--save-conformal", metavar="FILE", default=None,
                           help="write the fitted calibrators to FILE (.json, else torch .pt) for orcal predict "
                                "--conformal FILE")
    conformal.add_argument("--calibration-split", default=None, metavar="SPLIT",
                           help="split of --dataset holding the calibration cases (default: --split)")
    add_quiet(parser, "--no-progress")


def run(args: argparse.Namespace) -> int:
    from orcal.evaluate import evaluate

    if args.dataset is None and args.raters is None:
        raise ValueError("give the rater masks with --dataset NAME --root DIR or with --raters DIR")
    if args.dataset is not None and args.raters is not None:
        raise ValueError("--dataset and --raters exclude each other")
    report = evaluate(args.pred, args.out, dataset=args.dataset, root=args.root, split=args.split, task=args.task,
                      raters=args.raters, rater_glob=args.rater_glob, n_bins=args.bins, auc_bins=args.auc_bins,
                      n_boot=args.bootstrap, seed=args.seed, kind=args.kind, exact_auc=args.exact_auc,
                      allow_missing=args.allow_missing, name=args.name, progress=not args.quiet,
                      label=args.label, dataset_options=dict(args.option), group_by=args.group_by,
                      conformal=args.conformal, calibration=args.calibration,
                      calibration_split=args.calibration_split, save_conformal=args.save_conformal)
    m, ci = report["metrics"], report["bootstrap"]
    for key in ("mr_ece", "auc", "brier", "nll", "dice"):
        value = m[key]
        text = "n/a" if value is None else f"{value:.4f}"
        if ci and ci[key]["low"] is not None:
            text += f"  [{ci[key]['low']:.4f}, {ci[key]['high']:.4f}]"
        print(f"{key:>8}: {text}")
    if "conformal" in report:
        _print_conformal(report["conformal"])
    for warning in report.get("warnings", []):
        print(f"warning: {warning}")
    print(f"{report['n_images']} images; report in {args.out}/ (metrics.json, per_image.csv, metrics.md, "
          "reliability.png, agreement.png)")
    return 0


def _print_conformal(c: dict) -> None:
    """One line per kind of conformal set: what was fitted and each of its columns on the evaluated cases."""
    from orcal.metrics.conformal_evaluation import KINDS

    print(f"conformal, against a random rater (alpha {c['alpha']}, {c['n_calibration']} calibration cases):")
    for kind in KINDS:
        fitted = ", ".join(f"{name} {values[0]:.3f}" for name, values in c["fitted"][kind.name].items())
        columns = "; ".join(f"{col.header}{f' ({col.stage})' if col.stage else ''} {c['values'][col.key]:.4g}"
                            + (" mL at 1 mm voxels" if col.unit == "volume" else "") for col in kind.columns)
        print(f"  {kind.label} ({fitted}): {columns}")
    if c["saved"]:
        print(f"  calibrators saved to {c['saved']}")
