"""One run of the experiment: train a strategy with :func:`orcal.train.train`, fit a temperature on the
validation split (SPEC §10), predict the test split, accumulate per-image multi-rater statistics (SPEC §4)
with their bootstrap (SPEC §5), and keep the run's files, so that an interrupted experiment resumes where it
stopped (:mod:`orcal.experiment.runs`).
"""

from __future__ import annotations

import json
import math
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orcal.experiment.config import RESULTS_VERSION, DatasetSpec, ExperimentConfig, Run, fingerprint, tuned_option
from orcal.experiment.conformal import Batch, ConformalEvaluation
from orcal.experiment.data import test_groups
from orcal.experiment.runs import jsonable, run_files, safe_name
from orcal.heads import Head, scaled, unscaled
from orcal.metrics.volume import VolumeStats, volume_metrics
from orcal.training.runtime import hardware_info


def _train_config(cfg: ExperimentConfig, spec: DatasetSpec, run: Run, out_dir: Path, device: str, seed: int):
    """The :class:`orcal.train.TrainConfig` of one run."""
    from orcal.training.config import TrainConfig

    fusion_options = dict(cfg.fusion_options)
    if run.sigma is not None:
        fusion_options["sigma"] = run.sigma
    if run.value is not None:
        fusion_options[tuned_option(run.method)] = run.value
    fields = {
        "dataset": spec.name, "root": spec.root, "task": spec.task, "dataset_options": dict(spec.options),
        "method": run.method, "rps_weight": run.rps_weight, "arch": cfg.arch, "encoder": cfg.encoder,
        "encoder_weights": cfg.encoder_weights, "epochs": int(cfg.epochs), "batch_size": int(cfg.batch_size),
        "lr": float(cfg.lr), "seed": int(seed), "out_dir": str(out_dir), "amp": str(cfg.amp),
        "device": device, "max_steps_per_epoch": cfg.max_steps, "patch_size": cfg.patch_size,
        "model_options": dict(cfg.model_options), "fusion_options": fusion_options,
    }
    fields.update(cfg.train_options)
    unknown = set(fields) - set(TrainConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"training does not accept {', '.join(sorted(unknown))} (argument train_options)")
    tcfg = TrainConfig(**fields)
    tcfg.validate()
    return tcfg


def _metrics(cfg: ExperimentConfig, per_image: bool = True, num_structures: int | None = None):
    from orcal.metrics import MultiRaterCalibration

    return MultiRaterCalibration(n_bins=cfg.n_bins, auc_bins=cfg.auc_bins, per_image=per_image, agreement=per_image,
                                 num_structures=num_structures)


def _scalar_metrics(metric) -> dict[str, float] | None:
    """The scalar metrics of a :class:`~orcal.metrics.MultiRaterCalibration`, None when it saw no image."""
    from orcal.metrics.registry import METRICS

    values = metric.compute()
    return {k: float(values[k]) for k in METRICS if k in values} if values["n_images"] else None


