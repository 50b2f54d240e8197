"""Command-line options of the benchmark suite, shared by ``python -m benchmarks`` and ``orcal bench``."""

from __future__ import annotations

import argparse

from benchmarks.suite import OPS, PROVIDERS, RATERS, RESULTS


def _names(choices: tuple[str, ...]):
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(x.strip() for x in text.split(",") if x.strip())
        bad = [x for x in names if x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose among {', '.join(choices)}")
        return names

    return parse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="device to measure (default: cuda if available, else cpu)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats: a smoke test")
    parser.add_argument("--ops", type=_names(OPS), default=OPS, help=f"comma-separated, among {','.join(OPS)}")
    parser.add_argument("--providers", type=_names(PROVIDERS), default=PROVIDERS,
                        help=f"comma-separated, among {','.join(PROVIDERS)}")
    parser.add_argument("--raters", type=lambda s: tuple(int(x) for x in s.split(",")), default=RATERS,
                        help="numbers of raters R (logits have R + 1 channels), comma-separated")
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile (slow to compile on CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (median reported)")
    parser.add_argument("--out", default=str(RESULTS), help="directory for <device-name>.{md,json}")
    parser.add_argument("--no-staple", action="store_true", help="skip the STAPLE benchmark of bench_fusion")
    parser.add_argument("--sizes", type=lambda s: tuple(x.strip() for x in s.split(",") if x.strip()), default=None,
                        help="only these of the default sizes (2d, ct; quick: 2d-quick, ct-quick)")
    parser.add_argument("--processes", type=int, default=None,
                        help="also time each case in this many fresh processes, for the spread between runs "
                             "(default 5; 1 with --quick)")
    parser.add_argument("--sass", action="store_true",
                        help="add the registers, spills and instructions per voxel of every kernel, compiled for "
                             "sm_90a without a GPU (Triton; the CUDA kernels too where nvcc is found)")
    parser.add_argument("--no-training-step", action="store_true",
                        help="skip the loss's share of a training step (a 3D U-Net, FPN-ResNet18 in 2D)")


def run(args: argparse.Namespace) -> int:
    import torch

    from benchmarks.report import markdown
    from benchmarks.suite import run_suite

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    providers = tuple(p for p in args.providers if not (args.no_compile and p == "compile"))
    processes = args.processes if args.processes is not None else (1 if args.quick else 5)
    if processes < 1:
        raise SystemExit("--processes must be >= 1")
    rows, meta = run_suite(device=device, quick=args.quick, ops=args.ops, providers=providers, raters=args.raters,
                           repeats=args.repeats, out_dir=args.out, staple=not args.no_staple, processes=processes,
                           size_names=args.sizes, training_step=not args.no_training_step, sass=args.sass)
    print(markdown(rows, meta, OPS, PROVIDERS))
    for key, why in meta["skipped"].items():
        print(f"skipped {key}: {why}")
    for path in meta.get("written", []):
        print(f"wrote {path}")
    return 1 if any(r.error and r.provider == "cpp" for r in rows) else 0
