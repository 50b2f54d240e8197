"""The multi-rater experiment from start to finish: for each dataset, each training seed and each method (SPEC §6
baselines and the ordinal method, both readouts of SPEC §2) run or reuse the run (:mod:`orcal.experiment.execute`),
select settings on the validation split and compare the rows (:mod:`orcal.experiment.selection`), then write
the findings, tables, figures, ``report.md`` and ``results.json`` (:mod:`orcal.experiment.report`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orcal.experiment.config import (
    DatasetSpec,
    ExperimentConfig,
    Run,
    candidate_runs,
    fingerprint,
    plan_runs,
)
from orcal.experiment.conformal import check_calibration_size, leads, summarize
from orcal.experiment.data import CachedDataset, load_split, pick_case, test_groups
from orcal.experiment.execute import execute_run, reevaluate_run
from orcal.experiment.findings import findings
from orcal.experiment.oracle import oracle_summaries
from orcal.experiment.report import write_outputs
from orcal.experiment.runs import (
    conformal_missing,
    load_case_maps,
    load_conformal,
    load_run,
    load_run_stats,
    run_files,
    safe_name,
)
from orcal.experiment.selection import compare_rows, select_rows
from orcal.experiment.tables import row_label, sort_rows
from orcal.heads import unscaled
from orcal.training import runtime
from orcal.training.runtime import hardware_info


def _load_or_run(cfg, spec, run, run_dir, splits, case, device, seed, log) -> dict[str, Any]:
    fp = fingerprint(cfg, spec, run, seed)
    record = None if cfg.force else load_run(run_dir, run, fp)
    if record is not None and cfg.conformal is not None:
        reason = conformal_missing(run_dir, run, record, cfg.conformal)
        if reason:  # never an empty column: evaluated again from the kept weights, else trained again
            again = reevaluate_run(cfg, spec, run, run_dir, splits, case, device, record)
            how = "evaluated it again from its checkpoint" if again is not None else \
                "its checkpoint is missing or not the recorded model: training it again"
            log(f"[{spec.key}] {run.key} (seed {seed}): finished earlier but {reason} (--conformal "
                f"{cfg.conformal}); {how}")
            record = again
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
    groups: dict[str, list | None] = {}  # the bootstrap's units of each test set (SPEC §5)
    calibration_units: dict[str, int] = {}
    choices: dict[str, dict[str, dict]] = {}
    if cfg.conformal is not None:  # before anything is trained: every calibration set must certify alpha
        for spec in cfg.datasets:
            check_calibration_size(len(load_split(spec, "val")), cfg.conformal, spec.key)
    bar = progress_bar(total=len(cfg.datasets) * (len(first_runs) + (len(seeds) - 1) * len(main_runs)),
                       desc="experiment", unit="run", enabled=cfg.progress)
    for spec in cfg.datasets:
        splits = {s: load_split(spec, s) for s in ("train", "val", "test")}
        if spec.label is None:  # the data's own name: a QUBIQ pickle read by the LIDC-pickle loader is not "lidc"
            spec.label = getattr(splits["test"], "display_name", None)
        if cfg.cache:
            splits = {s: CachedDataset(ds, f"{spec.key} {s}", cfg.progress) for s, ds in splits.items()}
        test_ds = splits["test"]
        groups[spec.key] = test_groups(test_ds, cfg)
        # the calibration set's independent units: its patients (cases, volumes) where the data says which
        # images share one; the spread of one calibration draw shrinks with their number, not the images'
        val_groups = test_groups(splits["val"], cfg)
        calibration_units[spec.key] = len(set(val_groups)) if val_groups else len(splits["val"])
        oracles = oracle_summaries(test_ds, cfg, groups[spec.key])  # the metrics' floor on this test set
        if oracles:
            results.setdefault("oracles", {})[spec.key] = oracles
        case = pick_case(test_ds)
        cases[spec.key] = case
        first = test_ds[0]
        results["datasets"][spec.key] = {
            "name": spec.name, "task": spec.task, "root": spec.root, "options": spec.options,
            "n_train": len(splits["train"]), "n_val": len(splits["val"]), "n_test": len(test_ds),
            "num_raters": int(first["masks"].shape[0]), "image_shape": list(first["image"].shape[1:]),
            "channels": int(first["image"].shape[0]), "qualitative_case": case["id"],
            "num_structures": first.get("num_structures"),
            "bootstrap_units": _units(groups[spec.key], len(test_ds)),
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
                                  sweep_runs, out, groups[spec.key], calibration_units[spec.key])
              for spec in cfg.datasets}
    trained_on = [rec["hardware"] for by in records.values() for s in by.values() for rec in s.values()
                  if rec.get("hardware")]
    if trained_on:  # what the runs were measured on, rather than what rendered the report
        results["hardware"] = trained_on[0]
    results["total_seconds"] = time.perf_counter() - start
    results["compute_seconds"] = sum(t["train_s"] + t["eval_s"] for by in results["timings"].values()
                                     for t in by.values())
    results["findings"] = findings(results)
    write_outputs(results, out, panels, cases)
    return results


def _tabulate(results: dict[str, Any], cfg: ExperimentConfig, spec: DatasetSpec, seeds: Sequence[int],
              records: Mapping[int, Mapping[str, dict]], choice: Mapping[str, dict], runs: Mapping[str, Run],
              sweep_runs: Mapping, out: Path, groups: Sequence | None = None,
              calibration_units: int | None = None) -> dict[str, dict]:
    """One dataset's rows (over seeds), comparisons, selection, temperatures, sweep and timings into
    ``results``; returns the figures' data of the first seed (:func:`orcal.experiment.report.write_outputs`)."""
    key, first = spec.key, records[seeds[0]]
    loaded = {(s, k): load_run_stats(seed_dir(out, spec, s), runs[k]) for s in seeds for k in records[s]}
    stats = {row: [loaded[(s, c["run"])][c["readout"]] for s in seeds] for row, c in choice.items()}
    compared = compare_rows(stats, cfg, groups=groups)
    results["runs"][key] = compared["rows"]
    results["comparisons"][key] = {k: compared[k] for k in ("reference", "paired", "leads", "leads_ts")}
    results["selection"][key] = {row: {k: c[k] for k in ("run", "parameter", "value", "candidates")}
                                 for row, c in choice.items()}
    results.setdefault("temperatures", {})[key] = {
        row: [records[s][c["run"]]["readouts"][c["readout"]].get("temperature") for s in seeds]
        for row, c in choice.items() if unscaled(c["readout"])[1]}
    if sweep_runs:
        results["sweeps"][key] = {f"{w:g}": {r: e["summary"] for r, e in first[run.key]["readouts"].items()
                                             if not unscaled(r)[1]}
                                  for w, run in sorted(sweep_runs.items())}
    volume = {row: [records[s][c["run"]]["readouts"][c["readout"]].get("volume") for s in seeds]
              for row, c in choice.items()}
    volume = {row: {m: float(np.mean([v[m] for v in per])) for m in per[0]}
              for row, per in volume.items() if per and all(per)}  # the mean over seeds
    if volume:
        results.setdefault("volumes", {})[key] = volume
    if cfg.conformal is not None:
        per_seed = {row: [load_conformal(seed_dir(out, spec, s), runs[c["run"]])[c["readout"]] for s in seeds]
                    for row, c in choice.items()}
        summary = summarize(per_seed, n_boot=int(cfg.n_boot), fraction=float(cfg.fraction), seed=int(cfg.seed),
                            groups=groups)
        recorded = {row: [records[s][c["run"]]["readouts"][c["readout"]]["conformal"] for s in seeds]
                    for row, c in choice.items()}
        some = next(iter(recorded.values()))[0]  # every row is calibrated on the same validation images
        units = calibration_units or some["n_calibration"]
        results.setdefault("conformal", {})[key] = {
            "alpha": cfg.conformal, "n_calibration": some["n_calibration"], "n_calibration_units": units,
            "spacing_known": bool(some.get("spacing_known")), "rows": summary["rows"],
            "leads": leads(summary, cfg.conformal, units),
            "fitted": {row: [r["fitted"] for r in per] for row, per in recorded.items()}}
    results["timings"][key] = {f"{run_key} (seed {s})" if len(seeds) > 1 else run_key:
                               {k: rec.get(k) for k in ("train_s", "eval_s", "epochs", "steps", "best_epoch")}
                               for s in seeds for run_key, rec in records[s].items()}
    # the figures: the first seed's rows without temperature scaling (the tables have every row)
    panels: dict[str, dict] = {"stats": {}, "agreement": {}, "maps": {}}
    for row in sort_rows([r for r in choice if not unscaled(r)[1]]):
        c, label = choice[row], row_label(row)
        panels["stats"][label] = loaded[(seeds[0], c["run"])][c["readout"]]
        agreement = first[c["run"]]["readouts"][c["readout"]].get("agreement")
        if agreement:
            panels["agreement"][label] = {k: np.asarray(v) for k, v in agreement.items()}
        maps = load_case_maps(seed_dir(out, spec, seeds[0]), runs[c["run"]])
        if c["readout"] in maps:
            panels["maps"][label] = maps[c["readout"]]
    return panels


def _units(groups: Sequence | None, n_images: int) -> dict[str, Any]:
    """What the bootstrap resampled on one test set: ``{"by": "group" | "image", "n": units, "images"}``."""
    n = n_images if groups is None else len(set(groups))
    return {"by": "group" if n < n_images else "image", "n": n, "images": n_images}


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
