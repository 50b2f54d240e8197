"""STAPLE: orcal's pattern-table EM against SimpleITK's voxel loop, on the same masks.

    python -m benchmarks.bench_fusion --shape 3,128,128,64 --device cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch


def rater_masks(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """``(R, *S)`` bool: one jittered ellipsoid per rater with a rough, rater-specific border."""
    rng = np.random.default_rng(seed)
    R, *S = shape
    grids = np.ogrid[tuple(slice(0, n) for n in S)]
    out = np.empty(shape, dtype=bool)
    for r in range(R):
        centre = [n / 2 + rng.normal(0, n / 40) for n in S]
        radii = [n / 4 * rng.uniform(0.85, 1.15) for n in S]
        d2 = sum(((g - c) / a) ** 2 for g, c, a in zip(grids, centre, radii))
        out[r] = d2 <= 1.0 + 0.15 * rng.standard_normal(S).astype(np.float32)
    return out


def _median_time(fn, repeats: int, sync=lambda: None) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def bench_staple(device: str = "cpu", shape=(3, 256, 256, 128), repeats: int = 3) -> dict:
    """Median time of ``orcal.fusion.staple`` and ``SimpleITK.STAPLE`` on ``shape`` = ``(R, *S)`` masks.

    Returns ``{"orcal_s", "simpleitk_s", "speedup", "max_abs_diff", "shape", "device"}``; the difference
    is between the two probability maps (orcal's float32 output against SimpleITK's float64).
    """
    import SimpleITK as sitk

    from orcal.fusion import staple

    shape = tuple(int(n) for n in shape)
    if len(shape) not in (3, 4) or shape[0] < 1:
        raise ValueError(f"shape must be (R, H, W) or (R, D, H, W), got {shape}")
    masks = rater_masks(shape)
    images = [sitk.GetImageFromArray(m.astype(np.uint8)) for m in masks]
    dev = torch.device(device)
    x = torch.from_numpy(masks).to(dev).unsqueeze(0)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    staple(x)  # warm-up (allocator, kernels)
    ours_s, ours = _median_time(lambda: staple(x), repeats, sync)
    ref_s, ref = _median_time(lambda: sitk.STAPLE(images, 1.0, 1.0), repeats)
    diff = float(np.abs(ours[0].cpu().numpy().astype(np.float64) - sitk.GetArrayFromImage(ref)).max())
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return {"orcal_s": ours_s, "simpleitk_s": ref_s, "speedup": ref_s / ours_s, "max_abs_diff": diff,
            "shape": list(shape), "device": name}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", default="3,256,256,128", help="R,D,H,W or R,H,W")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    print(json.dumps(bench_staple(args.device, shape, args.repeats), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
