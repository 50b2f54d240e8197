"""Several structures (SPEC §11): one call on C structures against the loop over structures a user writes
today, on the same CT-sized tensors.

    python -m benchmarks.bench_structures --device cpu

Pattern: each loss call takes a fresh logits leaf and runs backward (the training loop); the statistics are
one evaluation batch. The loop slices each structure's R + 1 channels out of the same logits, as code that
predates ``num_structures`` does.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from benchmarks.measure import time_fn


def _median_ms(fn, device: str, repeats: int) -> float:
    return 1000 * statistics.median(time_fn(fn, device, repeats, budget_s=3.0))


def bench_structures(device: str = "cpu", shape=(1, 64, 128, 128), num_structures: int = 3, num_raters: int = 3,
                     repeats: int = 7, backend: str = "auto") -> dict:
    """Median ms of the several-structure loss (fwd + bwd) and statistics, in one call and as a loop over
    structures, with the ratio; ``shape`` is ``(B, *S)``. The two agree to float32 rounding (``max_abs_diff``)."""
    import orcal

    C, R = int(num_structures), int(num_raters)
    B, *S = (int(n) for n in shape)
    g = torch.Generator().manual_seed(0)
    logits = (2 * torch.randn(B, C * (R + 1), *S, generator=g)).to(device)
    labels = torch.randint(0, C + 1, (B, R, *S), generator=g, dtype=torch.uint8).to(device)
    k = orcal.orc_targets(labels, num_structures=C)
    per = [slice(c * (R + 1), (c + 1) * (R + 1)) for c in range(C)]

    def fused_loss():
        z = logits.detach().requires_grad_()
        orcal.ordinal_loss(z, k, backend=backend).backward()
        return z.grad

    def loop_loss():
        z = logits.detach().requires_grad_()
        sum(orcal.ordinal_loss(z[:, s], k[:, c], backend=backend) for c, s in enumerate(per)).backward()
        return z.grad

    def fused_stats():
        return orcal.calibration_stats(logits, k, num_raters=R, kind="ordinal", backend=backend)

    def loop_stats():
        return [orcal.calibration_stats(logits[:, s], k[:, c], num_raters=R, kind="ordinal", backend=backend)
                for c, s in enumerate(per)]

    out: dict = {"shape (B x C(R+1) x S)": f"{B}x{C * (R + 1)}x{'x'.join(map(str, S))}", "C": C, "R": R,
                 "device": device, "backend": orcal.ops.resolve_backend("ordinal_loss", backend, torch.device(device))}
    for name, one, loop in (("loss fwd+bwd", fused_loss, loop_loss), ("calibration_stats", fused_stats, loop_stats)):
        one_ms, loop_ms = _median_ms(one, device, repeats), _median_ms(loop, device, repeats)
        out[name] = {"one call ms": one_ms, "loop over structures ms": loop_ms, "loop / one call": loop_ms / one_ms}
    out["loss fwd+bwd"]["max_abs_diff"] = float((fused_loss() - loop_loss()).abs().max())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", default="1,64,128,128", help="B,D,H,W (or B,H,W)")
    parser.add_argument("--num-structures", type=int, default=3)
    parser.add_argument("--raters", type=int, default=3)
    args = parser.parse_args()
    shape = tuple(int(n) for n in args.shape.split(","))
    print(json.dumps(bench_structures(args.device, shape, args.num_structures, args.raters), indent=1))


if __name__ == "__main__":
    main()
