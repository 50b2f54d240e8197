"""Evaluate probability maps saved on disk against the rater masks on disk (``orcal evaluate``).

Predictions are matched to cases by file name: ``<case id>.<ext>`` or ``<case id>_prob.<ext>`` with
``<ext>`` NIfTI, PNG/JPEG (8-bit, scaled by 1/255; 16-bit by 1/65535) or ``.npy``. Rater masks come from a
dataset layout (:func:`orcal.data.load_dataset`) or from a plain folder ``RATERS/<case>/<rater files>``.
One pass over each case feeds :class:`orcal.metrics.MultiRaterCalibration`; the outputs are
``metrics.json``, ``per_image.csv``, ``metrics.md``, ``reliability.png`` and ``agreement.png``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orcal.io import EXTENSIONS, check_same_grid, extension, read_array
from orcal.metrics import MultiRaterCalibration, bootstrap, registry
from orcal.ops.stats import CalibrationStats

__all__ = ["MIN_BOOTSTRAP_IMAGES", "bootstrap_warning", "case_groups", "evaluate", "find_predictions",
           "load_prediction", "rater_folder_cases"]

#: Below this many images the bootstrap intervals are reported with a warning. Each resample draws 60 % of the
#: images, so with n images there are at most C(n, 0.6 n) different resamples (10 for 5 images, 1 for 2): the
#: 2.5 / 97.5 percentiles are then set by one or two images and do not cover the value 95 % of the time.
MIN_BOOTSTRAP_IMAGES = 10

def _case_id(path: Path) -> str:
    stem = path.name[: len(path.name) - len(extension(path))]
    return re.sub(r"_prob$", "", stem)


def find_predictions(pred_dir: str | os.PathLike) -> dict[str, Path]:
    """``{case id: file}`` for every prediction file in ``pred_dir`` (``<id>.<ext>`` or ``<id>_prob.<ext>``)."""
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"--pred: no such directory: {pred_dir}")
    found: dict[str, Path] = {}
    for path in sorted(pred_dir.iterdir()):
        if not path.is_file() or not path.name.lower().endswith(EXTENSIONS):
            continue
        case = _case_id(path)
        if case in found:
            raise ValueError(f"two predictions for case {case!r}: {found[case].name} and {path.name}")
        found[case] = path
    if not found:
        raise FileNotFoundError(f"--pred: no prediction files ({', '.join(EXTENSIONS)}) in {pred_dir}")
    return found


def load_prediction(path: str | os.PathLike, kind: str = "prob") -> np.ndarray:
    """A probability map from a file: 8/16-bit images scaled to [0, 1]; ``kind="logit"`` applies a sigmoid.

    Raises:
        ValueError: values that are not probabilities (NaN, outside [0, 1]) or an unsupported dtype,
            naming the file.
    """
    arr = read_array(path)
    if arr.dtype == np.uint8:
        p = arr.astype(np.float32) / 255.0
    elif arr.dtype == np.uint16:
        p = arr.astype(np.float32) / 65535.0
    elif arr.dtype == np.bool_:
        p = arr.astype(np.float32)
    elif np.issubdtype(arr.dtype, np.floating):
        p = arr.astype(np.float32)
        if kind == "logit":
            p = torch.sigmoid(torch.from_numpy(p)).numpy()
    else:
        raise ValueError(f"{path}: a prediction must be float, uint8 or uint16, got {arr.dtype}")
    if p.size and (np.isnan(p).any() or p.min() < 0 or p.max() > 1):
        bad = p[np.isnan(p) | (p < 0) | (p > 1)]
        raise ValueError(f"{path}: probabilities must lie in [0, 1]; found {bad.size} values outside, e.g. "
                         f"{bad[0]} (use --kind logit for logits)")
    return p


def rater_folder_cases(raters_dir: str | os.PathLike, rater_glob: str = "*") -> dict[str, list[Path]]:
    """``{case: [rater files]}`` of a folder ``RATERS/<case>/<files matching rater_glob>``."""
    from orcal.io import natural_key, rater_files

    raters_dir = Path(raters_dir)
    if not raters_dir.is_dir():
        raise FileNotFoundError(f"--raters: no such directory: {raters_dir}")
    cases: dict[str, list[Path]] = {}
    for d in sorted((p for p in raters_dir.iterdir() if p.is_dir()), key=lambda p: natural_key(p.name)):
        files = rater_files(d, rater_glob)
        if not files:
            raise FileNotFoundError(f"--raters: no rater file matching {rater_glob!r} in {d}")
        cases[d.name] = files
    if not cases:
        raise FileNotFoundError(f"--raters: no case folders under {raters_dir}")
    return cases


def _read_rater_masks(files: list[Path], label: int | Sequence[int] | None = None) -> torch.Tensor:
    from orcal.io import check_same_grid, read_mask

    check_same_grid(files, "the raters of a case")
    masks = [read_mask(f, label=label) for f in files]
    shapes = {m.shape for m in masks}
    if len(shapes) > 1:
        raise ValueError(f"rater masks of {files[0].parent} have different shapes: "
                         + ", ".join(f"{f.name} {m.shape}" for f, m in zip(files, masks)))
    return torch.from_numpy(np.stack(masks))


def _match_shape(p: np.ndarray, spatial: tuple[int, ...], path: Path) -> np.ndarray:
    if p.shape == spatial:
        return p
    if p.size == math.prod(spatial) and tuple(s for s in p.shape if s != 1) == tuple(s for s in spatial if s != 1):
        return p.reshape(spatial)  # singleton axes, e.g. (1, H, W) or (H, W, 1)
    raise ValueError(f"{path}: prediction shape {p.shape} does not match the rater masks' shape {spatial}")


def _iter_cases(preds: dict[str, Path], dataset: str | None, root, split, task, raters, rater_glob,
                allow_missing: bool, dataset_options: dict[str, Any] | None = None,
                label: int | Sequence[int] | None = None, elsewhere: frozenset[str] = frozenset()
                ) -> tuple[list[str], Iterator[tuple[str, torch.Tensor, torch.Tensor | None, Path | None]],
                           dict[str, str] | None]:
    """Case ids in order, an iterator of ``(id, masks (R, *S) uint8, valid or None, a file on the case's
    voxel grid or None)`` and the dataset's ``{id: group}`` (patients; None for a rater folder); cases in
    ``elsewhere`` (the calibration cases) are not missing."""
    if (dataset is None) == (raters is None):
        raise ValueError("give the rater masks with exactly one of --dataset/--root or --raters")
    if raters is not None:
        folders = rater_folder_cases(raters, rater_glob)
        ids = list(folders)
        groups = None

        def load(case: str):
            return _read_rater_masks(folders[case], label), None, folders[case][0]
    else:
        from orcal.data import load_dataset

        options = dict(dataset_options or {})
        if label is not None:
            options["label"] = label
        ds = load_dataset(dataset, root, split=split, task=task, **options)
        ids = list(ds.ids)
        index = {case: i for i, case in enumerate(ids)}
        groups = dict(zip(ids, ds.groups)) if getattr(ds, "groups", None) is not None else None

        def load(case: str):
            item = ds[index[case]]
            return item["masks"], item.get("valid"), getattr(ds, "image_path", lambda i: None)(index[case])

    unmatched = sorted(set(preds) - set(ids))
    if unmatched:
        raise ValueError(f"{len(unmatched)} prediction(s) match no case: "
                         + ", ".join(preds[c].name for c in unmatched[:5]) + (" ..." if len(unmatched) > 5 else "")
                         + f" (known cases: {', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''})")
    missing = [c for c in ids if c not in preds and c not in elsewhere]
    if missing and not allow_missing:
        raise ValueError(f"{len(missing)} case(s) have no prediction: {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''} (use --allow-missing to evaluate the others)")
    todo = [c for c in ids if c in preds]

    def generate():
        for case in todo:
            yield case, *load(case)

    return todo, generate(), groups


def case_groups(ids: Sequence[str], group_by: str = "auto", known: dict[str, str] | None = None) -> list[str] | None:
    """The bootstrap's unit of each case (SPEC §5), or None to resample single images.

    ``group_by``: ``"auto"`` (the groups the dataset ``known``s, e.g. patients; images where it knows none),
    ``"image"``, or a regular expression searched in each case id whose first group (else whole match) names
    the case's group (a case it does not match is an error).
    """
    if group_by == "image" or (group_by == "auto" and known is None):
        return None
    if group_by == "auto":
        return [known[i] for i in ids]
    try:
        pattern = re.compile(group_by)
    except re.error as err:
        raise ValueError(f"--group-by: {group_by!r} is not 'auto', 'image' or a regular expression ({err})") from err
    out = []
    for case in ids:
        m = pattern.search(case)
        if m is None:
            raise ValueError(f"--group-by: {group_by!r} does not match case {case!r}; give a pattern every case id "
                             "matches, or --group-by image")
        out.append(m.group(1) if pattern.groups else m.group(0))
    return out


def _clean(value: Any) -> Any:
    """JSON-safe: NaN becomes null, numpy scalars and arrays become Python values."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def bootstrap_warning(n_images: int, n_boot: int) -> str | None:
    """The warning that goes with bootstrap intervals over ``n_images`` images, or None when there are enough."""
    if n_boot <= 0 or n_images >= MIN_BOOTSTRAP_IMAGES:
        return None
    return (f"the 95 % intervals come from only {n_images} image{'s' if n_images != 1 else ''}: below "
            f"{MIN_BOOTSTRAP_IMAGES} images the bootstrap has too few distinct resamples to give a 95 % interval; "
            "read them as a rough spread, not as confidence intervals")


