"""The multi-rater experiment: train every strategy, evaluate on the held-out test split, write the report.

For each dataset, each training seed and each method (SPEC §6 baselines and the ordinal method) this module
trains a model with :func:`orcal.train.train`, fits a temperature on the validation split (SPEC §10),
predicts the test split, accumulates per-image multi-rater statistics (SPEC §4) and keeps one results file
per run, so that an interrupted experiment resumes where it stopped. The ordinal method is evaluated with
both readouts (SPEC §2). Optionally the smoothing width and the RPS weight are chosen on the validation
split. Rows are summarised over seeds and compared pairwise (SPEC §5.1, :mod:`orcal.metrics.comparison`); finally it
writes the tables (:mod:`orcal.report`), the figures, the findings and ``report.md`` / ``results.json``.

>>> import tempfile
>>> cfg = ExperimentConfig(datasets=[DatasetSpec("synthetic", options={"n": 24, "shape": (16, 16)})],
...                        methods=("soft", "ordinal"), arch="unet-small", epochs=1, max_steps=1, n_boot=20,
...                        out=tempfile.mkdtemp(), progress=False)
>>> results = run_experiment(cfg, log=lambda *args: None)
>>> sorted(results["runs"]["Synthetic (R=5)"])
['ordinal/expected', 'ordinal/expected+ts', 'ordinal/majority', 'ordinal/majority+ts', 'soft', 'soft+ts']
"""

from __future__ import annotations

import json
import math
import time
import weakref
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
    SELECTION_GRIDS,
    TS_SUFFIX,
    DatasetSpec,
    ExperimentConfig,
    Run,
    candidate_runs,
    cfg_with,
    fingerprint,
    plan_runs,
    preset_config,
)
from orcal.experiment_runs import (  # noqa: F401  (the experiment's public names)
    jsonable,
    load_case_maps,
    load_run,
    load_run_stats,
    run_files,
    safe_name,
)
from orcal.findings import findings
from orcal.metrics.volume import VolumeStats, volume_metrics, volume_stats
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
        from orcal._progress import progress_bar

        self.items = [dataset[i] for i in progress_bar(range(len(dataset)), desc=desc or "loading", unit="item",
                                                       leave=False, enabled=progress)]
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
        item = dataset[int(i)]
        masks = item["masks"]
        if item.get("num_structures") is not None:  # rater label maps: where the raters' labels differ
            amb = (masks != masks[:1]).any(0)
        else:
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
    structures = item.get("num_structures")
    votes = (masks > 0).sum(0) if structures is not None else masks.sum(0)  # any structure, for several
    return {"index": best[1], "id": item["id"], "slice": best[2], "image": image.float().numpy(),
            "votes": votes.numpy().astype(np.int64), "num_raters": int(masks.shape[0]),
            "num_structures": structures}


# --- training and evaluation -----------------------------------------------------------------------------

