"""What an experiment is: its datasets, methods and settings (:class:`ExperimentConfig`, the presets), and the
runs it plans (one per method, plus the sweeps of the RPS weight and the smoothing width), each with a fingerprint
of what its result depends on.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from orcal import fusion
from orcal.heads import Head

#: Version of the per-run results files; a different version is recomputed.
RESULTS_VERSION = 2

#: The grids ``select_on_val`` searches when none is given: the smoothing width σ (voxels) of the strategies
#: that take one, and the RPS weight λ of the ordinal method (the paper chose both on the validation set; the λ
#: grid is log-spaced up to 16: the RPS term is normalised by R (SPEC §3), and weights of 4-16 beat 2 on the
#: demo and on LIDC; the criterion is the validation MR-ECE alone); and, for the calibration losses
#: (``--methods calibration-losses``), the one setting of each that is chosen there: NACL's penalty weight,
#: hL1-ACE's weight, the label-smoothing ε and the focal γ (each grid holds its default).
SELECTION_GRIDS = {"sigma": (0.5, 1.0, 2.0), "rps_weight": (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0),
                   "nacl_alpha": (0.01, 0.1, 1.0), "ace_weight": (0.5, 1.0, 2.0), "smoothing": (0.05, 0.1, 0.2),
                   "focal_gamma": (1.0, 2.0, 3.0)}

#: The settings chosen on validation by :data:`SELECTION_GRIDS` other than σ and λ (one per method at most).
_TUNED = ("nacl_alpha", "ace_weight", "smoothing", "focal_gamma")


def tuned_option(method: str) -> str | None:
    """The option of ``method`` other than σ and λ that ``select_on_val`` chooses (e.g. ``"focal_gamma"``)."""
    entry = fusion.get(method)
    return next((o for o in (*entry.options, *entry.loss_options) if o in _TUNED), None)


def option_default(method: str, option: str) -> float:
    """The default of ``option`` of ``method``: the default of its parameter in the loss or the strategy."""
    import inspect

    entry = fusion.get(method)
    for fn in (entry.loss, entry.fn):
        if fn is not None:
            param = inspect.signature(fn).parameters.get(option)
            if param is not None and param.default is not inspect.Parameter.empty:
                return float(param.default)
    raise ValueError(f"option {option!r} of method {method!r} has no default")


def expand_methods(methods) -> tuple[str, ...]:
    """``methods`` with each group name (:func:`orcal.fusion.groups`, e.g. ``calibration-losses``) replaced by
    its methods, without repeats."""
    groups = fusion.groups()
    out: list[str] = []
    for m in methods:
        for name in groups.get(m, (m,)):
            if name not in out:
                out.append(name)
    return tuple(out)


#: What the bootstrap resamples (SPEC §5): "group", the test images' groups where the dataset says which
#: images share a patient, case or volume (each image its own group where it does not), or "image".
BOOTSTRAP_UNITS = ("group", "image")


@dataclass
class DatasetSpec:
    """One dataset of an experiment: loader ``name``, optional ``task``, ``root`` and loader ``options``."""

    name: str
    task: str | None = None
    root: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    label: str | None = None

    @property
    def key(self) -> str:
        """Identifier used in file names and as the table column (``label`` when given)."""
        return self.label or (self.name if self.task is None else f"{self.name}:{self.task}")

    @classmethod
    def parse(cls, text: str, root: str | None = None, **options) -> DatasetSpec:
        """``"NAME"`` or ``"NAME:TASK"`` as given on the command line."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"dataset must be NAME or NAME:TASK, got {text!r}")
        name, _, task = text.strip().partition(":")
        from orcal.data import DATASETS

        if name not in DATASETS:
            raise ValueError(f"unknown dataset {name!r} (argument --dataset); valid datasets: {', '.join(DATASETS)}")
        return cls(name=name, task=task or None, root=root, options=dict(options))


