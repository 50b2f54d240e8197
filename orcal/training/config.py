"""What defines a training run (:class:`TrainConfig`, stored in every checkpoint) and what it returns."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from orcal.ops.checks import check_int, check_real

AMP_MODES = ("auto", "bf16", "off")


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
        return plain(dataclasses.asdict(self))

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
        from orcal import fusion

        if self.method not in fusion.names():
            raise ValueError(f"method must be one of {', '.join(fusion.names())}, got {self.method!r}")
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
        if not check_real("lr", self.lr) > 0:
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        check_real("weight_decay", self.weight_decay)
        check_real("rps_weight", self.rps_weight)
        if not check_real("fg_prob", self.fg_prob) <= 1.0:
            raise ValueError(f"fg_prob must be in [0, 1], got {self.fg_prob!r}")
        if not check_real("sw_overlap", self.sw_overlap) < 1.0:
            raise ValueError(f"sw_overlap must be in [0, 1), got {self.sw_overlap!r}")
        if self.spatial_dims not in (None, 2, 3):
            raise ValueError(f"spatial_dims must be 2, 3 or None (from the data), got {self.spatial_dims!r}")
        if self.resume and self.out_dir is None:
            raise ValueError("resume=True needs out_dir (where the checkpoint to resume from lives)")
        if self.out_dir is not None and Path(self.out_dir).exists() and not Path(self.out_dir).is_dir():
            raise ValueError(f"out_dir {self.out_dir} is an existing file, not a folder for checkpoints")
        if self.majority is not None:
            check_int("majority", self.majority, 1)
        if not isinstance(self.dataset_options, dict) or not isinstance(self.fusion_options, dict) \
                or not isinstance(self.model_options, dict):
            raise TypeError("dataset_options, fusion_options and model_options must be dicts")

    @property
    def head(self) -> str:
        """The model head of the method's strategy: ``"ordinal"`` (R + 1 levels) or ``"binary"``."""
        from orcal import fusion

        return fusion.get(self.method).head


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
    num_structures: int | None = None  # C for several structures (SPEC §11), None for one


def plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(plain(v) for v in obj)
    if isinstance(obj, list):
        return [plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"config values must be plain (numbers, strings, lists, dicts), got {type(obj).__name__}")