def _fmt(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"


def _markdown(name: str, result: dict[str, Any], ci: dict[str, dict[str, float]] | None, n_boot: int,
              units: dict[str, Any] | None = None) -> str:
    lines = [f"# Evaluation of {name}", "",
             f"{result['n_images']} images, {result['n_pairs']:,} voxel–rater pairs.", ""]
    if ci:
        what = "the images" if not units or units["by"] == "image" else \
            f"the {units['n']} groups (patients, cases or volumes), each with all its images"
        lines += [f"95% intervals: {n_boot} bootstrap resamples of 60% of {what} (2.5 / 97.5 percentiles)."]
        warning = bootstrap_warning(result["n_images"], n_boot)
        if warning:
            lines += ["", f"**Warning:** {warning}."]
        lines += ["", "| metric | value | mean | std | 95% CI |", "|---|---:|---:|---:|---|"]
        for key in registry.keys():
            c = ci[key]
            lines.append(f"| {registry.label(key)} | {_fmt(result[key])} | {_fmt(c['mean'])} | {_fmt(c['std'])} | "
                         f"[{_fmt(c['low'])}, {_fmt(c['high'])}] |")
    else:
        lines += ["| metric | value |", "|---|---:|"]
        lines += [f"| {registry.label(key)} | {_fmt(result[key])} |" for key in registry.keys()]
    if "auc_binned" in result:
        lines += ["", f"AUC is exact; the streaming (binned) AUC is {_fmt(result['auc_binned'])}."]
    return "\n".join(lines) + "\n"


def _conformal_calibration(cal_dir, alpha: float, kind: str, source: dict[str, Any], label, evaluated: list[str],
                           progress: bool):
    """A :class:`~orcal.metrics.ConformalEvaluation` (every kind of SPEC §12 against a random rater) fitted on
    the calibration cases; voxels outside a case's valid mask count for nothing. Returns ``(it, n cases)``."""
    from orcal._progress import progress_bar
    from orcal.metrics import ConformalEvaluation

    preds = find_predictions(cal_dir)
    shared = sorted(set(preds) & set(evaluated))
    if shared:
        raise ValueError(f"--calibration: {len(shared)} case(s) are also evaluated ({', '.join(shared[:5])}); the "
                         "calibration and evaluated cases must be disjoint for the guarantee to hold")
    ids, cases, _ = _iter_cases(preds, allow_missing=True, label=label, **source)
    evaluation = ConformalEvaluation()
    for case, masks, valid, _ in progress_bar(cases, total=len(ids), desc="calibrate", unit="case",
                                              enabled=progress):
        evaluation.calibrate(_conformal_case(preds[case], masks, valid, kind))
    evaluation.fit(alpha)
    return evaluation, len(ids)


def _conformal_case(path: Path, masks: torch.Tensor, valid, kind: str):
    """A case as the conformal calibrators take it: a batch of one image, its raters cleared outside ``valid``."""
    from orcal.metrics.conformal_evaluation import Batch

    p = torch.from_numpy(_match_shape(load_prediction(path, kind), tuple(masks.shape[1:]), path))[None]
    return Batch.of(p, masks[None].bool(), None if valid is None else valid[None].bool())


def evaluate(pred_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dataset: str | None = None,
             root: str | os.PathLike | None = None, split: str | None = None, task: str | None = None,
             raters: str | os.PathLike | None = None, rater_glob: str = "*", n_bins: int = 15,
             auc_bins: int = 4096, n_boot: int = 1000, seed: int = 0, kind: str = "prob",
             exact_auc: bool = False, allow_missing: bool = False, name: str | None = None,
             progress: bool = True, dataset_options: dict[str, Any] | None = None,
             label: int | Sequence[int] | None = None, group_by: str = "auto", conformal: float | None = None,
             calibration: str | os.PathLike | None = None, calibration_split: str | None = None,
             save_conformal: str | os.PathLike | None = None) -> dict[str, Any]:
    """Evaluate the probability maps in ``pred_dir`` against rater masks and write the report to ``out_dir``.

    Args:
        pred_dir: folder of ``<case>.<ext>`` / ``<case>_prob.<ext>`` probability maps.
        out_dir: output folder (created).
        dataset, root, split, task: rater masks from :func:`orcal.data.load_dataset` ...
        raters, rater_glob: ... or from ``raters/<case>/<files matching rater_glob>``.
        n_bins, auc_bins: ECE bins and streaming-AUC score bins.
        n_boot: bootstrap resamples (0 skips the bootstrap); seed: its seed.
        group_by: the bootstrap's units (:func:`case_groups`): ``"auto"`` (the dataset's patients, cases or
            volumes; single images for a rater folder), ``"image"``, or a regular expression on case ids.
        kind: ``"prob"`` or ``"logit"`` (float maps are passed through a sigmoid).
        exact_auc: report the exact AUC (memory grows with the number of distinct scores).
        allow_missing: evaluate only the cases that have a prediction instead of failing.
        name: method name in the report and plots (default: the name of ``pred_dir``).
        dataset_options: further keyword arguments of :func:`orcal.data.load_dataset`.
        label: the structure to read from multi-label rater maps (an integer, or a list read as one).
        progress: show a progress bar.
        conformal, calibration, calibration_split: with ``conformal = alpha``, fit on the probability maps of the
            calibration folder (raters from the same source; ``calibration_split`` of ``dataset``, default
            ``split``) the FNR threshold and the volume intervals of SPEC §12 against a random rater, and report
            on the evaluated cases their test FNR, mask size, volume coverage and interval width; also the voxel
            sets' threshold, test miscoverage against a random rater and uncertain-voxel fraction.
        save_conformal: write the fitted calibrators there (``.json`` or ``.pt``, :func:`~orcal.metrics.
            save_conformal`) for ``orcal predict --conformal``.

    Returns:
        The content of ``metrics.json``; its ``warnings`` list says when the bootstrap intervals rest on fewer
        than :data:`MIN_BOOTSTRAP_IMAGES` images.
    """
    from orcal._progress import progress_bar
    from orcal.metrics import plots

    if kind not in ("prob", "logit"):
        raise ValueError(f"kind must be 'prob' or 'logit', got {kind!r}")
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    if (conformal is None) != (calibration is None):
        raise ValueError("--conformal ALPHA and --calibration DIR go together")
    if save_conformal is not None and conformal is None:
        raise ValueError("--save-conformal FILE needs --conformal ALPHA --calibration DIR")
    preds = find_predictions(pred_dir)
    name = name or Path(pred_dir).resolve().name
    elsewhere = frozenset(find_predictions(calibration)) if calibration is not None else frozenset()
    ids, cases, known = _iter_cases(preds, dataset, root, split, task, raters, rater_glob, allow_missing,
                                    dataset_options, label, elsewhere)
    groups = case_groups(ids, group_by, known)
    if conformal is not None:
        source = dict(dataset=dataset, root=root, split=split if calibration_split is None else calibration_split,
                      task=task, raters=raters, rater_glob=rater_glob, dataset_options=dataset_options)
        evaluation, n_cal = _conformal_calibration(calibration, conformal, kind, source, label, ids, progress)
        if save_conformal is not None:
            from orcal.metrics import save_conformal as save

            save(save_conformal, evaluation.calibrators)
    metric = MultiRaterCalibration(n_bins=n_bins, auc_bins=auc_bins, per_image=True, exact_auc=exact_auc)
    raters_per_case: list[int] = []
    for case, masks, valid, grid in progress_bar(cases, total=len(ids), desc="evaluate", unit="case",
                                                 enabled=progress):
        if grid is not None:
            check_same_grid([grid, preds[case]], "a prediction and its case's raters")
        spatial = tuple(masks.shape[1:])
        p = _match_shape(load_prediction(preds[case], kind), spatial, preds[case])
        try:
            metric.update(torch.from_numpy(p)[None], masks[None].to(torch.uint8),
                          valid=None if valid is None else valid[None].bool())
        except ValueError as err:
            raise ValueError(f"{preds[case]}: {err}") from err
        raters_per_case.append(int(masks.shape[0]))
        if conformal is not None:
            evaluation.measure(_conformal_case(preds[case], masks, valid, kind))
    result = metric.compute()
    stats = metric.stats()
    ci = bootstrap(stats, n_boot=n_boot, seed=seed, groups=groups) if n_boot > 0 else None
    units = {"by": "group", "n": len(set(groups))} if groups is not None and len(set(groups)) < len(ids) else \
        {"by": "image", "n": len(ids)}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_per_image(out / "per_image.csv", ids, raters_per_case, stats)
    report = {
        "method": name,
        "metrics": {key: result[key] for key in (*registry.keys(), "auc_binned") if key in result},
        "bootstrap": ci,
        "warnings": [w for w in [bootstrap_warning(result["n_images"], n_boot if ci else 0)] if w],
        "n_images": result["n_images"], "n_pairs": result["n_pairs"],
        "bins": {key: result["bins"][key] for key in ("lower", "upper", "count", "confidence", "accuracy")},
        "agreement": result["agreement"],
        "bootstrap_units": units,
        "config": {"n_bins": n_bins, "auc_bins": auc_bins, "n_boot": n_boot, "bootstrap_fraction": 0.6,
                   "group_by": group_by,
                   "seed": seed, "kind": kind, "exact_auc": exact_auc, "pred": str(pred_dir),
                   "dataset": dataset, "split": split, "task": task,
                   "raters": None if raters is None else str(raters)},
    }
    if conformal is not None:
        # each column's mean over the evaluated cases (orcal.metrics.conformal_evaluation.KINDS; volumes in mL
        # at 1 mm voxels) and the fitted thresholds and quantile
        report["conformal"] = {**evaluation.result(), "calibration": str(calibration), "n_calibration": n_cal,
                               "saved": None if save_conformal is None else str(save_conformal)}
    report = _clean(report)
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "metrics.md").write_text(_markdown(name, result, ci, n_boot, units))
    plots.reliability_diagram({name: result}, out / "reliability.png", title=f"Reliability of {name}")
    plots.confidence_vs_agreement({name: result}, out / "agreement.png",
                                  title=f"Confidence vs rater agreement: {name}")
    return report


def _write_per_image(path: Path, ids: list[str], raters: list[int], stats: CalibrationStats) -> None:
    values = registry.metrics_from_totals(stats)  # one value per row: each image on its own
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case", "raters", "pairs", *registry.keys()])
        for i, case in enumerate(ids):
            row = [float(values[key][i]) for key in registry.keys()]
            writer.writerow([case, raters[i], int(stats.n[i].sum()),
                             *("" if math.isnan(v) else f"{v:.6g}" for v in row)])


def __getattr__(name: str):
    if name == "METRICS":  # the columns of per_image.csv after case, raters and pairs: the metric table's keys
        return registry.keys()
    raise AttributeError(f"module 'orcal.evaluate' has no attribute {name!r}")