@dataclass
class ExperimentConfig:
    """Everything an experiment depends on. Training fields go to :class:`orcal.train.TrainConfig`."""

    datasets: list[DatasetSpec]
    out: str = "orcal-experiment"
    methods: tuple[str, ...] = field(default_factory=fusion.default_names)  # every strategy outside a group
    rps_weight: float = 1.0
    rps_weights: tuple[float, ...] = ()
    arch: str = "FPN"
    encoder: str = "resnet18"
    encoder_weights: str | None = None
    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    max_steps: int | None = None
    patch_size: tuple[int, ...] | int | None = None
    seed: int = 0
    seeds: tuple[int, ...] = ()
    sigmas: tuple[float, ...] = ()
    select_on_val: bool = False
    temperature_scaling: bool = True
    device: str = "auto"
    amp: str = "auto"
    model_options: dict[str, Any] = field(default_factory=dict)
    fusion_options: dict[str, Any] = field(default_factory=dict)
    cache: bool = True
    threads: int | None = None
    n_boot: int = 1000
    fraction: float = 0.6
    bootstrap_by: str = "group"
    n_bins: int = 15
    auc_bins: int = 4096
    train_options: dict[str, Any] = field(default_factory=dict)
    #: ``alpha`` of the conformal columns (SPEC §12), calibrated on the validation split; None: none. Not part of
    #: the fingerprint (it adds results, changes none): a run recorded without them at this alpha is recomputed
    conformal: float | None = None
    force: bool = False
    progress: bool = True
    preset: str | None = None

    def __post_init__(self) -> None:
        if not self.datasets:
            raise ValueError("datasets must name at least one dataset (argument --dataset or --preset)")
        self.methods = expand_methods(self.methods)
        bad = [m for m in self.methods if m not in fusion.names()]
        if bad:
            raise ValueError(f"unknown method(s) {', '.join(bad)} (argument --methods); valid: "
                             f"{', '.join((*fusion.names(), *fusion.groups()))}")
        if not self.methods:
            raise ValueError("methods must name at least one method (argument --methods)")
        if int(self.epochs) < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_steps is not None and int(self.max_steps) < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if self.threads is not None and int(self.threads) < 1:
            raise ValueError(f"threads must be >= 1 or None, got {self.threads}")
        if int(self.n_boot) < 1:
            raise ValueError(f"n_boot must be >= 1, got {self.n_boot}")
        if not 0 < float(self.fraction) <= 1:
            raise ValueError(f"fraction must lie in (0, 1], got {self.fraction}")
        if self.bootstrap_by not in BOOTSTRAP_UNITS:
            raise ValueError(f"bootstrap_by must be one of {', '.join(BOOTSTRAP_UNITS)} (argument --bootstrap-by), "
                             f"got {self.bootstrap_by!r}")
        if self.conformal is not None:
            a = float(self.conformal)
            if not (math.isfinite(a) and 0 < a < 1):
                raise ValueError(f"conformal must lie in (0, 1), the tolerated risk or miscoverage (argument "
                                 f"--conformal ALPHA), got {self.conformal}")
            self.conformal = a
        for w in (self.rps_weight, *self.rps_weights):
            if not math.isfinite(float(w)) or float(w) < 0:
                raise ValueError(f"RPS weights must be finite and >= 0, got {w}")
        self.seeds = tuple(int(x) for x in self.seeds)
        if len(set(self.seeds)) != len(self.seeds) or any(x < 0 for x in self.seeds):
            raise ValueError(f"seeds must be distinct non-negative integers (argument --seeds), got {self.seeds}")
        self.rps_weights, self.sigmas = tuple(self.rps_weights), tuple(float(x) for x in self.sigmas)
        if any(not (math.isfinite(x) and x > 0) for x in self.sigmas):
            raise ValueError(f"smoothing widths must be finite and > 0 (argument --sigmas), got {self.sigmas}")
        if self.select_on_val:  # the grids to choose from are swept
            self.rps_weights = self.rps_weights or SELECTION_GRIDS["rps_weight"]
            self.sigmas = self.sigmas or SELECTION_GRIDS["sigma"]
        keys = [d.key for d in self.datasets]
        if len(set(keys)) != len(keys):
            raise ValueError(f"datasets must be distinct, got {keys}")

    @property
    def seed_list(self) -> tuple[int, ...]:
        """The training seeds: ``seeds``, or ``(seed,)`` when none is given. The first one runs the sweeps."""
        return self.seeds or (int(self.seed),)

    @property
    def sigma(self) -> float:
        """The smoothing width of the main runs (``fusion_options["sigma"]``, else the strategies' 1.0)."""
        return float(self.fusion_options.get("sigma", 1.0))


