"""The files an experiment keeps per run (``runs/<dataset>/<run>.{json,stats.pt,case.npz}``, and
``<run>.conformal.pt`` with conformal columns), so that an interrupted experiment resumes where it stopped: a
run whose json exists with the same fingerprint is done."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch


def safe_name(text: str) -> str:
    """``text`` with only file-name safe characters."""
    return "".join(c if c.isalnum() or c in "-_.@" else "_" for c in text)


def slug(text: str) -> str:
    """A file-name friendly form of a dataset key: ``"Synthetic (R=5)"`` -> ``"synthetic-r-5"``."""
    out = "".join(c.lower() if c.isalnum() else "-" for c in text)
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-") or "dataset"


def jsonable(x):
    """``x`` with arrays as lists and non-finite floats as None, for ``json.dumps``."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, Path):
        return str(x)
    return x


def run_files(run_dir: Path, run) -> dict[str, Path]:
    """The json record, statistics and qualitative-case files of ``run`` (an :class:`orcal.experiment.Run`)."""
    base = run_dir / safe_name(run.key)
    # never with_suffix: a key such as "ordinal@0.5" has a dot of its own
    return {"json": Path(f"{base}.json"), "stats": Path(f"{base}.stats.pt"), "case": Path(f"{base}.case.npz"),
            "conformal": Path(f"{base}.conformal.pt")}


def load_run(run_dir: Path, run, fingerprint: str) -> dict[str, Any] | None:
    """A finished run's record, or None when it is absent, incomplete or from other settings."""
    files = run_files(run_dir, run)
    if not files["json"].is_file() or not files["stats"].is_file():
        return None
    try:
        record = json.loads(files["json"].read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if record.get("fingerprint") != fingerprint:
        return None
    record["readouts"] = _by_readout(run, record.get("readouts", {}))
    return record


def _by_readout(run, by_name: dict[str, Any]) -> dict[str, Any]:
    """``by_name`` keyed by the run head's readout names (records written before a binary head's readout had
    its own name call it "majority")."""
    return {run.head.readout(name): value for name, value in by_name.items()}


def load_run_stats(run_dir: Path, run) -> dict[str, Any]:
    """Per-readout :class:`~orcal.ops.stats.CalibrationStats` of a finished run."""
    from orcal.ops.stats import CalibrationStats

    path = run_files(run_dir, run)["stats"]
    try:
        saved = torch.load(path, weights_only=True)
        return _by_readout(run, {readout: CalibrationStats.from_dict(d) for readout, d in saved.items()})
    except Exception as err:  # truncated or damaged: name the file rather than show a traceback
        raise ValueError(f"{path}: the run's statistics could not be read ({type(err).__name__}: {err}); delete "
                         f"it and its {path.name.replace('.stats.pt', '.json')} to rerun that run") from err


def conformal_missing(run_dir: Path, run, record: dict[str, Any], alpha: float) -> str | None:
    """Why a finished run's record cannot give the conformal columns at ``alpha`` (None when it can): recorded
    without them, at another alpha, or without its per-image file."""
    found = {(e.get("conformal") or {}).get("alpha") for e in record.get("readouts", {}).values()}
    if found == {None}:
        return "recorded without conformal results"
    if found != {float(alpha)}:
        return f"conformal results recorded at alpha {', '.join(str(a) for a in sorted(found, key=str))}, not {alpha}"
    from orcal.experiment.conformal import KINDS

    kinds = {k.name for k in KINDS}
    lacking = sorted({k for e in record.get("readouts", {}).values()
                      for k in kinds - set((e.get("conformal") or {}).get("fitted") or {})})
    if lacking:
        return f"recorded without the conformal {', '.join(lacking)} columns"
    if not run_files(run_dir, run)["conformal"].is_file():
        return f"{run_files(run_dir, run)['conformal'].name} (the per-image conformal values) is missing"
    return None


def load_conformal(run_dir: Path, run) -> dict[str, dict[str, torch.Tensor]]:
    """Per-readout per-image conformal values ``{readout: {column: (N, C)}}`` of a finished run."""
    path = run_files(run_dir, run)["conformal"]
    try:
        return _by_readout(run, torch.load(path, weights_only=True))
    except Exception as err:  # truncated or damaged: name the file rather than show a traceback
        raise ValueError(f"{path}: the run's conformal values could not be read ({type(err).__name__}: {err}); "
                         f"delete it to rerun that run") from err


def load_case_maps(run_dir: Path, run) -> dict[str, np.ndarray]:
    """Per-readout probability map of the qualitative case (empty when it was not predicted)."""
    path = run_files(run_dir, run)["case"]
    if not path.is_file():
        return {}
    with np.load(path, allow_pickle=False) as z:
        return _by_readout(run, {k: z[k] for k in z.files})
