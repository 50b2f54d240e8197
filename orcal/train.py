"""The training driver: ordinal rater consensus or any baseline strategy, one GPU, many GPUs or the CPU.

>>> from orcal.train import TrainConfig, train, predict
>>> result = train(TrainConfig(dataset="synthetic", method="ordinal", arch="unet-small", epochs=2))
>>> for case_id, p, masks, valid in predict(result, dataset):
...     ...

* Seeded: the model init, the data order (a per-epoch permutation), augmentations and patches (seeded per
  epoch and sample), and the ``random`` strategy's rater draw (seeded per epoch and rank) depend only on the
  seed, so a run is reproducible and a resumed run repeats exactly what an uninterrupted one does.
* The target is computed per batch on the device with :func:`orcal.fusion.make_target`.
* Model selection on the validation loss (the training loss against the validation set's target).
* Checkpoints: ``out_dir/last.pt`` (everything needed to resume) and ``out_dir/best.pt`` (the selected
  weights), each written to a temporary file in the same folder and then renamed, so a crash never leaves a
  truncated checkpoint. Loaded with ``torch.load(..., weights_only=True)``.
* Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel, the
  data sharded with a ``DistributedSampler`` (gloo on CPU, nccl on GPU), the validation loss summed over
  ranks; only rank 0 writes checkpoints and shows progress bars.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from orcal import ops
from orcal.models import as_tuple, build_model, init_output_bias, probability

AMP_MODES = ("auto", "bf16", "off")
LAST, BEST = "last.pt", "best.pt"
CHECKPOINT_VERSION = 1


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in every checkpoint as a plain dict).

    Data: ``dataset`` name for :func:`orcal.data.load_dataset` with ``root``, ``task`` and
    ``dataset_options`` (e.g. ``{"n": 64, "shape": (64, 64)}`` for ``"synthetic"``); the training set is split
    ``train_split`` and validation ``val_split`` (None: no validation, the last epoch is kept); ``val_fraction``
    (if set) is passed to the loader, which carves the validation cases (whole patients) from training.

    Method: ``"ordinal"`` (ORC target, ordinal head, :class:`orcal.losses.OrdinalLoss` with ``rps_weight`` and
    ``majority``) or a baseline strategy of SPEC §6 (binary head, BCE to the strategy's target;
    ``fusion_options`` such as ``{"sigma": 1.0}`` go to :func:`orcal.fusion.make_target`).

    Model: ``arch`` (``"auto"``: FPN in 2D, unet3d in 3D), ``encoder``, ``encoder_weights``,
    ``model_options`` (passed to :func:`orcal.models.build_model`), ``spatial_dims`` (None: from the data).

    Optimisation: AdamW (``lr``, ``weight_decay``), cosine decay over ``epochs``, optional ``grad_clip``;
    ``batch_size`` per process; ``patch_size`` (None: whole images; required in 3D unless volumes are small)
    with ``fg_prob`` foreground-centred patches and ``patches_per_image`` patches per image per epoch;
    ``augment`` adds random flips; ``max_steps_per_epoch`` caps an epoch. ``prior_bias`` starts the output
    layer's bias at the training set's label frequencies (vote counts for the ordinal head, the mean vote for
    a binary head), so early steps are not spent learning the foreground fraction.

    Runtime: ``seed``, ``out_dir`` (None: nothing written, no resume), ``resume``, ``amp`` (``"auto"``:
    bfloat16 autocast on CUDA, off on CPU; ``"bf16"``; ``"off"``), ``device`` (``"auto"``, ``"cpu"``,
    ``"cuda"``, ``"cuda:1"``), ``num_workers``, ``log_every`` (steps between progress-bar updates),
    ``sw_overlap`` (sliding-window overlap for 3D validation).
    """

    dataset: str = "synthetic"
    root: str | None = None
    task: str | None = None
    dataset_options: dict = field(default_factory=dict)
    train_split: str | None = "train"
    val_split: str | None = "val"
    val_fraction: float | None = None
    method: str = "ordinal"
    rps_weight: float = 1.0
    majority: int | None = None
    fusion_options: dict = field(default_factory=dict)
    arch: str = "auto"
    encoder: str = "resnet18"
    encoder_weights: str | None = None
    model_options: dict = field(default_factory=dict)
    spatial_dims: int | None = None
    patch_size: tuple[int, ...] | int | None = None
    fg_prob: float = 0.33
    patches_per_image: int = 1
    augment: bool = True
    prior_bias: bool = True
    epochs: int = 10
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    grad_clip: float | None = None
    max_steps_per_epoch: int | None = None
    seed: int = 0
    out_dir: str | None = None
    resume: bool = False
    amp: str = "auto"
    device: str = "auto"
    num_workers: int = 0
    log_every: int = 10
    sw_overlap: float = 0.5

    def to_dict(self) -> dict:
        """A plain dict (numbers, strings, tuples, lists, dicts), loadable with ``weights_only=True``."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Rebuild from :meth:`to_dict` output; unknown keys are ignored (checkpoints of newer versions)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if isinstance(kwargs.get("patch_size"), list):
            kwargs["patch_size"] = tuple(kwargs["patch_size"])
        return cls(**kwargs)

    def validate(self) -> None:
        """Raise ``ValueError``/``TypeError`` naming the first bad field."""
        from orcal.fusion import METHODS

        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        for name in ("epochs", "batch_size", "patches_per_image", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.max_steps_per_epoch is not None and (not isinstance(self.max_steps_per_epoch, int)
                                                     or self.max_steps_per_epoch < 1):
            raise ValueError(f"max_steps_per_epoch must be a positive int or None, got {self.max_steps_per_epoch!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {self.num_workers!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not self.rps_weight >= 0:
            raise ValueError(f"rps_weight must be >= 0, got {self.rps_weight!r}")
        if not 0.0 <= self.fg_prob <= 1.0:
            raise ValueError(f"fg_prob must be in [0, 1], got {self.fg_prob!r}")
        if not 0.0 <= self.sw_overlap < 1.0:
            raise ValueError(f"sw_overlap must be in [0, 1), got {self.sw_overlap!r}")
        if self.spatial_dims not in (None, 2, 3):
            raise ValueError(f"spatial_dims must be 2, 3 or None (from the data), got {self.spatial_dims!r}")
        if self.resume and self.out_dir is None:
            raise ValueError("resume=True needs out_dir (where the checkpoint to resume from lives)")
        if self.out_dir is not None and Path(self.out_dir).exists() and not Path(self.out_dir).is_dir():
            raise ValueError(f"out_dir {self.out_dir} is an existing file, not a folder for checkpoints")
        ops.check_real("rps_weight", self.rps_weight)
        if self.majority is not None:
            ops.check_int("majority", self.majority, 1)
        if not isinstance(self.dataset_options, dict) or not isinstance(self.fusion_options, dict) \
                or not isinstance(self.model_options, dict):
            raise TypeError("dataset_options, fusion_options and model_options must be dicts")

    @property
    def head(self) -> str:
        """``"ordinal"`` for the ordinal method, else ``"binary"``."""
        return "ordinal" if self.method == "ordinal" else "binary"


@dataclass
class TrainResult:
    """What :func:`train` returns. ``model`` holds the selected (best) weights, in eval mode, unwrapped."""

    model: nn.Module
    config: TrainConfig
    history: list[dict]
    best_epoch: int
    checkpoint_path: str | None
    num_raters: int
    head: str
    best_val_loss: float | None = None
    spatial_dims: int = 2
    in_channels: int = 1


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_plain(v) for v in obj)
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"config values must be plain (numbers, strings, lists, dicts), got {type(obj).__name__}")


# --- seeds and RNG state --------------------------------------------------------------------------------

def _mix(*parts: int) -> int:
    """A well-spread 63-bit seed from several integers (stable across runs and machines)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, torch.Tensor]:
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


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
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