def _train_config(cfg: ExperimentConfig, spec: DatasetSpec, run: Run, out_dir: Path, device: str, seed: int):
    """The :class:`orcal.train.TrainConfig` of one run."""
    from orcal.training.config import TrainConfig

    fusion_options = dict(cfg.fusion_options)
    if run.sigma is not None:
        fusion_options["sigma"] = run.sigma
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

    head, majority = result.head, result.config.majority
    kind = "ordinal" if head == "ordinal" else "logit"
    C = getattr(result, "num_structures", None)

    def passes(split: str):
        return predict_logits(result, splits[split], device=device, batch_size=int(cfg.batch_size), amp=cfg.amp)

    def readouts_of(logits: torch.Tensor, temperatures: Mapping[str, float]) -> dict[str, torch.Tensor]:
        out = {r: probability(logits, head, readout=r, majority=majority, num_structures=C) for r in run.readouts}
        out.update({r + TS_SUFFIX: probability(apply_temperature(logits, t), head, readout=r, majority=majority)
                    for r, t in temperatures.items()})
        return {r: p.float().cpu() for r, p in out.items()}

    scalers = {r: TemperatureScaler(kind, readout=r, majority=majority, seed=seed) for r in run.readouts} \
        if cfg.temperature_scaling and len(splits["val"]) and C is None else {}
    val = {r: _metrics(cfg, per_image=False, num_structures=C) for r in run.readouts}
    for _, logits, masks, valid in passes("val"):
        for r, p in readouts_of(logits, {}).items():
            val[r].update(p, masks, valid=valid)
        for scaler in scalers.values():
            scaler.update(logits, masks, valid=valid)
    temperatures = {r: s.fit() for r, s in scalers.items()}
    if temperatures:  # the scaled readouts on the split they were fitted on: a second pass, never stored logits
        val.update({r + TS_SUFFIX: _metrics(cfg, per_image=False) for r in temperatures})
        for _, logits, masks, valid in passes("val"):
            for r in temperatures:
                val[r + TS_SUFFIX].update(readouts_of(logits, {r: temperatures[r]})[r + TS_SUFFIX], masks,
                                          valid=valid)
    names = list(run.readouts) + [r + TS_SUFFIX for r in temperatures]
    test = {r: _metrics(cfg, num_structures=C) for r in names}
    volumes: dict[str, list] = {r: [] for r in names}
    spacing: dict | None = None
    case_maps: dict[str, np.ndarray] = {}
    for ids, logits, masks, valid in passes("test"):
        masks = masks.cpu()
        valid = None if valid is None else valid.cpu()
        for r, p in readouts_of(logits, temperatures).items():
            test[r].update(p, masks, valid=valid)
            if masks.ndim == 5:  # volumes: the predicted volume's distribution against the raters' (SPEC §11.4)
                if spacing is None:
                    spacing = _spacings(splits["test"]) or {}
                sp = torch.stack([spacing[i] for i in ids]) if spacing else None
                volumes[r].append(volume_stats(p, masks, sp, valid, num_structures=C))
            if case["id"] in ids and C is None:
                q = p[ids.index(case["id"])]
                case_maps[r] = (q if case["slice"] is None else q[case["slice"]]).numpy()
    out: dict[str, Any] = {}
    for r in names:
        values = test[r].compute()
        stats = test[r].stats()
        out[r] = {"stats": stats, "summary": report_bootstrap(stats, cfg), "agreement": values.get("agreement"),
                  "case_map": case_maps.get(r), "n_images": values["n_images"],
                  "val": _scalar_metrics(val[r])}
        if volumes[r]:
            out[r]["volume"] = volume_metrics(VolumeStats.cat(volumes[r]))
            out[r]["volume"]["spacing_known"] = bool(spacing)
        base = r.removesuffix(TS_SUFFIX)
        if base != r:
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