def evaluate_run(result, splits: Mapping[str, Any], run: Run, cfg: ExperimentConfig, case: dict[str, Any],
                 device: str, seed: int = 0) -> dict[str, Any]:
    """Evaluate a trained run. On the validation split: every readout's metrics (what ``select_on_val``
    chooses by) and, with ``cfg.temperature_scaling``, one temperature per readout (:mod:`orcal.metrics.calibrate`),
    whose scaled readout ``"<readout>+ts"`` is evaluated as a readout of its own. On the test split, per
    readout: the per-image statistics, their bootstrap, the confidence-vs-agreement table and the
    probability map of the qualitative case. A model of several structures (SPEC §11) keeps a statistics row
    per image and structure; its temperature scaling and qualitative maps (one structure's) are left out."""
    from orcal.metrics.calibrate import TemperatureScaler, apply_temperature
    from orcal.models import probability
    from orcal.training.predict import predict_logits

    majority = result.config.majority
    C = getattr(result, "num_structures", None)
    head = Head(result.head, num_raters=int(result.num_raters) if result.head == "ordinal" else None,
                num_structures=C or 1)

    def passes(split: str):
        return predict_logits(result, splits[split], device=device, batch_size=int(cfg.batch_size), amp=cfg.amp)

    def readouts_of(logits: torch.Tensor, temperatures: Mapping[str, float]) -> dict[str, torch.Tensor]:
        out = {r: probability(logits, head.kind, head.op_readout(r), head.op_majority(r, majority), num_structures=C)
               for r in head.readouts}
        out.update({scaled(r): probability(apply_temperature(logits, t), head.kind, head.op_readout(r),
                                           head.op_majority(r, majority)) for r, t in temperatures.items()})
        return {r: p.float().cpu() for r, p in out.items()}

    scalers = {r: TemperatureScaler(head.metric_kind, head.op_readout(r), majority, seed=seed) for r in head.readouts} \
        if cfg.temperature_scaling and len(splits["val"]) and C is None else {}
    val = {r: _metrics(cfg, per_image=False, num_structures=C) for r in head.readouts}
    # the conformal calibrators of every row (SPEC §12): the validation split is their calibration set
    conformal = {r: ConformalEvaluation(C) for r in head.readouts} if cfg.conformal is not None else {}

    def batch(split: str, ids, p, masks, valid) -> Batch:
        spacing = _spacings(splits[split])
        sp = torch.stack([spacing[str(i)] for i in ids]) if spacing else None
        return Batch.of(p, masks.cpu(), None if valid is None else valid.cpu(), sp, C)

    for ids, logits, masks, valid in passes("val"):
        for r, p in readouts_of(logits, {}).items():
            val[r].update(p, masks, valid=valid)
            if r in conformal:
                conformal[r].calibrate(batch("val", ids, p, masks, valid))
        for scaler in scalers.values():
            scaler.update(logits, masks, valid=valid)
    temperatures = {r: s.fit() for r, s in scalers.items()}
    if temperatures:  # the scaled readouts on the split they were fitted on: a second pass, never stored logits
        val.update({scaled(r): _metrics(cfg, per_image=False) for r in temperatures})
        conformal.update({scaled(r): ConformalEvaluation(C) for r in temperatures if conformal})
        for ids, logits, masks, valid in passes("val"):
            for r in temperatures:
                p = readouts_of(logits, {r: temperatures[r]})[scaled(r)]
                val[scaled(r)].update(p, masks, valid=valid)
                if conformal:
                    conformal[scaled(r)].calibrate(batch("val", ids, p, masks, valid))
    for evaluation in conformal.values():
        evaluation.fit(cfg.conformal)
    names = list(head.readouts) + [scaled(r) for r in temperatures]
    test = {r: _metrics(cfg, num_structures=C) for r in names}
    volumes: dict[str, list] = {r: [] for r in names}
    case_maps: dict[str, np.ndarray] = {}
    order: list[str] = []  # the test images' ids in the order of their statistics rows
    for ids, logits, masks, valid in passes("test"):
        order.extend(str(i) for i in ids)
        masks = masks.cpu()
        valid = None if valid is None else valid.cpu()
        for r, p in readouts_of(logits, temperatures).items():
            test[r].update(p, masks, valid=valid)
            if r in conformal or masks.ndim == 5:  # one batch, its volume statistics computed once for both
                b = batch("test", ids, p, masks, valid)
                if r in conformal:
                    conformal[r].measure(b)
                if masks.ndim == 5:  # volumes: the predicted volume's distribution against the raters' (SPEC §11.4)
                    volumes[r].append(b.volume)
            if case["id"] in ids and C is None:
                q = p[ids.index(case["id"])]
                case_maps[r] = (q if case["slice"] is None else q[case["slice"]]).numpy()
    out: dict[str, Any] = {}
    groups = test_groups(splits["test"], cfg, order)
    for r in names:
        values = test[r].compute()
        stats = test[r].stats()
        out[r] = {"stats": stats, "summary": report_bootstrap(stats, cfg, groups), "agreement": values.get("agreement"),
                  "case_map": case_maps.get(r), "n_images": values["n_images"],
                  "val": _scalar_metrics(val[r])}
        if volumes[r]:
            out[r]["volume"] = volume_metrics(VolumeStats.cat(volumes[r]))
            out[r]["volume"]["spacing_known"] = bool(_spacings(splits["test"]))
        if r in conformal:
            out[r]["conformal"] = {**conformal[r].result(), "spacing_known": bool(_spacings(splits["test"]))}
            out[r]["conformal_per_image"] = conformal[r].per_image()
        base, is_scaled = unscaled(r)
        if is_scaled:
            out[r]["temperature"] = temperatures[base]
    return out


_SPACINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _spacings(dataset) -> dict[str, torch.Tensor] | None:
    """Each item's voxel size by id, where every item has one (NIfTI volumes); else None (volumes in
    1 mm voxels). Read once per dataset, not once per run."""
    if dataset in _SPACINGS:
        return _SPACINGS[dataset]
    out: dict[str, torch.Tensor] | None = {}
    for i in range(len(dataset)):
        item = dataset[i]
        if item.get("spacing") is None:
            out = None
            break
        out[str(item["id"])] = torch.as_tensor(item["spacing"], dtype=torch.float64)
    _SPACINGS[dataset] = out
    return out


def report_bootstrap(stats, cfg: ExperimentConfig, groups: Sequence | None = None) -> dict[str, dict[str, float]]:
    """Bootstrap summary of the per-image ``stats`` (SPEC §5) with the experiment's settings; ``groups`` (one
    id per image row) resamples whole groups."""
    from orcal.metrics.pooled import bootstrap

    return bootstrap(stats, n_boot=int(cfg.n_boot), fraction=float(cfg.fraction), seed=int(cfg.seed),
                     groups=groups)