#: Named experiment settings. ``datasets`` entries are (name, task, options, label); a preset's root is the
#: ``--root`` argument (the dataset's folder, or for "paper" the folder holding each dataset's folder).
PRESETS: dict[str, dict[str, Any]] = {
    # The built-in synthetic data: small enough for a 2-core CPU in a few minutes.
    "demo": {
        "datasets": [("synthetic", None, {"n": 400, "R": 5, "shape": (48, 48), "test_fraction": 0.25,
                                          "val_fraction": 0.1}, "Synthetic (R=5)")],
        "arch": "unet-small", "encoder": "none", "model_options": {"base_channels": 8, "depth": 3},
        "epochs": 24, "batch_size": 16, "lr": 1e-2, "max_steps": None, "threads": 1,
        "n_boot": 1000,
    },
    # LIDC-IDRI slices (4 readers; --root is the LIDC-IDRI-slices folder), 64x64 centre crops, a small
    # U-Net, 400 steps per run, one thread: about 2 minutes a run on a CPU core, so that 3 seeds with
    # --select-on-val (33 runs) fit in 90 minutes.
    "lidc": {
        "datasets": [("lidc_slices", None, {"crop": 64}, "LIDC-IDRI")],
        "arch": "unet-small", "encoder": "none", "model_options": {"base_channels": 8, "depth": 3},
        "epochs": 8, "batch_size": 32, "lr": 1e-2, "max_steps": 50, "n_boot": 1000, "threads": 1,
    },
    # LIDC-IDRI nodules as volumes (the same folder as "lidc"): one nodule = 64x64xD (D = its slices, 1-42),
    # the built-in 3D U-Net on 8x64x64 patches, 200 steps per run, whole volumes evaluated through sliding
    # windows: about 40 minutes for every method on a 2-core CPU.
    "lidc3d": {
        "datasets": [("lidc_volumes", None, {"crop": 64}, "LIDC-IDRI 3D")],
        "arch": "unet3d", "encoder": "none", "model_options": {"base_channels": 8}, "patch_size": (8, 64, 64),
        "epochs": 4, "batch_size": 8, "lr": 1e-2, "max_steps": 50, "n_boot": 1000, "threads": 1,
    },
    # Several structures at once (SPEC §11): synthetic 3D volumes with three structures and three raters,
    # every method one-vs-rest per structure, per-structure tables and the volume uncertainty of §11.4;
    # 200 steps a run on 16x32x32 patches, about a minute a run on a 2-core CPU.
    "structures3d": {
        "datasets": [("synthetic", None, {"n": 120, "R": 3, "num_structures": 3, "shape": (24, 48, 48),
                                          "test_fraction": 0.25, "val_fraction": 0.1}, "Synthetic 3D (R=3, C=3)")],
        "arch": "unet3d", "encoder": "none", "model_options": {"base_channels": 8}, "patch_size": (16, 32, 32),
        "epochs": 10, "batch_size": 4, "lr": 1e-2, "max_steps": 20, "n_boot": 1000, "threads": 2,
    },
    # The paper's datasets (CoCaHis, REFUGE disc and cup, LongCIU) under one root folder.
    "paper": {
        "datasets": [("cocahis", None, {}, "CoCaHis", "cocahis"),
                     ("refuge", "disc", {}, "REFUGE-DISC", "refuge"),
                     ("refuge", "cup", {}, "REFUGE-CUP", "refuge"),
                     ("longciu", None, {}, "LongCIU", "longciu")],
        "arch": "FPN", "encoder": "resnet34", "encoder_weights": None, "epochs": 100, "batch_size": 8,
        "lr": 1e-4, "max_steps": None, "patch_size": (256, 256), "n_boot": 1000, "cache": False,
    },
}