def report_bootstrap(stats, cfg: ExperimentConfig) -> dict[str, dict[str, float]]:
    """Bootstrap summary of the per-image ``stats`` (SPEC §5) with the experiment's settings."""
    from orcal.metrics.pooled import bootstrap

    return bootstrap(stats, n_boot=int(cfg.n_boot), fraction=float(cfg.fraction), seed=int(cfg.seed))


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
        "seed": seed,
        "key": run.key,
        "readouts": {r: {k: e[k] for k in ("summary", "agreement", "n_images", "val", "temperature", "volume")
                         if k in e}
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


# --- selection on the validation split, seeds and comparisons --------------------------------------------

def select_rows(cfg: ExperimentConfig, candidates: Mapping[str, Sequence[Run]], records: Mapping[str, dict]
                ) -> dict[str, dict[str, Any]]:
    """Which run each table row reports: ``{row: {"run", "readout", "parameter", "value", "candidates"}}``.

    Without ``select_on_val`` every row comes from its method's main run. With it, each row takes, of its
    method's candidate runs, the one whose readout has the lowest validation MR-ECE (``records`` of the first
    seed); a temperature-scaled row follows its readout's choice. ``candidates`` maps each candidate value of
    the setting (as text) to its validation MR-ECE.
    """
    chosen: dict[str, dict[str, Any]] = {}
    for method, runs in candidates.items():
        for readout in runs[0].readouts:
            pick, scores = runs[0], {}
            if cfg.select_on_val and len(runs) > 1:
                for run in runs:
                    val = records[run.key]["readouts"][readout].get("val") or {}
                    scores[f"{run.parameter[1]:g}"] = val.get("mr_ece", math.nan)
                finite = {k: v for k, v in scores.items() if v is not None and math.isfinite(v)}
                if not finite:
                    raise ValueError(f"cannot select a setting of {method!r} on the validation split: no run has "
                                     "a validation MR-ECE (is the validation split empty?)")
                pick = next(r for r in runs if f"{r.parameter[1]:g}" == min(finite, key=finite.get))
            parameter = pick.parameter if len(runs) > 1 else None
            entry = {"run": pick.key, "readout": readout, "parameter": parameter and parameter[0],
                     "value": parameter and parameter[1], "candidates": scores}
            for r in (readout, readout + TS_SUFFIX):
                if r in records[pick.key]["readouts"]:
                    chosen[pick.row(r)] = {**entry, "readout": r}
    return chosen


def compare_rows(stats: Mapping[str, Sequence], cfg: ExperimentConfig, reference_row: str | None = None
                 ) -> dict[str, Any]:
    """Seed summaries, paired differences against ``reference_row`` (default ORC's expected readout, else
    the first row) and, per table metric, the lead of the best row over the runner-up (the best row of
    another model: not the best row's own temperature-scaled twin, or the reverse).

    ``stats`` maps a row to its per-image test statistics, one per seed in the same seed order.
    """
    from orcal.metrics import comparison
    from orcal.metrics.registry import higher_is_better

    boot = {"n_boot": int(cfg.n_boot), "fraction": float(cfg.fraction), "seed": int(cfg.seed)}
    samples = {row: comparison.seed_samples(st, **boot) for row, st in stats.items()}  # one bootstrap per row
    rows = {row: comparison.seed_summary(s) for row, s in samples.items()}
    ref = reference_row or next((r for r in rows if r == "ordinal/expected"), next(iter(rows)))
    paired = {row: comparison.paired_difference(s, samples[ref]) for row, s in samples.items() if row != ref}
    leads = {}
    for _, metric, _ in report.TABLES:
        ranked = sorted((r for r in rows if math.isfinite(rows[r][metric]["value"])),
                        key=lambda r: rows[r][metric]["value"], reverse=higher_is_better(metric))
        # the runner-up is another model: a row's own temperature-scaled twin ranks the same voxels alike
        others = [r for r in ranked[1:] if r.removesuffix(TS_SUFFIX) != ranked[0].removesuffix(TS_SUFFIX)]
        if others:
            d = comparison.paired_difference(samples[ranked[0]], samples[others[0]])[metric]
            leads[metric] = {"best": ranked[0], "runner_up": others[0], **d,
                             "exceeds_noise": comparison.exceeds_noise(d)}
    return {"rows": rows, "reference": ref, "paired": paired, "leads": leads}


# --- the experiment --------------------------------------------------------------------------------------

def _load_or_run(cfg, spec, run, run_dir, splits, case, device, seed, log) -> dict[str, Any]:
    fp = fingerprint(cfg, spec, run, seed)
    record = None if cfg.force else load_run(run_dir, run, fp)
    if record is not None:
        log(f"[{spec.key}] {run.key} (seed {seed}): finished earlier, reusing {run_files(run_dir, run)['json']}")
        return record
    log(f"[{spec.key}] {run.key} (seed {seed}): training ({device})")
    record = execute_run(cfg, spec, run, run_dir, splits, case, device, seed)
    s = record["readouts"][next(iter(record["readouts"]))]["summary"]
    log(f"[{spec.key}] {run.key} (seed {seed}): MR-ECE {s['mr_ece']['value']:.4f}, AUC {s['auc']['value']:.4f} "
        f"(train {record['train_s']:.0f} s, evaluate {record['eval_s']:.0f} s)")
    return record


def seed_dir(out: Path, spec: DatasetSpec, seed: int) -> Path:
    """The folder of one dataset's runs of one training seed: ``OUT/runs/<dataset>/seed<seed>``."""
    return out / "runs" / safe_name(spec.key) / f"seed{seed}"


def run_experiment(cfg: ExperimentConfig, command: str | None = None, log=print) -> dict[str, Any]:
    """Run (or resume) the experiment and write its tables, figures, ``report.md`` and ``results.json``
    under ``cfg.out``. Returns the results dictionary.

    The first seed trains every method at its default settings plus the sweeps (``rps_weights``, ``sigmas``);
    with ``select_on_val`` each row then takes the setting with the lowest validation MR-ECE, and the other
    seeds train the chosen settings only.
    """
    from orcal._progress import progress_bar

    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    if cfg.threads is not None and device == "cpu":
        # small networks gain little from intra-op threads, and lose a lot on a busy machine; a fixed thread
        # count also keeps the results the same on machines with different numbers of cores
        torch.set_num_threads(int(cfg.threads))
    if str(device).startswith("cuda"):  # the same results on every run: cuDNN's autotuner picks kernels by timing
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    seeds = cfg.seed_list
    main_runs, sweep_runs = plan_runs(cfg)
    candidates = candidate_runs(cfg)
    first_runs = list(dict.fromkeys([*main_runs, *sweep_runs.values(), *(r for c in candidates.values() for r in c)]))
    results: dict[str, Any] = {
        "settings": _settings(cfg, device), "datasets": {}, "runs": {}, "sweeps": {}, "selection": {},
        "comparisons": {}, "timings": {}, "hardware": hardware_info(device), "command": command,
    }
    records: dict[str, dict[int, dict[str, dict]]] = {}
    cases: dict[str, dict] = {}
    choices: dict[str, dict[str, dict]] = {}
    bar = progress_bar(total=len(cfg.datasets) * (len(first_runs) + (len(seeds) - 1) * len(main_runs)),
                       desc="experiment", unit="run", enabled=cfg.progress)
    for spec in cfg.datasets:
        splits = {s: load_split(spec, s) for s in ("train", "val", "test")}
        if spec.label is None:  # the data's own name: a QUBIQ pickle read by the LIDC-pickle loader is not "lidc"
            spec.label = getattr(splits["test"], "display_name", None)
        if cfg.cache:
            splits = {s: CachedDataset(ds, f"{spec.key} {s}", cfg.progress) for s, ds in splits.items()}
        test_ds = splits["test"]
        case = pick_case(test_ds)
        cases[spec.key] = case
        first = test_ds[0]
        results["datasets"][spec.key] = {
            "name": spec.name, "task": spec.task, "root": spec.root, "options": spec.options,
            "n_train": len(splits["train"]), "n_val": len(splits["val"]), "n_test": len(test_ds),
            "num_raters": int(first["masks"].shape[0]), "image_shape": list(first["image"].shape[1:]),
            "channels": int(first["image"].shape[0]), "qualitative_case": case["id"],
            "num_structures": first.get("num_structures"),
        }
        if cfg.cache:  # every item is in memory: the sizes of all of them (volumes of LIDC nodules differ in depth)
            sizes = np.array([test_ds[i]["image"].shape[1:] for i in range(len(test_ds))])
            results["datasets"][spec.key]["image_size_range"] = [[int(a), int(b)] for a, b in
                                                                 zip(sizes.min(0), sizes.max(0))]
        records[spec.key] = {}
        for i, seed in enumerate(seeds):
            runs = first_runs if i == 0 else list({c["run"]: next(r for r in first_runs if r.key == c["run"])
                                                   for c in choices[spec.key].values()}.values())
            by_key = records[spec.key].setdefault(seed, {})
            for run in runs:
                bar.set_postfix_str(f"{spec.key} {run.key} seed {seed}")
                by_key[run.key] = _load_or_run(cfg, spec, run, seed_dir(out, spec, seed), splits, case, device,
                                               seed, log)
                bar.update(1)
            if i == 0:
                choices[spec.key] = select_rows(cfg, candidates, by_key)
    bar.close()
    runs_by_key = {run.key: run for run in first_runs}
    panels = {spec.key: _tabulate(results, cfg, spec, seeds, records[spec.key], choices[spec.key], runs_by_key,
                                  sweep_runs, out) for spec in cfg.datasets}
    trained_on = [rec["hardware"] for by in records.values() for s in by.values() for rec in s.values()
                  if rec.get("hardware")]
    if trained_on:  # what the runs were measured on, rather than what rendered the report
        results["hardware"] = trained_on[0]
    results["total_seconds"] = time.perf_counter() - start
    results["compute_seconds"] = sum(t["train_s"] + t["eval_s"] for by in results["timings"].values()
                                     for t in by.values())
    results["findings"] = findings(results)
    report.write_outputs(results, out, panels, cases)
    return results


def _tabulate(results: dict[str, Any], cfg: ExperimentConfig, spec: DatasetSpec, seeds: Sequence[int],
              records: Mapping[int, Mapping[str, dict]], choice: Mapping[str, dict], runs: Mapping[str, Run],
              sweep_runs: Mapping, out: Path) -> dict[str, dict]:
    """One dataset's rows (over seeds), comparisons, selection, temperatures, sweep and timings into
    ``results``; returns the figures' data of the first seed (:func:`orcal.report.write_outputs`)."""
    key, first = spec.key, records[seeds[0]]
    loaded = {(s, k): load_run_stats(seed_dir(out, spec, s), runs[k]) for s in seeds for k in records[s]}
    stats = {row: [loaded[(s, c["run"])][c["readout"]] for s in seeds] for row, c in choice.items()}
    compared = compare_rows(stats, cfg)
    results["runs"][key] = compared["rows"]
    results["comparisons"][key] = {k: compared[k] for k in ("reference", "paired", "leads")}
    results["selection"][key] = {row: {k: c[k] for k in ("run", "parameter", "value", "candidates")}
                                 for row, c in choice.items()}
    results.setdefault("temperatures", {})[key] = {
        row: [records[s][c["run"]]["readouts"][c["readout"]].get("temperature") for s in seeds]
        for row, c in choice.items() if c["readout"].endswith(TS_SUFFIX)}
    if sweep_runs:
        results["sweeps"][key] = {f"{w:g}": {r: e["summary"] for r, e in first[run.key]["readouts"].items()
                                             if not r.endswith(TS_SUFFIX)}
                                  for w, run in sorted(sweep_runs.items())}
    volume = {row: [records[s][c["run"]]["readouts"][c["readout"]].get("volume") for s in seeds]
              for row, c in choice.items()}
    volume = {row: {m: float(np.mean([v[m] for v in per])) for m in per[0]}
              for row, per in volume.items() if per and all(per)}  # the mean over seeds
    if volume:
        results.setdefault("volumes", {})[key] = volume
    results["timings"][key] = {f"{run_key} (seed {s})" if len(seeds) > 1 else run_key:
                               {k: rec.get(k) for k in ("train_s", "eval_s", "epochs", "steps", "best_epoch")}
                               for s in seeds for run_key, rec in records[s].items()}
    # the figures: the first seed's rows without temperature scaling (the tables have every row)
    panels: dict[str, dict] = {"stats": {}, "agreement": {}, "maps": {}}
    for row in report.sort_rows([r for r in choice if not r.endswith(TS_SUFFIX)]):
        c, label = choice[row], report.row_label(row)
        panels["stats"][label] = loaded[(seeds[0], c["run"])][c["readout"]]
        agreement = first[c["run"]]["readouts"][c["readout"]].get("agreement")
        if agreement:
            panels["agreement"][label] = {k: np.asarray(v) for k, v in agreement.items()}
        maps = load_case_maps(seed_dir(out, spec, seeds[0]), runs[c["run"]])
        if c["readout"] in maps:
            panels["maps"][label] = maps[c["readout"]]
    return panels


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


def __getattr__(name: str):
    if name == "METHODS":  # every registered strategy (orcal.fusion)
        from orcal import fusion

        return fusion.names()
    raise AttributeError(f"module 'orcal.experiment' has no attribute {name!r}")
