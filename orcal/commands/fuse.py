"""Fuse several raters' masks into one target map (STAPLE, SIMPLE, soft, ...) and report their agreement.

One case:    orcal fuse --method staple --out OUTDIR rater1.nii.gz rater2.nii.gz rater3.nii.gz
Many cases:  orcal fuse --method soft --cases 'data/*/' --raters 'rater*.nii.gz' --out OUTDIR

Writes OUTDIR/<method><ext> for one case, OUTDIR/<case><ext> for many (the layout `orcal evaluate --pred
OUTDIR` reads), and OUTDIR/agreement.csv. Per case it prints the inter-rater agreement as `orcal data info`
defines it: the mean pairwise Dice and, among the voxels some rater marked, the fraction where the raters do
not all agree. A mask holds background 0 and one foreground value (1, 255, ...), read by the loaders' rule;
--label N reads structure N of multi-label maps (CURVAS: 1 pancreas, 2 kidney, 3 liver in one file). The
output follows the input format (NIfTI keeps the affine of the first rater's file, PNG stores the probability
scaled to 0..255, .npy is float32) unless --format is given; the ordinal method writes the vote count k as
uint8.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from orcal.commands._args import add_quiet

FORMATS = {"nii.gz": ".nii.gz", "nii": ".nii", "png": ".png", "npy": ".npy"}
#: The option flags below (a strategy takes those named in its registry entry's ``options``).
OPTION_FLAGS = ("sigma", "padding", "alpha", "confidence_weight", "max_iter", "hard", "majority", "seed")


def configure(parser: argparse.ArgumentParser) -> None:
    from orcal.commands._args import key_value

    parser.add_argument("files", nargs="*", metavar="RATER_FILE", help="one mask file per rater (one case)")
    from orcal import fusion

    parser.add_argument("--method", required=True, choices=fusion.names(), help="fusion strategy (SPEC §6)")
    parser.add_argument("--out", required=True, type=Path, metavar="OUTDIR", help="output folder")
    parser.add_argument("--cases", metavar="GLOB", help="glob of case folders, e.g. 'data/*/'")
    parser.add_argument("--raters", metavar="GLOB",
                        help="pattern of the rater file names in each case folder (default: every mask file)")
    parser.add_argument("--format", choices=tuple(FORMATS), help="output format (default: as the input)")
    parser.add_argument("--device", default="cpu", help="torch device to compute on (default: cpu)")
    add_quiet(parser)
    parser.add_argument("--label", type=int, default=None, metavar="N",
                        help="the structure to fuse in multi-label rater maps (default: masks are binary)")
    parser.add_argument("--mask-channel", type=int, default=None, metavar="C",
                        help="channel of colour mask images that holds the annotation (0 red, 1 green, 2 blue, "
                             "3 alpha; default: masks must be grey)")
    opts = parser.add_argument_group("method options")
    opts.add_argument("--sigma", type=float, help="Gaussian width in voxels (soft_gaussian, svls; default 1)")
    opts.add_argument("--padding", choices=("reflect", "replicate"), help="border of soft_gaussian")
    opts.add_argument("--alpha", type=float, help="SIMPLE drops raters below mean - alpha * std (default 1)")
    opts.add_argument("--confidence-weight", type=float, help="STAPLE prior weight (default 1)")
    opts.add_argument("--max-iter", type=int, help="most STAPLE iterations")
    opts.add_argument("--hard", action="store_true", default=None, help="binary output (staple, simple)")
    opts.add_argument("--majority", type=int, help="votes that make a voxel foreground (default R // 2 + 1)")
    opts.add_argument("--seed", type=int, help="seed of the random rater choice (default 0)")
    opts.add_argument("--option", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                      help="any other option of the strategy (repeatable), e.g. --option max_rounds=5")


def _cases(args: argparse.Namespace) -> list[tuple[str, list[Path]]]:
    """``(case name, rater files)`` pairs from the command line."""
    import glob

    from orcal.io import rater_files

    if args.files and args.cases:
        raise ValueError("give either rater files or --cases, not both")
    if args.raters and not args.cases:
        raise ValueError("--raters needs --cases (a glob of case folders)")
    if args.files:
        return [("", [Path(f) for f in args.files])]
    if not args.cases:
        raise ValueError("give the rater files of one case, or --cases GLOB for several")
    folders = sorted(Path(p) for p in glob.glob(args.cases) if Path(p).is_dir())
    if not folders:
        raise ValueError(f"--cases {args.cases!r} matched no folder")
    names = [f.name for f in folders]
    if len(set(names)) != len(names):
        raise ValueError(f"--cases {args.cases!r} matched folders with the same name; outputs would collide")
    cases = []
    for folder in folders:  # the folder's own name may hold glob characters (case[1]): only --raters is a pattern
        cases.append((folder.name, rater_files(folder, args.raters or "*")))
    return cases


def load_mask(path: Path, channel: int | None = None, label: int | None = None):
    """A rater's mask as a bool array, read by the loaders' rule (:func:`orcal.io.read_mask`)."""
    from orcal.io import read_mask

    arr = read_mask(path, channel, label)
    if arr.ndim not in (2, 3):
        raise ValueError(f"{path}: a mask must be 2D or 3D, got shape {arr.shape}")
    return arr.astype(bool)


def agreement(masks) -> tuple[float, float]:
    """Mean pairwise Dice (pairs that both left the case empty skipped) and the fraction of the raters' union
    where they do not all agree: the definitions of ``orcal data info`` (:mod:`orcal.data.agreement`)."""
    from orcal.data.agreement import agreement_stats

    stats = agreement_stats([masks])
    return stats["mean_pairwise_dice"], stats["disagreement_fraction"]


def _output(target, method: str, fmt: str, path: Path, like: Path) -> None:
    import numpy as np

    from orcal.io import file_format, write_array

    arr = target.cpu().numpy()
    if fmt == ".png":
        if arr.ndim != 2:
            raise ValueError(f"{path}: PNG output needs 2D masks, these are {arr.ndim}D; use --format nii.gz or npy")
        if method != "ordinal":
            arr = np.rint(arr * 255.0).astype(np.uint8)
    write_array(path, arr, like=like if file_format(like) == "nifti" else None)


def run(args: argparse.Namespace) -> int:
    import csv

    import numpy as np
    import torch

    from orcal import fusion
    from orcal._progress import progress_bar
    from orcal.fusion import make_target
    from orcal.io import check_same_grid, extension

    strategy = fusion.get(args.method)
    given = {name: (value, "--" + name.replace("_", "-")) for name in OPTION_FLAGS
             if (value := getattr(args, name)) is not None}
    given.update((name, (value, f"--option {name}=")) for name, value in args.option)
    options = {}
    for name, (value, flag) in given.items():
        if name not in strategy.options:
            takers = [s for s in fusion.names() if name in fusion.get(s).options]
            raise ValueError(f"{flag} does not apply to --method {args.method} (only to {', '.join(takers) or 'none'})")
        options[name] = value
    if strategy.needs_generator and "seed" in strategy.options:
        options.setdefault("seed", 0)  # a file output is reproducible

    cases = _cases(args)
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    header = f"{'case':<24} {'raters':>6} {'shape':>16} {'dice':>7} {'disagree':>9}  output"
    bar = progress_bar(cases, desc="fuse", unit="case", enabled=len(cases) > 1 and not args.quiet)
    bar.write(header)
    for name, files in bar:
        label = name or "(files)"
        if len(files) < 2:
            where = f"case {name}" if name else "fuse"
            raise ValueError(f"{where}: {len(files)} rater file(s) found; fusing needs at least 2")
        check_same_grid(files, f"the raters of case {name}" if name else "the raters")
        arrays = [load_mask(f, args.mask_channel, args.label) for f in files]
        for f, a in zip(files, arrays):
            if a.shape != arrays[0].shape:
                raise ValueError(f"{f}: shape {a.shape} differs from {arrays[0].shape} of {files[0]}")
        masks = torch.from_numpy(np.stack(arrays)).to(device)
        dice, split = agreement(masks)
        target = make_target(args.method, masks.unsqueeze(0), **options)[0]

        ext = FORMATS[args.format] if args.format else extension(files[0])
        out_path = args.out / f"{name or args.method}{ext}"
        _output(target, args.method, ext, out_path, files[0])
        shape = "x".join(map(str, arrays[0].shape))
        bar.write(f"{label:<24} {len(files):>6} {shape:>16} {dice:>7.4f} {split:>9.4f}  {out_path}")
        rows.append({"case": label, "raters": len(files), "shape": shape, "mean_pairwise_dice": f"{dice:.6f}",
                     "disagreement_fraction": f"{split:.6f}", "output": str(out_path)})

    with open(args.out / "agreement.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return 0
