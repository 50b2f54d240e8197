"""Memory and time of evaluating one CT-sized volume: orcal's streaming metric vs torchmetrics on expanded pairs.

The volume is ``1 x D x H x W`` float32 probabilities (default 300 x 512 x 512, 78.6M voxels) with ``R`` rater
masks (default 3). Each contender runs in a fresh subprocess, which reports its peak resident memory
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) after building the data and at the end, and the wall time
of the evaluation alone:

* ``orcal``: ``MultiRaterCalibration`` (agreement table on, as ``orcal evaluate`` uses it) update + compute;
* ``orcal-stats``: the same with ``agreement=False`` (MR-ECE, AUC, Brier, NLL, Dice only);
* ``torchmetrics``: ``BinaryCalibrationError(n_bins=15, norm="l1")`` on the voxel–rater pairs expanded
  explicitly (``R x`` voxels), which is what it takes to score multi-rater data with a binary metric.

Usage: ``python -m benchmarks.eval_volume [--shape 300 512 512] [--raters 3] [--device cpu|cuda] [--json F]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

CONTENDERS = ("orcal", "orcal-stats", "torchmetrics")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _make_volume(shape: tuple[int, ...], R: int, device: str, seed: int = 0):
    """Probabilities (1, *shape) and masks (1, R, *shape) uint8, built slab by slab to keep the peak low."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    p = torch.rand((1, *shape), generator=g, device=device)
    masks = torch.empty((1, R, *shape), dtype=torch.uint8, device=device)
    step = max(1, shape[0] // 16)
    for start in range(0, shape[0], step):
        ps = p[:, start:start + step]
        for r in range(R):
            masks[:, r, start:start + step] = torch.rand(ps.shape, generator=g, device=device) < ps
    return p, masks


def _child(name: str, shape: tuple[int, ...], R: int, device: str) -> dict:
    import torch

    p, masks = _make_volume(shape, R, device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    # Imports first: the timing is of the evaluation, not of loading a library.
    if name in ("orcal", "orcal-stats"):
        from orcal import ops
        from orcal.metrics import MultiRaterCalibration
    elif name == "torchmetrics":
        from torchmetrics.classification import BinaryCalibrationError
    base = _peak_mib()
    result: dict = {}
    start = time.perf_counter()
    if name in ("orcal", "orcal-stats"):
        metric = MultiRaterCalibration(n_bins=15, agreement=name == "orcal")
        metric.update(p, masks)
        out = metric.compute()
        result["backend"] = ops.resolve_backend("calibration_stats", "auto", p.device)
        result["mr_ece"] = out["mr_ece"]
    elif name == "torchmetrics":
        metric = BinaryCalibrationError(n_bins=15, norm="l1").to(device)
        pairs_p = p[:, None].expand(1, R, *shape).reshape(-1)  # each voxel once per rater (a copy)
        metric.update(pairs_p, masks.reshape(-1))
        result["mr_ece"] = float(metric.compute())
        result["backend"] = f"torchmetrics {__import__('torchmetrics').__version__}"
    else:
        raise ValueError(f"unknown contender {name!r}; choose from {CONTENDERS}")
    if device == "cuda":
        torch.cuda.synchronize()
        result["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    result["seconds"] = time.perf_counter() - start
    result["rss_after_data_mib"] = base
    result["rss_peak_mib"] = _peak_mib()
    result["extra_peak_mib"] = result["rss_peak_mib"] - base
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[300, 512, 512], help="D H W (or H W)")
    parser.add_argument("--raters", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--which", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = tuple(args.shape)
    if args.child:
        print(json.dumps(_child(args.child, shape, args.raters, args.device)))
        return 0
    import torch

    voxels = 1
    for s in shape:
        voxels *= s
    print(f"volume 1 x {' x '.join(map(str, shape))} = {voxels / 1e6:.1f}M voxels, R = {args.raters} "
          f"({args.raters * voxels / 1e6:.1f}M voxel–rater pairs), device {args.device}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    results = {}
    for name in args.which:
        cmd = [sys.executable, "-m", "benchmarks.eval_volume", "--child", name, "--raters", str(args.raters),
               "--device", args.device, "--shape", *map(str, shape)]
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
        if done.returncode != 0:
            results[name] = {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
        else:
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        r = results[name]
        if "error" in r:
            print(f"{name:>13}: FAILED ({r['error']})")
        else:
            gpu = f", GPU peak {r['gpu_peak_mib']:.0f} MiB" if "gpu_peak_mib" in r else ""
            print(f"{name:>13}: {r['seconds']:7.2f} s, peak RSS {r['rss_peak_mib']:7.0f} MiB "
                  f"(+{r['extra_peak_mib']:.0f} MiB over the data){gpu}, MR-ECE {r['mr_ece']:.6f} [{r['backend']}]")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": shape, "raters": args.raters, "device": args.device, "results": results}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
