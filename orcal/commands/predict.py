"""Turn a trained checkpoint into probability maps on disk, the files `orcal evaluate --pred` reads.

Examples:
  orcal predict runs/orc --dataset synthetic --split test --out pred     # a run folder: its best.pt
  orcal predict runs/ct/best.pt scans/ --intensity=-200,300 --out pred     # a folder of NIfTI volumes
  orcal evaluate --pred pred/expected --dataset synthetic --split test --out eval

Writes OUT/<readout>/<case><ext> per readout (an ordinal head: majority and expected, SPEC §2; a binary head:
OUT/sigmoid/) and, for an ordinal head, OUT/expected_k/<case><ext>, the predicted number of raters
E[k]. With --conformal FILE (from `orcal evaluate --save-conformal`) also the conformal mask and the
uncertainty mask of SPEC §12 (OUT/<readout>_conformal/, OUT/<readout>_uncertain/). Volumes go through blended
sliding windows of the training patch; NIfTI outputs keep the input's affine and spacing. Images come from
files or folders (<case>.<ext>, or <case>/image.<ext>) or from a dataset layout (--dataset); give files the
intensity scaling the model was trained with (--intensity).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from orcal.commands._args import STRUCTURES_HELP, add_quiet, key_value, loader_options, structures


def _intensity(text: str):
    if "," in text:
        try:
            low, high = (float(t) for t in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected auto, percentile, none or LOW,HIGH, got {text!r}") from None
        return low, high
    return text


def configure(parser: argparse.ArgumentParser) -> None:
    from orcal.training.predict import WRITE_FORMATS

    parser.add_argument("checkpoint", help="a checkpoint (best.pt, last.pt) or the run folder holding it")
    parser.add_argument("images", nargs="*", help="image files or folders (instead of --dataset)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    data = parser.add_argument_group("a dataset layout instead of image files")
    data.add_argument("--dataset", help="dataset name (orcal.data.DATASETS)")
    data.add_argument("--root", help="dataset folder")
    data.add_argument("--split", default=None, help="train, val or test (default: all cases)")
    data.add_argument("--task", default=None, help="task, where the dataset has several")
    data.add_argument("--option", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                      help="dataset loader option (repeatable), e.g. n=64 or label=2")
    data.add_argument("--structures", type=structures, default=None, help=STRUCTURES_HELP)
    parser.add_argument("--intensity", type=_intensity, default="auto",
                        help="intensity scaling of image files: auto (uint8 / 255, else 0.5-99.5 percentiles), "
                             "percentile, none, or a window LOW,HIGH such as -200,300 for CT in HU")
    parser.add_argument("--readout", default=None,
                        help="comma-separated readouts (default: the head's: majority,expected for an ordinal head, "
                             "sigmoid for a binary one)")
    parser.add_argument("--format", choices=tuple(WRITE_FORMATS), default=None,
                        help="output format (default: NIfTI for NIfTI inputs, else .npy)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1")
    parser.add_argument("--amp", default="auto", choices=("auto", "bf16", "off"))
    parser.add_argument("--batch-size", type=int, default=2, help="2D images, or 3D windows, per forward pass")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap for volumes")
    conformal = parser.add_argument_group("conformal masks (SPEC §12)")
    conformal.add_argument("--conformal", metavar="FILE", default=None,
                           help="calibrators saved by orcal evaluate --save-conformal: also write OUT/<readout>_"
                                "conformal/ (the mask p >= lambda) and OUT/<readout>_uncertain/ (voxels whose "
                                "conformal set holds both labels)")
    conformal.add_argument("--conformal-readout", metavar="NAME", default=None,
                           help="the readout the calibrators were fitted on (default: the only one written)")
    add_quiet(parser)


def checkpoint_file(path: str) -> Path:
    """The checkpoint named by ``path``: the file itself, or a run folder's ``best.pt`` (else ``last.pt``)."""
    p = Path(path)
    if p.is_dir():
        for name in ("best.pt", "last.pt"):
            if (p / name).is_file():
                return p / name
        raise FileNotFoundError(f"checkpoint: no best.pt or last.pt in {p}")
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint: no such file or folder: {p}")
    return p


def run(args: argparse.Namespace) -> int:
    from orcal.heads import Head
    from orcal.training.checkpoint import load_model
    from orcal.training.predict import write_predictions

    if bool(args.images) == bool(args.dataset):
        raise ValueError("give either image files / folders or --dataset NAME (with --root), not both or neither")
    model, config = load_model(checkpoint_file(args.checkpoint), device="cpu")
    spec = model.orcal_spec
    if args.dataset:
        from orcal.data import load_dataset

        dataset = load_dataset(args.dataset, args.root, split=args.split, task=args.task, **loader_options(args))
    else:
        from orcal.data.images import ImageFiles

        dataset = ImageFiles(args.images, spec["spatial_dims"], spec["in_channels"], args.intensity)
    readouts = None if args.readout is None else tuple(r.strip() for r in args.readout.split(",") if r.strip())
    if readouts:
        head = Head(spec["head"])
        try:
            readouts = tuple(head.readout(r) for r in readouts)
        except ValueError as err:
            raise ValueError(f"--readout: {err}") from None
    patch = config.patch_size if spec["spatial_dims"] == 3 else None
    conformal = None
    if args.conformal is not None:
        from orcal.metrics import load_conformal

        try:
            conformal = load_conformal(args.conformal)
        except (FileNotFoundError, ValueError) as err:
            raise type(err)(f"--conformal: {err}") from None
    elif args.conformal_readout is not None:
        raise ValueError("--conformal-readout needs --conformal FILE")
    folders = write_predictions(model, dataset, args.out, readouts=readouts, fmt=args.format, device=args.device,
                                patch_size=patch, batch_size=args.batch_size, overlap=args.overlap, amp=args.amp,
                                progress=not args.quiet, conformal=conformal,
                                conformal_readout=args.conformal_readout)
    for name, folder in folders.items():
        print(f"{name:>11}: {folder}/ ({len(dataset)} files)")
    return 0
