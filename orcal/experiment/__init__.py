"""The multi-rater experiment: train every strategy, evaluate on the held-out test split, write the report.

For each dataset, each training seed and each method (SPEC §6 baselines and the ordinal method) the experiment
trains a model with :func:`orcal.train.train`, fits a temperature on the validation split (SPEC §10),
predicts the test split, accumulates per-image multi-rater statistics (SPEC §4) and keeps one results file
per run, so that an interrupted experiment resumes where it stopped. The ordinal method is evaluated with
both readouts (SPEC §2). Optionally the smoothing width and the RPS weight are chosen on the validation
split. Rows are summarised over seeds and compared pairwise (SPEC §5.1, :mod:`orcal.metrics.comparison`);
finally it writes the tables, the figures, the findings and ``report.md`` / ``results.json``.

- :mod:`~orcal.experiment.config`: what an experiment is (datasets, methods, presets, planned runs, sweeps,
  fingerprints).
- :mod:`~orcal.experiment.data`: the splits, kept in memory, and the qualitative test case.
- :mod:`~orcal.experiment.execute`: one run (train, fit temperatures, evaluate) and its record.
- :mod:`~orcal.experiment.runs`: the per-run files that make an experiment resumable.
- :mod:`~orcal.experiment.selection`: settings chosen on the validation split; seeds and paired comparisons.
- :mod:`~orcal.experiment.conformal`: with ``conformal=alpha``, each row's conformal guarantees (SPEC §12),
  calibrated on the validation split; the registry of their columns.
- :mod:`~orcal.experiment.driver`: :func:`run_experiment`, from the plan to the written report.
- :mod:`~orcal.experiment.tables`, :mod:`~orcal.experiment.figures`, :mod:`~orcal.experiment.findings`,
  :mod:`~orcal.experiment.report`: what is written.

>>> import tempfile
>>> cfg = ExperimentConfig(datasets=[DatasetSpec("synthetic", options={"n": 24, "shape": (16, 16)})],
...                        methods=("soft", "ordinal"), arch="unet-small", epochs=1, max_steps=1, n_boot=20,
...                        out=tempfile.mkdtemp(), progress=False)
>>> results = run_experiment(cfg, log=lambda *args: None)
>>> sorted(results["runs"]["Synthetic (R=5)"])
['ordinal/expected', 'ordinal/expected+ts', 'ordinal/majority', 'ordinal/majority+ts', 'soft', 'soft+ts']
"""

from orcal.experiment.config import (
    PRESETS,
    RESULTS_VERSION,
    SELECTION_GRIDS,
    DatasetSpec,
    ExperimentConfig,
    Run,
    candidate_runs,
    cfg_with,
    fingerprint,
    plan_runs,
    preset_config,
)
from orcal.experiment.data import CachedDataset, load_split, pick_case
from orcal.experiment.driver import resolve_device, run_experiment, seed_dir
from orcal.experiment.execute import evaluate_run, execute_run, report_bootstrap
from orcal.experiment.runs import jsonable, load_case_maps, load_run, load_run_stats, run_files, safe_name
from orcal.experiment.selection import compare_rows, select_rows
from orcal.heads import ORDINAL_READOUTS, TS_SUFFIX

__all__ = [
    "ORDINAL_READOUTS",
    "PRESETS",
    "RESULTS_VERSION",
    "SELECTION_GRIDS",
    "TS_SUFFIX",
    "CachedDataset",
    "DatasetSpec",
    "ExperimentConfig",
    "Run",
    "candidate_runs",
    "cfg_with",
    "compare_rows",
    "evaluate_run",
    "execute_run",
    "fingerprint",
    "jsonable",
    "load_case_maps",
    "load_run",
    "load_run_stats",
    "load_split",
    "pick_case",
    "plan_runs",
    "preset_config",
    "report_bootstrap",
    "resolve_device",
    "run_experiment",
    "run_files",
    "safe_name",
    "seed_dir",
    "select_rows",
]
