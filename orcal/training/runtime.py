"""Where and how a run executes: seeds and RNG state, the device, bfloat16 autocast, torch.distributed."""

from __future__ import annotations

import os
import platform
import random
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch


def mix(*parts: int) -> int:
    """A well-spread 63-bit seed from several integers (stable across runs and machines)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, torch.Tensor]:
    """The global RNG states as tensors (loadable with ``weights_only=True``)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_meta": torch.tensor([int(pos), int(has_gauss)], dtype=torch.int64),
        "numpy_gauss": torch.tensor(float(cached), dtype=torch.float64),
        "python": torch.tensor(py_state, dtype=torch.int64),
        "python_meta": torch.tensor([int(version), gauss_next is not None], dtype=torch.int64),
        "python_gauss": torch.tensor(0.0 if gauss_next is None else float(gauss_next), dtype=torch.float64),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    meta = state["numpy_meta"].tolist()
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), meta[0], meta[1],
                         float(state["numpy_gauss"])))
    version, has_gauss = state["python_meta"].tolist()
    random.setstate((version, tuple(state["python"].tolist()),
                     float(state["python_gauss"]) if has_gauss else None))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = list(state["cuda"])
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False  # this call created the process group (and destroys it)

    @property
    def main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str | torch.device, local_rank: int = 0) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} asked for, but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return dev


def setup_distributed(device: str) -> tuple[Dist, torch.device]:
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_available() and dist.is_initialized():
        info = Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), False)
    elif world > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        dev = resolve_device(device, local_rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        info = Dist(dist.get_rank(), dist.get_world_size(), local_rank, True)
    else:
        info = Dist()
    dev = resolve_device(device, info.local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return info, dev


def autocast(amp: str, device: torch.device):
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def all_reduce(values: Sequence[float], info: Dist, device: torch.device) -> list[float]:
    """``values`` summed over the ranks of the run."""
    if info.world == 1:
        return [float(v) for v in values]
    from orcal.distributed import all_reduce_sum

    return all_reduce_sum(torch.tensor(list(values), dtype=torch.float64, device=device)).tolist()


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_info(device: str | torch.device) -> dict[str, str]:
    """What the numbers were measured on."""
    import orcal

    device = str(device)
    info = {
        "device": device,
        "cpu": cpu_name(),
        "cpu_count": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "orcal": orcal.__version__,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    try:
        build = orcal.build_info()
        info["orcal_build"] = ", ".join(f"{k}={v}" for k, v in build.items() if not isinstance(v, (dict, list)))
    except Exception as err:  # build info is informative only
        info["orcal_build"] = f"unavailable ({err})"
    return info