def execute_run(cfg: ExperimentConfig, spec: DatasetSpec, run: Run, run_dir: Path, splits: Mapping[str, Any],
                case: dict[str, Any], device: str, seed: int | None = None) -> dict[str, Any]:
    """Train and evaluate one run of training seed ``seed`` (default ``cfg.seed``) on ``splits`` (train, val,
    test datasets), save its files under ``run_dir``, return its record."""
    from orcal.training.loop import train

    seed = int(cfg.seed if seed is None else seed)
    files = run_files(run_dir, run)
    t0 = time.perf_counter()
    tcfg = _train_config(cfg, spec, run, run_dir / "checkpoints" / safe_name(run.key), device, seed)
    result = train(tcfg, progress=cfg.progress, train_dataset=splits["train"], val_dataset=splits["val"])
    t1 = time.perf_counter()
    evaluated = evaluate_run(result, splits, run, cfg, case, device, seed)
    t2 = time.perf_counter()
    history = getattr(result, "history", None)
    record = {
        "version": RESULTS_VERSION,
        "fingerprint": fingerprint(cfg, spec, run, seed),
        "dataset": spec.key,
        "method": run.method,
        "rps_weight": run.rps_weight,
        "sigma": run.sigma,
        **({} if run.value is None else {"value": run.value}),
        "seed": seed,
        "key": run.key,
        "readouts": _readouts_record(evaluated),
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
    return _write_run(files, record, evaluated, cfg)


def _readouts_record(evaluated: Mapping[str, dict]) -> dict[str, dict]:
    return {r: {k: e[k] for k in ("summary", "agreement", "n_images", "val", "temperature", "volume", "conformal")
                if k in e} for r, e in evaluated.items()}


def _write_run(files: Mapping[str, Path], record: dict[str, Any], evaluated: Mapping[str, dict],
               cfg: ExperimentConfig) -> dict[str, Any]:
    """Save a run's statistics, case maps, per-image conformal values and, last, its json record."""
    files["json"].parent.mkdir(parents=True, exist_ok=True)
    torch.save({r: e["stats"].as_dict() for r, e in evaluated.items()}, files["stats"])
    maps = {r: e["case_map"] for r, e in evaluated.items() if e["case_map"] is not None}
    np.savez_compressed(files["case"], **maps)
    if cfg.conformal is not None:  # per image, so that the rows are bootstrapped and compared like the others
        torch.save({r: e["conformal_per_image"] for r, e in evaluated.items() if "conformal_per_image" in e},
                   files["conformal"])
    tmp = Path(f"{files['json']}.tmp")
    tmp.write_text(json.dumps(jsonable(record), indent=1))
    tmp.replace(files["json"])  # the json is written last: its presence means the run is complete
    return json.loads(files["json"].read_text())


def _steps_per_epoch(n_train: int, cfg: ExperimentConfig) -> int:
    patches = int(cfg.train_options.get("patches_per_image", 1))
    steps = math.ceil(n_train * patches / int(cfg.batch_size))
    return steps if cfg.max_steps is None else min(steps, int(cfg.max_steps))


def reevaluate_run(cfg: ExperimentConfig, spec: DatasetSpec, run: Run, run_dir: Path, splits: Mapping[str, Any],
                   case: dict[str, Any], device: str, record: dict[str, Any]) -> dict[str, Any] | None:
    """A finished run evaluated again from its kept weights (``checkpoints/<run>/best.pt``), to add what its
    ``record`` lacks (the conformal columns) without training; its files are rewritten and its new record
    returned. None when the checkpoint is missing or unreadable, or is not the recorded model: every test
    metric of the new evaluation must equal the record's (relative 1e-6), else the run is trained again."""
    from orcal.training.checkpoint import BEST, load_model
    from orcal.training.config import TrainResult

    path = run_dir / "checkpoints" / safe_name(run.key) / BEST
    if not path.is_file():
        return None
    try:
        model, tcfg = load_model(path, device)
    except (OSError, ValueError, RuntimeError, KeyError):
        return None
    ms = model.orcal_spec
    result = TrainResult(model=model, config=tcfg, history=record.get("history") or [],
                         best_epoch=int(record.get("best_epoch") or 0), checkpoint_path=str(path),
                         num_raters=int(ms["num_raters"]), head=ms["head"], spatial_dims=int(ms["spatial_dims"]),
                         in_channels=int(ms["in_channels"]), num_structures=ms.get("num_structures"))
    t0 = time.perf_counter()
    evaluated = evaluate_run(result, splits, run, cfg, case, device, int(record.get("seed", cfg.seed)))
    if not _same_test_metrics(record.get("readouts", {}), evaluated):
        return None
    new = {**record, "readouts": _readouts_record(evaluated), "eval_s": time.perf_counter() - t0}
    return _write_run(run_files(run_dir, run), new, evaluated, cfg)


def _same_test_metrics(recorded: Mapping[str, dict], evaluated: Mapping[str, dict]) -> bool:
    """Whether every readout's test-set metrics of ``evaluated`` are those ``recorded``."""
    if set(recorded) != set(evaluated):
        return False
    for r, e in evaluated.items():
        old = recorded[r].get("summary") or {}
        for metric, s in e["summary"].items():
            a, b = (old.get(metric) or {}).get("value"), s.get("value")
            if a is None or b is None or not math.isfinite(b):
                if not (a is None and (b is None or not math.isfinite(b))):  # json keeps NaN as None
                    return False
            elif not math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12):
                return False
    return True