# --- checkpoints ----------------------------------------------------------------------------------------

def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the target folder, then ``os.replace``: readers see the old file
    or the complete new one, never a partial write; on failure the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a checkpoint gets a normal file's mode
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


#: What a ``last.pt`` holds beyond the weights: everything :func:`train` needs to resume.
RESUME_KEYS = ("optimizer", "rng", "epoch", "history", "best_val", "best_epoch", "best_model", "config")


def _load_checkpoint(path: str | os.PathLike, required: Sequence[str] = ()) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"checkpoint {path} could not be read as an orcal checkpoint: {err}") from err
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_spec" not in ckpt:
        raise ValueError(f"checkpoint {path} is not an orcal checkpoint (no 'model' / 'model_spec')")
    missing = [key for key in required if key not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {path} is incomplete: it lacks {', '.join(missing)}"
                         + (" (a best.pt holds weights only; resume needs last.pt)" if "optimizer" in missing else ""))
    return ckpt


def _load_weights(model: nn.Module, state: dict, path: Path) -> None:
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise ValueError(f"checkpoint {path} does not fit its own model (missing or wrong-shaped weights): "
                         f"{str(err).splitlines()[0]}") from err


def clean_stale_temporaries(out_dir: Path) -> list[Path]:
    """Remove the temporary files that a checkpoint write killed midway left in ``out_dir`` (see
    :func:`atomic_save`); returns what was removed."""
    removed = []
    for name in (LAST, BEST):
        for tmp in out_dir.glob(f".{name}.*.tmp"):
            try:
                tmp.unlink()
                removed.append(tmp)
            except OSError:
                pass
    return removed


