"""The Markdown report of a multi-rater experiment and everything written beside it.

:func:`write_outputs` writes an experiment's tables (:mod:`orcal.experiment.tables`), its figures
(:mod:`orcal.experiment.figures`), ``report.md`` (:func:`render_report`) and ``results.json``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orcal.experiment.figures import plot_dataset, plot_sweep
from orcal.experiment.oracle import oracle_table
from orcal.experiment.runs import jsonable, slug
from orcal.experiment.tables import (
    TABLES,
    Table,
    comparison_table,
    conformal_csv,
    conformal_table,
    dataset_table,
    is_finite,
    metric_results_table,
    row_label,
    selection_table,
    sort_rows,
    structure_columns,
    sweep_table,
    volume_table,
    write_tables,
)
from orcal.heads import parse_row
from orcal.metrics.registry import label as metric_label

#: How the report explains its numbers (after the tables).
READING = ("How to read the tables: the centre of each cell is the metric on the whole test split (averaged over "
           "seeds when there are several); ± is the standard deviation over seeds, or over bootstrap resamples with "
           "one seed; the brackets hold the 2.5 and 97.5 percentiles of the bootstrap. The bootstrap resamples "
           "{pct} % of the test images with replacement; ECE computed on fewer images is larger (the noise of "
           "small bins adds to it), so the bootstrap's mean and interval are biased upward and can lie above the "
           "test-set value. Use the intervals to compare methods — the paired table below resamples the same "
           "images for both rows — not as an interval around the value.")


VOLUME_READING = (
    "Each test volume's predicted volume, as the normal distribution of a sum of independent voxels (mean "
    "Σp, variance Σp(1−p), SPEC §11.4), scored against every rater's volume: the CRPS and the error of the "
    "mean (mL; lower is better) and the fraction of raters' volumes inside the central 90 % interval (0.9 is "
    "calibrated). Volumes are in mL where the data gives a voxel size, else in thousands of voxels.")


CONFORMAL_READING = (
    "Each row's conformal guarantees against a random rater (SPEC §12), calibrated on the validation split (the "
    "calibration set, exchangeable with the test split image by image, or patient by patient where images "
    "share one) at α = {alpha:g} and measured on the test split; one calibration per row and seed, the + TS "
    "rows on their scaled probabilities. *FNR*: the test images' mean false-negative rate of the mask p ≥ λ "
    "against a random rater (λ by conformal risk control; guaranteed ≤ α in expectation); *mask size*: the "
    "mask's mean fraction of voxels, the price of the guarantee. *Volume coverage*: the fraction of raters' "
    "volumes inside each image's interval μ ± zσ *before* (the nominal {level:g} % interval of the predicted "
    "volume distribution, SPEC §11.4) and μ ± qσ *after* conformal recalibration (guaranteed ≥ 1 − α); "
    "*interval width*: the mean width (μ, σ as in the volume table, σ at least one voxel). *Set miscoverage*: "
    "the fraction of (voxel, rater) pairs whose label lies outside the voxel's conformal label set (guaranteed "
    "≤ α in expectation); *uncertain voxels*: the fraction whose set holds both labels. Cells as in the tables "
    "above (value ± spread [bootstrap 2.5–97.5 %], the same resampled images for every row). The guarantees "
    "hold in expectation over calibration and test sets, and one calibration set of n patients (images) moves "
    "a realised rate by about sqrt(α (1 − α) / n) (SPEC §12.6), which the test bootstrap does not see: † marks "
    "a row past its target by more than both noises together (SPEC §12.5); of the other rows, the smallest mask "
    "or width is bold (the trained and + TS rows ranked apart).")


def _setting_text(value: Any) -> str:
    """A settings cell: never empty."""
    if value is None:
        return "none"
    if isinstance(value, (list, tuple, dict)) and not value:
        return "none"
    if isinstance(value, str) and not value:
        return "none"
    return f"`{value}`"


def _targets_text(settings: Mapping) -> str:
    """Which targets STAPLE and SIMPLE were trained on (their ``hard`` option, ``--hard-targets``)."""
    hard = bool((settings.get("fusion_options") or {}).get("hard"))
    if hard:
        return " STAPLE and SIMPLE are trained on hard targets (their estimate thresholded at 0.5, `--hard-targets`)."
    return (" STAPLE and SIMPLE are trained on soft targets (STAPLE's posterior, SIMPLE's Dice-weighted vote; "
            "`--hard-targets` thresholds them).")


def render_report(results: Mapping, tables: Mapping[str, Table], figures: Mapping[str, str],
                  sweeps: Mapping[str, str] | None = None) -> str:
    """The Markdown report: the findings (``results["findings"]``), datasets, the tables, paired comparisons,
    the validation selection, temperatures, figures, the sweep, settings, timings and hardware.

    ``results`` is the experiment's ``results.json`` content, ``figures`` maps a caption to a path
    relative to the report, ``sweeps`` maps a dataset to its sweep table in Markdown.
    """
    s = results.get("settings", {})
    seeds = s.get("seeds") or [s.get("seed", "?")]
    lines = ["# orcal experiment report", ""]
    if results.get("findings"):  # orcal.experiment.findings writes it from the numbers
        lines += ["## Findings", "", results["findings"]]
    lines += ["Multi-annotation strategies against Ordinal Rater Consensus (ORC), evaluated on the held-out "
              f"test split with per-image multi-rater statistics, over {len(seeds)} training seed"
              f"{'s' if len(seeds) != 1 else ''} ({', '.join(str(x) for x in seeds)}), and the bootstrap "
              f"({s.get('n_boot', '?')} resamples of {100 * float(s.get('fraction', 0.6)):.0f} % of the test "
              f"images with replacement, seed {s.get('seed', '?')}). MR-ECE uses {s.get('n_bins', 15)} "
              "equal-width bins over voxel–rater pairs; AUC counts every voxel's k positive and R − k negative "
              "pairs. ORC is reported with its readouts: *majority* (the paper's, the probability that a "
              "majority of raters vote foreground: k ≥ m with m = ⌊R/2⌋ + 1, so for an even R a tie of R/2 votes "
              "counts as background), *expected* (the expected fraction of raters voting "
              "foreground, the quantity MR-ECE scores against) and, where R is even, *half-tie* "
              "(P(k > R/2) + ½ P(k = R/2): a tie counts half; for odd R it is the majority readout)."
              + _targets_text(s)
              + (" Rows marked *+ TS* divide the same network's logits by one temperature fitted on the validation "
                 "split against the voxel–rater pairs (`orcal.metrics.calibrate`; one temperature per row and seed)."
                 if any(parse_row(row).scaled for by_row in results.get("runs", {}).values() for row in by_row)
                 else ""), ""]
    lines += ["## Datasets", "", "| dataset | raters | train | val | test | image size (test split) | channels |",
              "|---|---|---|---|---|---|---|"]
    for key, d in results.get("datasets", {}).items():
        ranges = d.get("image_size_range") or [[x, x] for x in d.get("image_shape", [])]
        size = " × ".join(str(a) if a == b else f"{a}–{b}" for a, b in ranges) or "?"
        raters = f"{d.get('num_raters', '?')}" + (f" ({d['num_structures']} structures)" if d.get("num_structures")
                                                  else "")
        lines.append(f"| {key} | {raters} | {d.get('n_train', '?')} | {d.get('n_val', '?')} | "
                     f"{d.get('n_test', '?')} | {size} | {d.get('channels', '?')} |")
    lines.append("")
    units = {key: d["bootstrap_units"] for key, d in results.get("datasets", {}).items() if d.get("bootstrap_units")}
    if units:
        lines += ["Bootstrap units: " + "; ".join(
            f"{key}: {u['n']} groups (patients, cases or volumes) of {u['images']} test images, each group drawn "
            "with all its images" if u["by"] == "group" else f"{key}: {u['n']} test images (no groups known)"
            for key, u in units.items()) + " (SPEC §5).", ""]
    for name in ("table1_mr_ece", "table2_auc", "table3_dice"):
        if name in tables:
            lines += [tables[name].to_markdown(), ""]
    lines += [READING.format(pct=f"{100 * float(s.get('fraction', 0.6)):.0f}"), ""]
    if results.get("oracles"):
        lines += ["**The metrics' floor** on each test set, from the raters themselves (no model): predicting each "
                  "voxel's fraction of raters k/R is MR-ECE's perfect predictor (0 by construction), and predicting "
                  "P(k ≥ m) for raters voting at that rate is an oracle majority readout: its MR-ECE is what answering "
                  "P(k ≥ m) instead of the fraction of raters costs by construction, however well a model is trained. "
                  "These rows are not ranked.",
                  ""]
        for key, oracles in results["oracles"].items():
            lines += [f"**{key}**", "", oracle_table(oracles), ""]
    per_structure = [(key, metric, structure_columns(by_row, metric)) for key, by_row in results.get("runs", {}).items()
                     for metric in ("mr_ece", "auc", "dice")]
    if any(columns for _, _, columns in per_structure):
        lines += ["## Per structure", "", "Each structure scored one-vs-rest against its raters; *macro* is the "
                  "unweighted mean over structures, while the tables above pool the voxel–rater pairs of every "
                  "structure (SPEC §11).", ""]
        for key, metric, columns in per_structure:
            if columns:
                lines += [f"**{key}: {metric_label(metric)}**", "", dataset_table(results["runs"], key, columns), ""]
    if any(results.get("volumes", {}).values()):
        lines += ["## Volume uncertainty", "", VOLUME_READING, ""]
        for key, by_row in results["volumes"].items():
            lines += [f"**{key}**", "", volume_table(by_row), ""]
    if results.get("conformal"):
        alpha = next(iter(results["conformal"].values()))["alpha"]
        lines += ["## Conformal guarantees", "", CONFORMAL_READING.format(alpha=alpha, level=100 * (1 - alpha)), ""]
        for key, entry in results["conformal"].items():
            n, units = entry["n_calibration"], entry.get("n_calibration_units", entry["n_calibration"])
            of = f" of {units} patients (cases, volumes)" if units != n else ""
            lines += [f"**{key}** (α = {entry['alpha']:g}, {n} calibration images{of})", "",
                      conformal_table(entry), ""]
    comparisons = results.get("comparisons", {})
    if any(comparison_table(c) for c in comparisons.values()):
        lines += ["## Paired comparisons", "", "Each row minus the reference row, seed by seed on the same test "
                  "images; the interval is the bootstrap of the seed-averaged difference with the same resampled "
                  "images for both rows. * marks a difference whose interval excludes 0 and whose sign every "
                  "seed shares.", ""]
        for key, c in comparisons.items():
            lines += [f"**{key}**", "", comparison_table(c), ""]
    selection = {k: selection_table(v, results.get("runs", {}).get(k, {}))
                 for k, v in results.get("selection", {}).items()}
    if any(selection.values()):
        lines += ["## Settings chosen on the validation split", "",
                  f"Each row reports the candidate with the lowest validation MR-ECE (seed {seeds[0]}; the "
                  "criterion is the validation MR-ECE alone); the other seeds train the chosen setting. λ weighs the "
                  "RPS normalised by R (SPEC §3).", ""]
        for key, text in selection.items():
            if text:
                lines += [f"**{key}**", "", text, ""]
    temperatures = results.get("temperatures", {})
    if any(temperatures.values()):
        lines += ["## Fitted temperatures", "", "| dataset | row | T per seed |", "|---|---|---|"]
        for key, by_row in temperatures.items():
            for row in sort_rows(list(by_row)):
                ts = ", ".join("n/a" if not is_finite(t) else f"{t:.3f}" for t in by_row[row])
                lines.append(f"| {key} | {row_label(row)} | {ts} |")
        lines += ["", "T > 1 softens an over-confident network, T < 1 sharpens an under-confident one.", ""]
    if figures:
        lines += ["## Figures", "", f"The figures show the first seed ({seeds[0]}) and the rows without temperature "
                  "scaling; the reliability legend gives each row's test-set MR-ECE of that seed (Table 1's value "
                  "with one seed).", ""]
        for caption, rel in figures.items():
            lines += [f"**{caption}**", "", f"![{caption}]({rel})", ""]
    if sweeps:
        lines += ["## RPS weight sweep (ordinal method, first seed)", ""]
        for key, text in sweeps.items():
            lines += [f"**{key}**", "", text, ""]
    lines += ["## Settings", "", "| setting | value |", "|---|---|"]
    for k, v in s.items():
        lines.append(f"| {k} | {_setting_text(v)} |")
    lines.append("")
    timing = results.get("timings", {})
    if timing:
        lines += ["## Timings (seconds)", "", "| dataset | run | train | evaluate | epochs | steps |",
                  "|---|---|---|---|---|---|"]
        for ds, by in timing.items():
            for run, t in by.items():
                lines.append(f"| {ds} | {run} | {t.get('train_s', 0):.1f} | {t.get('eval_s', 0):.1f} | "
                             f"{t.get('epochs', '')} | {t.get('steps', '')} |")
        lines.append("")
        compute = results.get("compute_seconds")
        total = results.get("total_seconds")
        if is_finite(compute):
            text = f"Training and evaluation, all runs: {compute / 60:.1f} min"
            if is_finite(total):
                text += f" (the last invocation, which reuses finished runs, took {total / 60:.1f} min)"
            lines += [text + ".", ""]
    hw = results.get("hardware", {})
    if hw:
        lines += ["## Hardware and software", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in hw.items()]
        lines.append("")
    command = results.get("command")
    if command:
        lines += ["## Reproduce", "", "```bash", command, "```", ""]
    return "\n".join(lines)


def write_outputs(results: dict[str, Any], out: Path, panels: Mapping[str, Mapping[str, Mapping]],
                  cases: Mapping[str, dict]) -> None:
    """An experiment's tables (md, csv), figures, ``report.md`` and ``results.json`` under ``out``.

    ``panels[dataset]`` holds the figures' data by row label: ``"stats"`` (test statistics), ``"agreement"``
    (confidence-vs-agreement tables) and ``"maps"`` (the qualitative case's probability maps); ``cases`` the
    qualitative case per dataset.
    """
    paths = write_tables(results["runs"], out)
    tables = {name: metric_results_table(results["runs"], metric, title=title) for name, metric, title in TABLES}
    figures: dict[str, str] = {}
    fig_dir = out / "figures"
    fig_dir.mkdir(exist_ok=True)
    for key, panel in panels.items():
        figures.update(plot_dataset(key, slug(key), fig_dir, dict(panel["stats"]), dict(panel["agreement"]),
                                    dict(panel["maps"]), cases[key]))
    for key in results["runs"]:
        text = dataset_table(results["runs"], key, ("mr_ece", "auc", "dice", "brier"))
        (out / f"summary_{slug(key)}.md").write_text(text, encoding="utf-8")
        for metric in ("mr_ece", "auc", "dice"):  # several structures (SPEC §11): a column per structure
            columns = structure_columns(results["runs"][key], metric)
            if columns:
                (out / f"structures_{metric}_{slug(key)}.md").write_text(
                    dataset_table(results["runs"], key, columns), encoding="utf-8")
    for key, entry in results.get("conformal", {}).items():
        path = out / f"conformal_{slug(key)}.md"
        path.write_text(conformal_table(entry), encoding="utf-8")
        paths[path.name] = path
    if results.get("conformal"):
        path = out / "conformal.csv"
        path.write_text(conformal_csv(results["conformal"]), encoding="utf-8")
        paths[path.name] = path
    sweeps_md: dict[str, str] = {}
    for key, sweep in results.get("sweeps", {}).items():
        text = sweep_table(sweep)
        sweeps_md[key] = text
        (out / f"sweep_{slug(key)}.md").write_text(text, encoding="utf-8")
        path = plot_sweep(sweep, fig_dir / f"sweep_{slug(key)}.png", title=key)
        figures[f"{key}: MR-ECE and AUC against the RPS weight"] = str(path.relative_to(out))
    results["files"] = sorted(str(p.relative_to(out)) for p in paths.values())
    results["figures"] = figures
    (out / "results.json").write_text(json.dumps(jsonable(results), indent=1), encoding="utf-8")
    (out / "report.md").write_text(render_report(results, tables, figures, sweeps_md), encoding="utf-8")
