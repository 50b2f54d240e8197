"""The few collectives orcal needs, on the device the process group's backend wants (CPU for gloo, the
current GPU for NCCL): used by the metrics' synchronisation and the training loop's loss averages."""

from __future__ import annotations

import torch


def world_size() -> int:
    """World size of an initialised ``torch.distributed`` process group, else 1."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def comm_device() -> torch.device:
    """The device collective tensors must live on: the current GPU for NCCL, else the CPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over every rank, on ``t``'s device."""
    out = t.to(comm_device()).clone()
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
    return out.to(t.device)


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate, in rank order, tensors whose first dimension differs between ranks (padded to the max)."""
    dist = torch.distributed
    device = comm_device()
    world = dist.get_world_size()
    size = torch.tensor([t.shape[0]], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s) for s in sizes]
    longest = max(counts)
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=device)
    padded[: t.shape[0]] = t.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts)]).to(t.device)
