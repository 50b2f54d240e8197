"""What users would otherwise call, on the suite's own inputs, and the loss's share of a training step.

- ``cross_entropy``: PyTorch's fused ``F.cross_entropy`` forward + backward on the same ``R + 1``-channel
  logits (the cost users already accept for an ``R + 1``-way head), the vote count as the class;
- ``bce``: a one-channel ``binary_cross_entropy_with_logits`` to the soft target ``k / R`` (what the
  baselines train with), on the first channel of the same logits;
- ``monai_ece``: MONAI's ``CalibrationErrorMetric`` on ``y = k / R`` (per image, then averaged: not the pooled
  MR-ECE; they agree image by image), where MONAI is installed;
- ``auroc``: torchmetrics' ``BinaryAUROC`` (its default, exact: it sorts the scores) on expanded voxel–rater
  pairs, next to orcal's binned AUC from the same statistics (its error bound is reported by orcal). With
  4096 thresholds torchmetrics compares every pair with every threshold: minutes on a CT volume.

:func:`training_step_share` times one optimiser step of a network (a 3D U-Net, and FPN-ResNet18 in 2D where
segmentation_models_pytorch is installed) and the loss alone on its logits: the share of the step that the
loss costs, for orcal, the eager reference and ``F.cross_entropy``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import orcal
from orcal.ops import reference as ref

LOSS_PEERS = ("cross_entropy", "bce")
STATS_PEERS = ("monai_ece", "auroc")


def user_step(loss_fn: Callable, logits: torch.Tensor, k: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One training step's worth of loss, as a user's loop runs it: a fresh logits leaf each call, forward,
    ``.backward()``; the gradient is returned and freed with the leaf by the caller."""
    def step():
        z = logits.detach().requires_grad_()
        loss_fn(z, k).backward()
        return z.grad

    return step


def loss_peer(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if name == "cross_entropy":
        return lambda z, k: F.cross_entropy(z, k.long())
    if name == "bce":
        def bce(z, k):
            R = z.shape[1] - 1
            return F.binary_cross_entropy_with_logits(z[:, 0], k.float() / R)
        return bce
    raise ValueError(f"unknown loss peer {name!r}")


def expanded_pairs(p: torch.Tensor, R: int) -> torch.Tensor:
    """Every voxel's probability repeated for each of its ``R`` raters, flat: the pairs the peers score."""
    return p.unsqueeze(1).expand(-1, R, *p.shape[1:]).reshape(-1)


def torchmetrics_ece(p: torch.Tensor, masks: torch.Tensor, n_bins: int = 15) -> float:
    """MR-ECE the way it is measured today: a binary ECE over explicitly expanded voxel–rater pairs."""
    from torchmetrics.classification import BinaryCalibrationError

    metric = BinaryCalibrationError(n_bins=n_bins, norm="l1").to(p.device)
    metric.update(expanded_pairs(p, masks.shape[1]), masks.reshape(-1).long())
    return float(metric.compute())


def stats_peer(name: str, R: int) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """``fn(p (B, *S), masks (B, R, *S)) -> value`` of a statistics peer."""
    if name == "monai_ece":
        from monai.metrics import CalibrationErrorMetric

        def monai_ece(p, masks):
            metric = CalibrationErrorMetric(num_bins=15, include_background=True, metric_reduction="mean")
            y = masks.float().mean(1, keepdim=True)  # k / R, channel-first
            return float(metric(p.unsqueeze(1), y).mean())
        return monai_ece
    if name == "auroc":
        from torchmetrics.classification import BinaryAUROC

        def auroc(p, masks):
            metric = BinaryAUROC().to(p.device)
            metric.update(expanded_pairs(p, R), masks.reshape(-1).long())
            return float(metric.compute())
        return auroc
    raise ValueError(f"unknown statistics peer {name!r}")


def peer_available(name: str) -> str | None:
    """None if the peer can be built here (its package and class import), else why not."""
    needs = {"monai_ece": ("monai.metrics", "CalibrationErrorMetric"),
             "auroc": ("torchmetrics.classification", "BinaryAUROC")}.get(name)
    if needs is None:
        return None
    module, attr = needs
    try:
        getattr(__import__(module, fromlist=[attr]), attr)
    except (ImportError, AttributeError):
        return f"{module}.{attr} is not available (not installed, or another version)"
    return None


def _median_time(fn: Callable[[], object], device: str, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _optimiser_step(model, opt, loss_fn, image, k) -> Callable[[], None]:
    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(image).float(), k).backward()
        opt.step()

    return step


def training_step_share(device: str = "cpu", quick: bool = False, R: int = 7, repeats: int = 5) -> dict:
    """Per network: the optimiser step's median time and, per loss, the loss's (fwd + bwd) time and share."""
    from orcal.models import build_model

    losses = {"orcal": lambda z, k: orcal.ordinal_loss(z, k), "eager reference": ref.ordinal_loss,
              "F.cross_entropy": loss_peer("cross_entropy")}
    nets = [("unet3d", 3, (2, 1, 16, 16, 16) if quick else (2, 1, 64, 64, 64), {})]
    try:
        import segmentation_models_pytorch  # noqa: F401

        nets.append(("FPN", 2, (2, 1, 64, 64) if quick else (16, 1, 256, 256), {"encoder": "resnet18"}))
    except ImportError:
        pass
    out = {}
    g = torch.Generator(device=device).manual_seed(0)
    for arch, dims, shape, kw in nets:
        model = build_model(arch, spatial_dims=dims, head="ordinal", num_raters=R, **kw).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        image = torch.randn(shape, generator=g, device=device)
        k = torch.randint(0, R + 1, (shape[0], *shape[2:]), generator=g, dtype=torch.uint8, device=device)
        with torch.no_grad():
            logits = model(image).float()
        entry = {"input": list(shape), "losses": {}}
        for name, fn in losses.items():
            t_step = _median_time(_optimiser_step(model, opt, fn, image, k), device, repeats)
            t_loss = _median_time(user_step(fn, logits, k), device, repeats)
            entry["losses"][name] = {"step_ms": t_step * 1e3, "loss_ms": t_loss * 1e3,
                                     "share_of_step": t_loss / t_step}
        out[f"{arch} ({dims}D, R = {R})"] = entry
    return out
