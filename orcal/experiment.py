"""The multi-rater experiment: train every strategy, evaluate on the held-out test split, write the report.

For each dataset and each method (SPEC §6 baselines and the ordinal method) this module trains a model with
:func:`orcal.train.train`, predicts the test split, accumulates per-image multi-rater statistics (SPEC §4),
bootstraps them (SPEC §5) and keeps one results file per run, so that an interrupted experiment resumes
where it stopped. The ordinal method is evaluated with both readouts (SPEC §2). Finally it writes the
tables (:mod:`orcal.report`), the figures and ``report.md`` / ``results.json``.

>>> import tempfile
>>> cfg = ExperimentConfig(datasets=[DatasetSpec("synthetic", options={"n": 24, "shape": (16, 16)})],
...                        methods=("soft", "ordinal"), arch="unet-small", epochs=1, max_steps=1, n_boot=20,
...                        out=tempfile.mkdtemp(), progress=False)
>>> results = run_experiment(cfg, log=lambda *args: None)
>>> sorted(results["runs"]["synthetic"])
['ordinal/expected', 'ordinal/majority', 'soft']
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orcal import report
from orcal.experiment_config import (  # noqa: F401  (the experiment's public names)
    ORDINAL_READOUTS,
    PRESETS,
    RESULTS_VERSION,
    DatasetSpec,
    ExperimentConfig,
    Run,
    cfg_with,
    fingerprint,
    plan_runs,
    preset_config,
)
from orcal.experiment_runs import (  # noqa: F401  (load_run_stats, load_case_maps: public names)
    jsonable,
    load_case_maps,
    load_run,
    load_run_stats,
    run_files,
    safe_name,
)
from orcal.training import runtime
from orcal.training.runtime import hardware_info

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
        "fingerprint": fingerprint(cfg, spec, run),
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
    device = resolve_device(cfg.device)
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
            fp = fingerprint(cfg, spec, run)
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
    write_outputs(results, cfg, records, cases, main_runs)
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


def resolve_device(device: str) -> str:
    """``"auto"`` is the GPU when there is one, else the CPU (as a string, e.g. ``"cuda:0"``)."""
    return str(runtime.resolve_device(device))


def predict_batches(result, dataset, readouts: Sequence[str], batch_size: int, device: str, amp: str = "auto"):
    """Yield ``(ids, {readout: p}, masks, valid)``: :func:`orcal.training.predict.predict_readouts`."""
    from orcal.training.predict import predict_readouts

    yield from predict_readouts(result, dataset, readouts, device=device, batch_size=batch_size, amp=amp)


def write_outputs(results: dict[str, Any], cfg: ExperimentConfig, records: Mapping[str, Mapping[str, dict]],
                  cases: Mapping[str, dict], main_runs: Sequence[Run], sweep_runs: Mapping | None = None) -> None:
    """Tables, figures, ``report.md`` and ``results.json`` under ``cfg.out`` (:func:`orcal.report.write_outputs`)."""
    out = Path(cfg.out)
    folders = [(spec.key, out / "runs" / safe_name(spec.key)) for spec in cfg.datasets]
    report.write_outputs(results, out, folders, records, cases, main_runs)


def __getattr__(name: str):
    if name == "METHODS":  # every registered strategy (orcal.fusion)
        from orcal import fusion

        return fusion.names()
    raise AttributeError(f"module 'orcal.experiment' has no attribute {name!r}")