def preset_config(name: str, root: str | None = None, **overrides) -> ExperimentConfig:
    """The :class:`ExperimentConfig` of preset ``name`` (see :data:`PRESETS`), with ``overrides`` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (argument --preset); valid presets: {', '.join(PRESETS)}")
    p = dict(PRESETS[name])
    entries = p.pop("datasets")
    default_root = p.pop("default_root", None)
    datasets = []
    for entry in entries:
        ds_name, task, options, label = entry[:4]
        sub = entry[4] if len(entry) > 4 else None
        ds_root = root if root is not None else default_root
        if sub is not None and ds_root is not None:
            ds_root = str(Path(ds_root) / sub)
        datasets.append(DatasetSpec(ds_name, task, ds_root, dict(options), label))
    p.update({k: v for k, v in overrides.items() if v is not None})
    return ExperimentConfig(datasets=datasets, preset=name, **p)


@dataclass(frozen=True)
class Run:
    """One model to train: a method, its RPS weight (ordinal method), its ``sigma`` (the strategies that smooth)
    and ``value``, the setting :func:`tuned_option` of a calibration loss."""

    method: str
    rps_weight: float
    key: str
    sigma: float | None = None
    value: float | None = None

    @property
    def head(self) -> Head:
        """The head the method trains (its strategy's, :mod:`orcal.fusion`)."""
        return Head(fusion.get(self.method).head)

    @property
    def readouts(self) -> tuple[str, ...]:
        """The readouts evaluated: both for an ordinal head (SPEC §2), the sigmoid of a binary one."""
        return self.head.readouts

    def row(self, readout: str) -> str:
        """The table row of one readout (:meth:`orcal.heads.Head.row`): ``"soft"``, ``"ordinal/expected"``,
        ``"ordinal/expected+ts"``."""
        return self.head.row(self.method, readout)

    @property
    def rows(self) -> list[str]:
        """Table rows this run produces (two readouts for the ordinal method), without temperature scaling."""
        return [self.row(r) for r in self.readouts]

    @property
    def parameter(self) -> tuple[str, float] | None:
        """The setting a sweep varies for this method (``("rps_weight", λ)`` or ``("sigma", σ)``), or None."""
        if fusion.get(self.method).head == "ordinal":
            return "rps_weight", self.rps_weight
        if "sigma" in fusion.get(self.method).options:
            return "sigma", self.sigma
        option = tuned_option(self.method)
        return None if option is None else (option, self.value)


def plan_runs(cfg: ExperimentConfig) -> tuple[list[Run], dict[float, Run]]:
    """The main runs (one per method) and the RPS-weight sweep runs (reusing the main ordinal run)."""
    main = [Run(m, float(cfg.rps_weight), m, cfg.sigma if _has_sigma(m) else None, _value(cfg, m))
            for m in cfg.methods]
    sweep: dict[float, Run] = {}
    for w in cfg.rps_weights:
        w = float(w)
        if "ordinal" in cfg.methods and w == float(cfg.rps_weight):
            sweep[w] = main[list(cfg.methods).index("ordinal")]
        else:
            sweep[w] = Run("ordinal", w, f"ordinal@{w:g}")
    return main, sweep


def _has_sigma(method: str) -> bool:
    return "sigma" in fusion.get(method).options


def _value(cfg: ExperimentConfig, method: str) -> float | None:
    """The main run's :func:`tuned_option` of ``method``: ``fusion_options``' value, else the default."""
    option = tuned_option(method)
    return None if option is None else float(cfg.fusion_options.get(option, option_default(method, option)))


def candidate_runs(cfg: ExperimentConfig) -> dict[str, list[Run]]:
    """Per method, the runs its rows may come from: with ``select_on_val``, the RPS-weight sweep for the ordinal
    method, the ``sigmas`` for the strategies that smooth and :data:`SELECTION_GRIDS` for the calibration
    losses' :func:`tuned_option`; otherwise (and for the other methods) the main
    run alone."""
    main, sweep = plan_runs(cfg)
    out: dict[str, list[Run]] = {}
    for run in main:
        runs = [run]
        if cfg.select_on_val and fusion.get(run.method).head == "ordinal" and sweep:
            runs = [sweep[w] for w in sorted(sweep)]
        elif cfg.select_on_val and _has_sigma(run.method) and cfg.sigmas:
            runs = [run if s == run.sigma else Run(run.method, run.rps_weight, f"{run.method}@sigma={s:g}", s)
                    for s in sorted(cfg.sigmas)]
        elif cfg.select_on_val and run.value is not None:
            option = tuned_option(run.method)
            runs = [run if v == run.value else Run(run.method, run.rps_weight, f"{run.method}@{option}={v:g}", None, v)
                    for v in sorted(SELECTION_GRIDS[option])]
        out[run.method] = runs
    return out


def fingerprint(cfg: ExperimentConfig, spec: DatasetSpec, run: Run, seed: int | None = None) -> str:
    """Hash of every setting a run's result depends on (a changed setting is recomputed); ``seed`` is the
    training seed of the run (default ``cfg.seed``)."""
    data = {
        "dataset": [spec.name, spec.task, spec.root, sorted((k, str(v)) for k, v in spec.options.items())],
        "run": [run.method, run.rps_weight, run.sigma] + ([] if run.value is None else [run.value])
        + ([] if (version := fusion.get(run.method).version) == 1 else [f"version {version}"]),
        "train": [cfg.arch, cfg.encoder, cfg.encoder_weights, cfg.epochs, cfg.batch_size, cfg.lr, cfg.max_steps,
                  cfg.patch_size, cfg.seed if seed is None else int(seed), cfg.amp]
        + [sorted((k, str(v)) for k, v in d.items()) for d in (cfg.model_options, cfg.fusion_options,
                                                               cfg.train_options)],
        "eval": [cfg.n_boot, cfg.fraction, cfg.n_bins, cfg.auc_bins, cfg.temperature_scaling],
        "version": RESULTS_VERSION,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cfg_with(cfg: ExperimentConfig, **changes) -> ExperimentConfig:
    """A copy of ``cfg`` with ``changes`` (None values are ignored)."""
    return replace(cfg, **{k: v for k, v in changes.items() if v is not None})