def cosine_lr(base_lr: float, epoch: int, epochs: int) -> float:
    """The learning rate of epoch ``epoch`` (0-based) of ``epochs``: cosine decay from ``base_lr`` towards 0.

    Closed form, so extending a finished run continues the curve over the new length instead of staying at 0.
    """
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def _model_from_spec(spec: dict) -> nn.Module:
    opts = dict(spec.get("model_options", {}))
    model = build_model(spec["arch"], encoder=spec.get("encoder", "resnet18"), in_channels=spec["in_channels"],
                        spatial_dims=spec["spatial_dims"], encoder_weights=None, head=spec["head"],
                        num_raters=spec["num_raters"], **opts)
    model.orcal_spec = dict(spec)
    return model


def load_model(checkpoint_path: str | os.PathLike, device: str | torch.device = "cpu"
               ) -> tuple[nn.Module, TrainConfig]:
    """Load a model written by :func:`train` (``best.pt`` or ``last.pt``: the weights stored under ``model``).

    Returns ``(model, config)``: the model in eval mode on ``device`` with ``model.orcal_spec`` (arch, head,
    num_raters, in_channels, spatial_dims), and the run's :class:`TrainConfig`.
    """
    ckpt = _load_checkpoint(checkpoint_path)
    try:
        model = _model_from_spec(ckpt["model_spec"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"checkpoint {checkpoint_path} is incomplete: its model_spec lacks {err}") from err
    _load_weights(model, ckpt["model"], Path(checkpoint_path))
    model.to(_resolve_device(device)).eval()
    return model, TrainConfig.from_dict(ckpt.get("config", {}))


# --- devices, precision, distributed --------------------------------------------------------------------

@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False  # this call created the process group (and destroys it)

    @property
    def main(self) -> bool:
        return self.rank == 0


def _resolve_device(device: str | torch.device, local_rank: int = 0) -> torch.device:
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


def _setup_distributed(device: str) -> tuple[_Dist, torch.device]:
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_available() and dist.is_initialized():
        info = _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), False)
    elif world > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        dev = _resolve_device(device, local_rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        info = _Dist(dist.get_rank(), dist.get_world_size(), local_rank, True)
    else:
        info = _Dist()
    dev = _resolve_device(device, info.local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return info, dev


def _autocast(amp: str, device: torch.device):
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _all_reduce(values: Sequence[float], info: _Dist, device: torch.device) -> list[float]:
    if info.world == 1:
        return [float(v) for v in values]
    import torch.distributed as dist

    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# --- data -----------------------------------------------------------------------------------------------

class _SeededView(Dataset):
    """Training view of a dataset: ``repeats`` passes per epoch, each sample transformed with a generator
    seeded by (seed, epoch, index), so augmentation is reproducible whatever the workers or ranks."""

    def __init__(self, base: Dataset, make_transform: Callable[[torch.Generator], Callable] | None,
                 seed: int, repeats: int = 1):
        self.base, self.make_transform, self.seed, self.repeats = base, make_transform, seed, repeats
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base) * self.repeats

    def __getitem__(self, index: int) -> dict:
        item = self.base[index % len(self.base)]
        if self.make_transform is None:
            return item
        g = torch.Generator().manual_seed(_mix(self.seed, self.epoch, index, 17))
        return self.make_transform(g)(item)


def _training_transform(patch_size: tuple[int, ...] | None, fg_prob: float, augment: bool):
    from orcal.data.transforms import Compose, RandomFlip, RandomPatch

    if patch_size is None and not augment:
        return None

    def make(g: torch.Generator) -> Callable:
        steps: list[Callable] = []
        if patch_size is not None:
            steps.append(RandomPatch(patch_size, fg_prob=fg_prob, generator=g))
        if augment:
            steps.append(RandomFlip(generator=g))
        return Compose(steps)

    return make


def collate(items: Sequence[dict]) -> dict:
    """Stack item dicts into a batch (:func:`orcal.data.collate`); images of different sizes are first
    zero-padded to the largest, the padding marked invalid. Every item must have the same number of raters."""
    from orcal.data import collate as stack
    from orcal.data.transforms import pad_to

    raters = {int(it["masks"].shape[0]) for it in items}
    if len(raters) > 1:
        raise ValueError(f"a batch mixes images with different numbers of raters {sorted(raters)}; training "
                         "needs one R (use batch_size=1 for evaluation, or filter the dataset)")
    shapes = {tuple(it["masks"].shape[1:]) for it in items}
    if len(shapes) > 1:
        size = tuple(max(s[i] for s in shapes) for i in range(len(next(iter(shapes)))))
        items = [pad_to(it, size) for it in items]
    return stack(items)


def _load_datasets(cfg: TrainConfig) -> tuple[Dataset, Dataset | None]:
    from orcal.data import load_dataset

    opts = dict(cfg.dataset_options)
    if cfg.val_fraction is not None:
        opts["val_fraction"] = cfg.val_fraction
    train_ds = load_dataset(cfg.dataset, cfg.root, split=cfg.train_split, task=cfg.task, **opts)
    val_ds = None
    if cfg.val_split is not None:
        val_ds = load_dataset(cfg.dataset, cfg.root, split=cfg.val_split, task=cfg.task, **opts)
    return train_ds, val_ds


def _fusion_options(method: str, options: dict) -> dict:
    """Options of ``method``'s strategy; options meant for other strategies are dropped, unknown ones refused
    (so one options dict can drive every method of an experiment)."""
    from orcal import fusion

    def params(name: str) -> set[str]:
        fn = getattr(fusion, "random_rater" if name == "random" else name)
        return {p for p in inspect.signature(fn).parameters
                if p not in ("masks", "seed", "generator", "return_performance")}

    known = set().union(*(params(m) for m in fusion.METHODS))
    unknown = set(options) - known
    if unknown:
        raise ValueError(f"fusion_options {sorted(unknown)} are not options of any strategy; known: {sorted(known)}")
    mine = params(method)
    return {k: v for k, v in options.items() if k in mine}


def _target(method: str, masks: torch.Tensor, options: dict, generator: torch.Generator) -> torch.Tensor:
    from orcal.fusion import make_target

    if method == "random":
        return make_target(method, masks, generator=generator, **options)
    return make_target(method, masks, **options)


# --- forward passes -------------------------------------------------------------------------------------

def _infer_logits(model: nn.Module, image: torch.Tensor, spatial_dims: int, patch_size: tuple[int, ...] | None,
                  overlap: float, amp: str, device: torch.device, sw_batch: int = 2) -> torch.Tensor:
    """Logits for whole images: one forward pass in 2D (and small 3D), blended sliding windows in 3D."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        with _autocast(amp, device):
            return model(x).float()

    needs_window = spatial_dims == 3 and patch_size is not None and \
        any(n > s for n, s in zip(image.shape[2:], patch_size))
    if not needs_window:
        return forward(image)
    from orcal.data.transforms import sliding_window_inference

    return sliding_window_inference(image, forward, patch_size, overlap=overlap, batch_size=sw_batch)


class _Objective:
    """The training objective of a method: ordinal loss to ``k`` or BCE to the strategy's target."""

    def __init__(self, cfg: TrainConfig):
        from orcal.losses import OrdinalLoss, SoftBCELoss

        self.method = cfg.method
        self.options = _fusion_options(cfg.method, cfg.fusion_options)
        if cfg.majority is not None and cfg.method in ("median", "simple"):
            self.options.setdefault("majority", cfg.majority)  # one majority threshold for the whole run
        if cfg.method == "ordinal":
            self.mean = OrdinalLoss(cfg.rps_weight, cfg.majority, "mean")
            self.sum = OrdinalLoss(cfg.rps_weight, cfg.majority, "sum")
        else:
            self.mean, self.sum = SoftBCELoss("mean"), SoftBCELoss("sum")

    def __call__(self, logits: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor | None,
                 generator: torch.Generator, reduction: str = "mean") -> torch.Tensor:
        target = _target(self.method, masks, self.options, generator)
        fn = self.mean if reduction == "mean" else self.sum
        return fn(logits.float(), target, valid)


def _to(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    nb = device.type == "cuda"
    valid = batch.get("valid")
    return (batch["image"].to(device, non_blocking=nb), batch["masks"].to(device, non_blocking=nb),
            None if valid is None else valid.to(device, non_blocking=nb))


@torch.no_grad()
def _validate(model: nn.Module, val_ds: Dataset, cfg: TrainConfig, objective: _Objective, spatial_dims: int,
              patch: tuple[int, ...] | None, info: _Dist, device: torch.device, epoch_progress: bool) -> float:
    """Mean loss over every valid voxel of the validation set, summed over ranks."""
    model.eval()
    indices = list(range(info.rank, len(val_ds), info.world))
    bs = cfg.batch_size if spatial_dims == 2 else 1
    loader = DataLoader(Subset(val_ds, indices), batch_size=bs, shuffle=False, num_workers=cfg.num_workers,
                        collate_fn=collate)
    total = count = 0.0
    bar = loader
    if epoch_progress:
        from tqdm.auto import tqdm

        bar = tqdm(loader, desc="  validation", leave=False, unit="batch")
    for j, batch in enumerate(bar):
        image, masks, valid = _to(batch, device)
        logits = _infer_logits(model, image, spatial_dims, patch, cfg.sw_overlap, cfg.amp, device)
        # the random rater of validation images is fixed (seeded per batch), the same every epoch
        g = torch.Generator().manual_seed(_mix(cfg.seed, 99, info.rank, j))
        total += float(objective(logits, masks, valid, g, reduction="sum"))
        count += float(masks[:, 0].numel() if valid is None else valid.sum())
    total, count = _all_reduce([total, count], info, device)
    return total / count if count > 0 else float("nan")


# --- training -------------------------------------------------------------------------------------------

def _probe(ds: Dataset) -> tuple[int, int, int]:
    if len(ds) == 0:
        raise ValueError("the training set is empty")
    item = ds[0]
    masks, image = item["masks"], item["image"]
    if masks.ndim not in (3, 4):
        raise ValueError(f"items must hold masks (R, H, W) or (R, D, H, W), got {tuple(masks.shape)}")
    return int(image.shape[0]), int(masks.ndim - 1), int(masks.shape[0])


def _label_prior(ds: Dataset, head: str, num_raters: int, max_items: int = 64) -> torch.Tensor:
    """Output bias that reproduces the label frequencies of (up to ``max_items`` evenly spaced) training items.

    Ordinal head: log-frequency of each vote count 0..R, so the initial softmax is the empirical distribution.
    Binary head: logit of the mean vote fraction.
    """
    step = max(1, len(ds) // max_items)
    counts = torch.zeros(num_raters + 1, dtype=torch.float64)
    for i in range(0, len(ds), step):
        item = ds[i]
        k = item["masks"].to(torch.int64).sum(0)
        if item.get("valid") is not None:
            k = k[item["valid"]]
        counts += torch.bincount(k.reshape(-1), minlength=num_raters + 1)[: num_raters + 1].double()
    freq = (counts + 1.0) / (counts.sum() + num_raters + 1)  # add-one: no level starts impossible
    if head == "ordinal":
        return torch.log(freq).float()
    mean = float((freq * torch.arange(num_raters + 1)).sum() / num_raters)
    return torch.tensor([math.log(mean / (1 - mean))], dtype=torch.float32)


def _model_spec(cfg: TrainConfig, in_channels: int, spatial_dims: int, num_raters: int) -> dict:
    arch = cfg.arch
    if arch == "auto":
        arch = "FPN" if spatial_dims == 2 else "unet3d"
    return {"arch": arch, "encoder": cfg.encoder, "in_channels": in_channels, "spatial_dims": spatial_dims,
            "head": cfg.head, "num_raters": num_raters, "model_options": _plain(cfg.model_options),
            "majority": cfg.majority}


def train(config: TrainConfig, progress: bool = True, train_dataset: Dataset | None = None,
          val_dataset: Dataset | None = None, callback: Callable[[int, int, float], None] | None = None
          ) -> TrainResult:
    """Train a model as ``config`` says and return the selected model with its history.

    Args:
        config: the run (:class:`TrainConfig`).
        progress: show tqdm progress bars (rank 0 only).
        train_dataset, val_dataset: datasets to use instead of loading ``config.dataset`` (items as
            :mod:`orcal.data` returns them); when ``train_dataset`` is given, validation uses ``val_dataset``
            only (None: no validation).
        callback: called as ``callback(epoch, step, loss)`` after every optimiser step (0-based epoch and step).

    Returns:
        :class:`TrainResult`; ``history`` has one dict per epoch (``epoch`` 1-based, ``train_loss``,
        ``val_loss``, ``lr``, ``seconds``).
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    cfg = copy.deepcopy(config)
    cfg.validate()
    info, device = _setup_distributed(cfg.device)
    import torch.distributed as dist

    try:
        result = _train(cfg, progress, train_dataset, val_dataset, callback, info, device)
        if info.owned:
            # Tear the group down together: a gloo rank that destroys it while rank 0 still writes checkpoints
            # can abort at exit ("terminate called without an active exception").
            dist.barrier()
        return result
    finally:
        if info.owned:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, progress: bool, train_ds: Dataset | None, val_ds: Dataset | None,
           callback: Callable | None, info: _Dist, device: torch.device) -> TrainResult:
    seed_everything(cfg.seed)
    if train_ds is None:
        train_ds, val_ds = _load_datasets(cfg)
    in_channels, spatial_dims, num_raters = _probe(train_ds)
    if cfg.spatial_dims is not None and cfg.spatial_dims != spatial_dims:
        raise ValueError(f"spatial_dims={cfg.spatial_dims} but the data is {spatial_dims}D")
    patch = as_tuple(cfg.patch_size, spatial_dims)
    spec = _model_spec(cfg, in_channels, spatial_dims, num_raters)
    model = build_model(spec["arch"], encoder=cfg.encoder, in_channels=in_channels, spatial_dims=spatial_dims,
                        encoder_weights=cfg.encoder_weights, head=cfg.head, num_raters=num_raters,
                        **cfg.model_options).to(device)
    model.orcal_spec = dict(spec)
    if cfg.prior_bias:  # a resumed run overwrites it with the checkpoint's weights below
        init_output_bias(model, _label_prior(train_ds, cfg.head, num_raters))
    objective = _Objective(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    out_dir = Path(cfg.out_dir) if cfg.out_dir is not None else None
    if out_dir is not None and info.main:
        clean_stale_temporaries(out_dir)
    start_epoch, best_val, best_epoch, history = 0, math.inf, 0, []
    best_state: dict[str, torch.Tensor] | None = None
    if cfg.resume and out_dir is not None and (out_dir / LAST).is_file():
        path = out_dir / LAST
        ckpt = _load_checkpoint(path, RESUME_KEYS)
        _check_resumable(ckpt, spec, cfg, path)
        _load_weights(model, ckpt["model"], path)
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
            _set_rng_state(ckpt["rng"])
        except (KeyError, ValueError, RuntimeError, TypeError) as err:
            raise ValueError(f"checkpoint {path} is incomplete or damaged: {err}") from err
        start_epoch, history = int(ckpt["epoch"]), list(ckpt["history"])
        best_val, best_epoch = float(ckpt["best_val"]), int(ckpt["best_epoch"])
        best_state = ckpt["best_model"]
        if info.main and progress:
            print(f"resuming from {path} after epoch {start_epoch}")
            done = int(ckpt["config"].get("epochs", start_epoch))
            if cfg.epochs != done:
                print(f"extending the run from {done} to {cfg.epochs} epochs: from epoch {start_epoch + 1} on the "
                      f"learning rate follows the cosine schedule over {cfg.epochs} epochs")
    elif cfg.resume and out_dir is not None and (out_dir / BEST).is_file():
        raise ValueError(f"cannot resume: {out_dir} holds {BEST} (the selected weights) but no {LAST} (the training "
                         f"state); training again would overwrite {out_dir / BEST}. Use another --out, or remove it")
    elif cfg.resume and info.main and progress:
        print(f"no checkpoint in {out_dir} to resume from; starting a new run")

    net: nn.Module = model
    if info.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    from torch.utils.data.distributed import DistributedSampler

    view = _SeededView(train_ds, _training_transform(patch, cfg.fg_prob, cfg.augment), cfg.seed,
                       cfg.patches_per_image)
    sampler = DistributedSampler(view, num_replicas=info.world, rank=info.rank, shuffle=True, seed=cfg.seed)
    # A last batch of one image breaks BatchNorm (smp encoders) at a 1x1 bottleneck: drop a ragged last batch
    # when an epoch has more than one; the permutation changes every epoch, so every image is still seen.
    loader = DataLoader(view, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                        collate_fn=collate, pin_memory=device.type == "cuda",
                        drop_last=len(sampler) > cfg.batch_size, generator=torch.Generator().manual_seed(cfg.seed))
    show = progress and info.main
    steps = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        view.set_epoch(epoch)
        target_gen = torch.Generator().manual_seed(_mix(cfg.seed, epoch, info.rank, 7))
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(cfg.lr, epoch, cfg.epochs)
        net.train()
        loss_sum, n_steps = 0.0, 0
        bar = None
        if show:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", leave=False)
        for step, batch in enumerate(loader):
            if step >= steps:
                break
            image, masks, valid = _to(batch, device)
            with _autocast(cfg.amp, device):
                logits = net(image)
            loss = objective(logits, masks, valid, target_gen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"the training loss became {value} at epoch {epoch + 1}, step {step + 1}; "
                                         "lower the learning rate or check the data")
            loss_sum, n_steps = loss_sum + value, n_steps + 1
            if bar is not None:
                bar.update(1)
                if step % cfg.log_every == 0 or step + 1 == steps:
                    bar.set_postfix(loss=f"{loss_sum / n_steps:.4f}")
            if callback is not None:
                callback(epoch, step, value)
        if bar is not None:
            bar.close()
        train_loss = _all_reduce([loss_sum, n_steps], info, device)
        train_loss = train_loss[0] / max(train_loss[1], 1)
        val_loss = None
        if val_ds is not None and len(val_ds) > 0:
            val_loss = _validate(model, val_ds, cfg, objective, spatial_dims, patch, info, device, show)
        lr = optimizer.param_groups[0]["lr"]
        record = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss, "lr": lr,
                  "seconds": time.perf_counter() - t0}
        history.append(record)
        score = val_loss if val_loss is not None and math.isfinite(val_loss) else None
        improved = best_state is None or score is None or score < best_val
        if improved:
            best_val = score if score is not None else math.inf
            best_epoch = epoch + 1
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        if info.main and out_dir is not None:
            if improved:
                atomic_save({"version": CHECKPOINT_VERSION, "model": best_state, "model_spec": spec,
                             "config": cfg.to_dict(), "epoch": epoch + 1, "val_loss": val_loss}, out_dir / BEST)
            atomic_save({"version": CHECKPOINT_VERSION, "model": model.state_dict(), "model_spec": spec,
                         "config": cfg.to_dict(), "optimizer": optimizer.state_dict(),
                         "rng": _rng_state(), "epoch": epoch + 1,
                         "history": history, "best_val": best_val, "best_epoch": best_epoch,
                         "best_model": best_state}, out_dir / LAST)
        if show:
            shown = "-" if val_loss is None else f"{val_loss:.4f}"
            print(f"epoch {epoch + 1}/{cfg.epochs}: train loss {train_loss:.4f}, val loss {shown}, "
                  f"{record['seconds']:.1f} s" + (" *" if improved else ""))

    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return TrainResult(model=model, config=cfg, history=history, best_epoch=best_epoch,
                       checkpoint_path=str(out_dir / BEST) if out_dir is not None else None,
                       num_raters=num_raters, head=cfg.head,
                       best_val_loss=best_val if math.isfinite(best_val) else None,
                       spatial_dims=spatial_dims, in_channels=in_channels)


#: Settings that may differ when a run is resumed: where and how it runs, and (extending it) its length.
RESUME_MAY_CHANGE = frozenset({"epochs", "resume", "out_dir", "root", "device", "amp", "num_workers", "log_every"})


def _check_resumable(ckpt: dict, spec: dict, cfg: TrainConfig, path: Path) -> None:
    """Refuse to resume a run under settings other than its own, naming the first that differs."""
    old = ckpt["model_spec"]
    for key in ("arch", "encoder", "in_channels", "spatial_dims", "head", "num_raters"):
        if old.get(key) != spec.get(key):
            raise ValueError(f"cannot resume {path}: it was trained with {key}={old.get(key)!r}, this run has "
                             f"{key}={spec.get(key)!r}")
    old_cfg, new_cfg = ckpt["config"], cfg.to_dict()
    for key in sorted(set(new_cfg) - RESUME_MAY_CHANGE):
        if key in old_cfg and old_cfg[key] != new_cfg[key]:
            raise ValueError(f"cannot resume {path}: it was trained with {key}={old_cfg[key]!r}, this run has "
                             f"{key}={new_cfg[key]!r}. Resume with the run's own settings (only "
                             f"{', '.join(sorted(RESUME_MAY_CHANGE - {'resume'}))} may change), or start a new run "
                             "in another folder")
    done = int(ckpt["epoch"])
    if cfg.epochs < done:
        raise ValueError(f"cannot resume {path}: it has already trained {done} epochs, more than epochs="
                         f"{cfg.epochs}; pass epochs >= {done}")


# --- prediction -----------------------------------------------------------------------------------------

def predict(model_or_result: nn.Module | TrainResult, dataset: Dataset, head: str | None = None,
            readout: str = "majority", majority: int | None = None, device: str | torch.device = "auto",
            patch_size: int | Sequence[int] | None = None, batch_size: int = 2, overlap: float = 0.5,
            amp: str = "auto", progress: bool = False
            ) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Foreground probabilities for every item of ``dataset``, one image at a time.

    Args:
        model_or_result: a :class:`TrainResult` (head, majority and 3D patch size taken from it) or a model.
        dataset: items ``{"image", "masks", "id"[, "valid"]}``.
        head: ``"ordinal"`` or ``"binary"``; default from the result or ``model.orcal_spec``.
        readout: ``"majority"`` or ``"expected"`` (ordinal head).
        majority: majority threshold of the readout; default the training run's (``R // 2 + 1``).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...; the model is moved there.
        patch_size: sliding-window tile size for 3D (default: the training patch size); 2D images go
            through whole.
        batch_size: tiles per forward pass of the sliding window.
        overlap: sliding-window overlap.
        amp: ``"auto"`` (bfloat16 on CUDA), ``"bf16"`` or ``"off"``.

    Yields:
        ``(id, p, masks, valid)``: ``p`` ``(*S)`` float32 on the CPU, ``masks`` ``(R, *S)`` uint8, ``valid``
        ``(*S)`` bool or None.
    """
    if isinstance(model_or_result, TrainResult):
        res = model_or_result
        model = res.model
        head = head or res.head
        if majority is None:
            majority = res.config.majority
        if patch_size is None and res.spatial_dims == 3:
            patch_size = res.config.patch_size
    elif isinstance(model_or_result, nn.Module):
        model = model_or_result
        spec = getattr(model, "orcal_spec", {})
        head = head or spec.get("head")
        if majority is None:
            majority = spec.get("majority")
    else:
        raise TypeError(f"model_or_result must be an nn.Module or a TrainResult, got {type(model_or_result).__name__}")
    if head is None:
        raise ValueError("head must be given ('ordinal' or 'binary') for a model without orcal_spec")
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {AMP_MODES}, got {amp!r}")
    dev = _resolve_device(device)
    model.to(dev).eval()
    it: Any = range(len(dataset))
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="predict", unit="image")
    for i in it:
        item = dataset[i]
        masks = item["masks"]
        spatial_dims = masks.ndim - 1
        patch = as_tuple(patch_size, spatial_dims) if spatial_dims == 3 else None
        with torch.no_grad():
            logits = _infer_logits(model, item["image"][None].to(dev), spatial_dims, patch, overlap, amp, dev,
                                   sw_batch=batch_size)
            p = probability(logits, head, readout=readout, majority=majority)[0]
        yield str(item.get("id", i)), p.float().cpu(), masks, item.get("valid")
