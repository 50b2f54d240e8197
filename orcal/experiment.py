"""The multi-rater experiment: train every strategy, evaluate on the held-out test split, write the report.

For each dataset and each method (SPEC §6 baselines and the ordinal method) this module trains a model with
:func:`orcal.train.train`, predicts the test split, accumulates per-image multi-rater statistics (SPEC §4),
bootstraps them (SPEC §5) and keeps one results file per run, so that an interrupted experiment resumes
where it stopped. The ordinal method is evaluated with both readouts (SPEC §2). Finally it writes the
tables (:mod:`orcal.report`), the figures and ``report.md`` / ``results.json``.

>>> cfg = ExperimentConfig(datasets=[DatasetSpec("synthetic", options={"n": 48})], out="exp", epochs=2)
>>> results = run_experiment(cfg)
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orcal import fusion, report
from orcal.experiment_runs import (
    RESULTS_VERSION,
    jsonable,
    load_run,
    run_files,
    safe_name,
)
from orcal.training.runtime import hardware_info, resolve_device

#: Readouts reported for the ordinal method (SPEC §2), the paper's first.
ORDINAL_READOUTS = ("majority", "expected")


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
    methods: tuple[str, ...] = field(default_factory=fusion.names)  # every registered strategy
    rps_weight: float = 1.0
    rps_weights: tuple[float, ...] = ()
    arch: str = "FPN"
    encoder: str = "resnet18"
    encoder_weights: str | None = None
    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    max_steps: int | None = None
    patch_size: tuple[int, ...] | None = None
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    model_options: dict[str, Any] = field(default_factory=dict)
    fusion_options: dict[str, Any] = field(default_factory=dict)
    cache: bool = True
    threads: int | None = None
    n_boot: int = 1000
    fraction: float = 0.6
    n_bins: int = 15
    auc_bins: int = 4096
    train_options: dict[str, Any] = field(default_factory=dict)
    force: bool = False
    progress: bool = True
    preset: str | None = None

    def __post_init__(self) -> None:
        if not self.datasets:
            raise ValueError("datasets must name at least one dataset (argument --dataset or --preset)")
        self.methods = tuple(self.methods)
        bad = [m for m in self.methods if m not in fusion.names()]
        if bad:
            raise ValueError(f"unknown method(s) {', '.join(bad)} (argument --methods); valid: "
                             f"{', '.join(fusion.names())}")
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
        for w in (self.rps_weight, *self.rps_weights):
            if not math.isfinite(float(w)) or float(w) < 0:
                raise ValueError(f"RPS weights must be finite and >= 0, got {w}")
        keys = [d.key for d in self.datasets]
        if len(set(keys)) != len(keys):
            raise ValueError(f"datasets must be distinct, got {keys}")


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
    # U-Net, 500 steps per method: about half an hour on 2 CPU cores.
    "lidc": {
        "datasets": [("lidc_slices", None, {"crop": 64}, "LIDC-IDRI")],
        "arch": "unet-small", "encoder": "none", "model_options": {"base_channels": 8, "depth": 3},
        "epochs": 10, "batch_size": 32, "lr": 1e-2, "max_steps": 50, "n_boot": 1000,
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


# --- runs ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    """One model to train: a method, and for the ordinal method its RPS weight."""

    method: str
    rps_weight: float
    key: str

    @property
    def readouts(self) -> tuple[str, ...]:
        """The readouts evaluated: both for an ordinal head (SPEC §2), the probability itself otherwise."""
        return ORDINAL_READOUTS if fusion.get(self.method).head == "ordinal" else ("majority",)

    def row(self, readout: str) -> str:
        """The table row of one readout: the method, or ``method/readout`` for an ordinal head."""
        return f"{self.method}/{readout}" if len(self.readouts) > 1 else self.method

    @property
    def rows(self) -> list[str]:
        """Table rows this run produces (two readouts for the ordinal method)."""
        return [self.row(r) for r in self.readouts]


def plan_runs(cfg: ExperimentConfig) -> tuple[list[Run], dict[float, Run]]:
    """The main runs (one per method) and the RPS-weight sweep runs (reusing the main ordinal run)."""
    main = [Run(m, float(cfg.rps_weight), m) for m in cfg.methods]
    sweep: dict[float, Run] = {}
    for w in cfg.rps_weights:
        w = float(w)
        if "ordinal" in cfg.methods and w == float(cfg.rps_weight):
            sweep[w] = main[list(cfg.methods).index("ordinal")]
        else:
            sweep[w] = Run("ordinal", w, f"ordinal@{w:g}")
    return main, sweep


def _fingerprint(cfg: ExperimentConfig, spec: DatasetSpec, run: Run) -> str:
    """Hash of every setting a run's result depends on (a changed setting is recomputed)."""
    data = {
        "dataset": [spec.name, spec.task, spec.root, sorted((k, str(v)) for k, v in spec.options.items())],
        "run": [run.method, run.rps_weight],
        "train": [cfg.arch, cfg.encoder, cfg.encoder_weights, cfg.epochs, cfg.batch_size, cfg.lr, cfg.max_steps,
                  cfg.patch_size, cfg.seed, cfg.amp] + [sorted((k, str(v)) for k, v in d.items()) for d in
                                                        (cfg.model_options, cfg.fusion_options, cfg.train_options)],
        "eval": [cfg.n_boot, cfg.fraction, cfg.n_bins, cfg.auc_bins],
        "version": RESULTS_VERSION,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --- data ------------------------------------------------------------------------------------------------

def load_split(spec: DatasetSpec, split: str):
    """The ``split`` of ``spec`` through :func:`orcal.data.load_dataset`."""
    from orcal.data import load_dataset

    return load_dataset(spec.name, spec.root, split=split, task=spec.task, **spec.options)


class CachedDataset(torch.utils.data.Dataset):
    """Every item of a dataset read (or generated) once and kept in memory, shared by all runs."""

    def __init__(self, dataset, desc: str = "", progress: bool = True):
        from tqdm.auto import tqdm

        self.items = [dataset[i] for i in tqdm(range(len(dataset)), desc=desc or "loading", unit="item",
                                                leave=False, disable=not progress)]
        for attr in ("num_raters", "R", "name"):
            if hasattr(dataset, attr):
                setattr(self, attr, getattr(dataset, attr))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return dict(self.items[index])


def pick_case(dataset, limit: int = 256) -> dict[str, Any]:
    """The test case shown in the qualitative figure: of (at most ``limit`` evenly spaced) cases, the one
    with the most voxels where raters disagree. For 3D cases, its slice (first spatial axis) with the most
    disagreement."""
    n = len(dataset)
    if n == 0:
        raise ValueError("the test split is empty")
    best = (-1, 0, None)
    for i in np.unique(np.linspace(0, n - 1, min(n, limit)).round().astype(int)):
        masks = dataset[int(i)]["masks"]
        k = masks.sum(0)
        amb = (k > 0) & (k < masks.shape[0])
        score = int(amb.sum())
        if score > best[0]:
            sl = int(amb.flatten(1).sum(1).argmax()) if amb.ndim == 3 else None
            best = (score, int(i), sl)
    item = dataset[best[1]]
    image, masks = item["image"], item["masks"]
    if best[2] is not None:
        image, masks = image[:, best[2]], masks[:, best[2]]
    return {"index": best[1], "id": item["id"], "slice": best[2], "image": image.float().numpy(),
            "votes": masks.sum(0).numpy().astype(np.int64), "num_raters": int(masks.shape[0])}


# --- training and evaluation -----------------------------------------------------------------------------

def _train_config(cfg: ExperimentConfig, spec: DatasetSpec, run: Run, out_dir: Path, device: str):
    """The :class:`orcal.train.TrainConfig` of one run."""
    from orcal.training.config import TrainConfig

    fields = {
        "dataset": spec.name, "root": spec.root, "task": spec.task, "dataset_options": dict(spec.options),
        "method": run.method, "rps_weight": run.rps_weight, "arch": cfg.arch, "encoder": cfg.encoder,
        "encoder_weights": cfg.encoder_weights, "epochs": int(cfg.epochs), "batch_size": int(cfg.batch_size),
        "lr": float(cfg.lr), "seed": int(cfg.seed), "out_dir": str(out_dir), "amp": str(cfg.amp),
        "device": device, "max_steps_per_epoch": cfg.max_steps, "patch_size": cfg.patch_size,
        "model_options": dict(cfg.model_options), "fusion_options": dict(cfg.fusion_options),
    }
    fields.update(cfg.train_options)
    unknown = set(fields) - set(TrainConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"training does not accept {', '.join(sorted(unknown))} (argument train_options)")
    tcfg = TrainConfig(**fields)
    tcfg.validate()
    return tcfg


def evaluate_run(result, test_ds, run: Run, cfg: ExperimentConfig, case: dict[str, Any], device: str
                 ) -> dict[str, Any]:
    """Predict the test split and return, per readout, the per-image statistics, the metrics, the
    confidence-vs-agreement table and the probability map of the qualitative case."""
    from orcal.metrics import MultiRaterCalibration
    from orcal.training.predict import predict_readouts

    readouts = run.readouts
    metrics = {r: MultiRaterCalibration(n_bins=cfg.n_bins, auc_bins=cfg.auc_bins, per_image=True, agreement=True)
               for r in readouts}
    case_maps: dict[str, np.ndarray] = {}
    for ids, probs, masks, valid in predict_readouts(result, test_ds, readouts, device=device,
                                                     batch_size=int(cfg.batch_size), amp=cfg.amp):
        masks = masks.cpu()
        valid = None if valid is None else valid.cpu()
        for r in readouts:
            metrics[r].update(probs[r], masks, valid=valid)
            if case["id"] in ids:
                p = probs[r][ids.index(case["id"])]
                case_maps[r] = (p if case["slice"] is None else p[case["slice"]]).numpy()
    out: dict[str, Any] = {}
    for r in readouts:
        values = metrics[r].compute()
        stats = metrics[r].stats()
        out[r] = {"stats": stats, "summary": report_bootstrap(stats, cfg), "agreement": values.get("agreement"),
                  "case_map": case_maps.get(r), "n_images": values["n_images"]}
    return out


def report_bootstrap(stats, cfg: ExperimentConfig) -> dict[str, dict[str, float]]:
    """Bootstrap summary of the per-image ``stats`` (SPEC §5) with the experiment's settings."""
    from orcal.ops import bootstrap

    return bootstrap(stats, n_boot=int(cfg.n_boot), fraction=float(cfg.fraction), seed=int(cfg.seed))


def execute_run(cfg: ExperimentConfig, spec: DatasetSpec, run: Run, run_dir: Path, splits: Mapping[str, Any],
                case: dict[str, Any], device: str) -> dict[str, Any]:
    """Train and evaluate one run on ``splits`` (train, val, test datasets), save its files, return its record."""
    from orcal.training.loop import train

    files = run_files(run_dir, run)
    t0 = time.perf_counter()
    tcfg = _train_config(cfg, spec, run, run_dir / "checkpoints" / safe_name(run.key), device)
    result = train(tcfg, progress=cfg.progress, train_dataset=splits["train"], val_dataset=splits["val"])
    test_ds = splits["test"]
    t1 = time.perf_counter()
    evaluated = evaluate_run(result, test_ds, run, cfg, case, device)
    t2 = time.perf_counter()
    history = getattr(result, "history", None)
    record = {
        "version": RESULTS_VERSION,
        "fingerprint": _fingerprint(cfg, spec, run),
        "dataset": spec.key,
        "method": run.method,
        "rps_weight": run.rps_weight,
        "key": run.key,
        "readouts": {r: {"summary": e["summary"], "agreement": e["agreement"], "n_images": e["n_images"]}
                     for r, e in evaluated.items()},
        "train_s": t1 - t0,
        "eval_s": t2 - t1,
        "best_epoch": getattr(result, "best_epoch", None),
        "epochs": cfg.epochs,
        "steps": cfg.epochs * _steps_per_epoch(len(splits["train"]), cfg),
        "history": history,
        "num_raters": getattr(result, "num_raters", None),
        "device": device,
        "hardware": hardware_info(device),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.save({r: e["stats"].as_dict() for r, e in evaluated.items()}, files["stats"])
    maps = {r: e["case_map"] for r, e in evaluated.items() if e["case_map"] is not None}
    np.savez_compressed(files["case"], **maps)
    tmp = Path(f"{files['json']}.tmp")
    tmp.write_text(json.dumps(jsonable(record), indent=1))
    tmp.replace(files["json"])  # the json is written last: its presence means the run is complete
    return json.loads(files["json"].read_text())


def _steps_per_epoch(n_train: int, cfg: ExperimentConfig) -> int:
    patches = int(cfg.train_options.get("patches_per_image", 1))
    steps = math.ceil(n_train * patches / int(cfg.batch_size))
    return steps if cfg.max_steps is None else min(steps, int(cfg.max_steps))


# --- the experiment --------------------------------------------------------------------------------------

def run_experiment(cfg: ExperimentConfig, command: str | None = None, log=print) -> dict[str, Any]:
    """Run (or resume) the experiment and write its tables, figures, ``report.md`` and ``results.json``
    under ``cfg.out``. Returns the results dictionary."""
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    device = str(resolve_device(cfg.device))
    if cfg.threads is not None and device == "cpu":
        # small networks gain little from intra-op threads, and lose a lot on a busy machine
        torch.set_num_threads(int(cfg.threads))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    main_runs, sweep_runs = plan_runs(cfg)
    all_runs = list(main_runs) + [r for r in sweep_runs.values() if r not in main_runs]
    results: dict[str, Any] = {
        "settings": _settings(cfg, device), "datasets": {}, "runs": {}, "sweeps": {}, "timings": {},
        "hardware": hardware_info(device), "command": command,
    }
    records: dict[str, dict[str, dict]] = {}
    cases: dict[str, dict] = {}
    total = len(cfg.datasets) * len(all_runs)
    bar = tqdm(total=total, desc="experiment", unit="run", disable=not cfg.progress)
    for spec in cfg.datasets:
        run_dir = out / "runs" / safe_name(spec.key)
        run_dir.mkdir(parents=True, exist_ok=True)
        splits = {s: load_split(spec, s) for s in ("train", "val", "test")}
        if cfg.cache:
            splits = {s: CachedDataset(ds, f"{spec.key} {s}", cfg.progress) for s, ds in splits.items()}
        test_ds = splits["test"]
        case = pick_case(test_ds)
        cases[spec.key] = case
        first = test_ds[0]
        results["datasets"][spec.key] = {
            "name": spec.name, "task": spec.task, "root": spec.root, "options": spec.options,
            "n_train": len(splits["train"]), "n_val": len(splits["val"]), "n_test": len(test_ds),
            "num_raters": int(first["masks"].shape[0]), "image_shape": list(first["image"].shape),
            "qualitative_case": case["id"],
        }
        records[spec.key] = {}
        for run in all_runs:
            bar.set_postfix_str(f"{spec.key} {run.key}")
            fp = _fingerprint(cfg, spec, run)
            record = None if cfg.force else load_run(run_dir, run, fp)
            if record is not None:
                log(f"[{spec.key}] {run.key}: finished earlier, reusing {run_files(run_dir, run)['json']}")
            else:
                log(f"[{spec.key}] {run.key}: training ({device})")
                record = execute_run(cfg, spec, run, run_dir, splits, case, device)
                s = record["readouts"][next(iter(record["readouts"]))]["summary"]
                log(f"[{spec.key}] {run.key}: MR-ECE {s['mr_ece']['mean']:.4f}, AUC {s['auc']['mean']:.4f} "
                    f"(train {record['train_s']:.0f} s, evaluate {record['eval_s']:.0f} s)")
            records[spec.key][run.key] = record
            bar.update(1)
    bar.close()
    for spec in cfg.datasets:
        recs = records[spec.key]
        rows: dict[str, Any] = {}
        for run in main_runs:
            for readout, entry in recs[run.key]["readouts"].items():
                rows[run.row(readout)] = entry["summary"]
        results["runs"][spec.key] = rows
        if sweep_runs:
            results["sweeps"][spec.key] = {f"{w:g}": {r: e["summary"] for r, e in recs[run.key]["readouts"].items()}
                                           for w, run in sorted(sweep_runs.items())}
        results["timings"][spec.key] = {run.key: {"train_s": recs[run.key]["train_s"],
                                                  "eval_s": recs[run.key]["eval_s"],
                                                  "epochs": recs[run.key].get("epochs"),
                                                  "steps": recs[run.key].get("steps"),
                                                  "best_epoch": recs[run.key].get("best_epoch")}
                                        for run in all_runs}
    trained_on = [rec["hardware"] for by in records.values() for rec in by.values() if rec.get("hardware")]
    if trained_on:  # what the runs were measured on, rather than what rendered the report
        results["hardware"] = trained_on[0]
    results["total_seconds"] = time.perf_counter() - start
    results["compute_seconds"] = sum(t["train_s"] + t["eval_s"] for by in results["timings"].values()
                                     for t in by.values())
    folders = [(spec.key, out / "runs" / safe_name(spec.key)) for spec in cfg.datasets]
    report.write_outputs(results, out, folders, records, cases, main_runs)
    return results


def _settings(cfg: ExperimentConfig, device: str) -> dict[str, Any]:
    d = asdict(cfg)
    d.pop("datasets")
    d.pop("out")
    d.pop("force")
    d.pop("progress")
    d["methods"] = ",".join(cfg.methods)
    d["rps_weights"] = ",".join(f"{w:g}" for w in cfg.rps_weights)
    d["device"] = device
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def cfg_with(cfg: ExperimentConfig, **changes) -> ExperimentConfig:
    """A copy of ``cfg`` with ``changes`` (None values are ignored)."""
    return replace(cfg, **{k: v for k, v in changes.items() if v is not None})
