"""The metrics' floor on a test set: oracle rows computed from the raters themselves, printed beside the tables.

MR-ECE scores a probability against the fraction of raters voting foreground, so an oracle that predicts
each voxel's own fraction ``p = k / R`` scores MR-ECE 0 (every bin's confidence equals its observed
fraction, SPEC §4); no trained row can beat it. ORC's majority readout answers another question, P(k ≥ m):
its oracle predicts ``P(Binomial(R, k/R) ≥ m)``, the majority probability of raters who vote foreground at
the voxel's observed rate, and its MR-ECE is what answering P(k ≥ m) instead of the fraction of raters costs
by construction, however well a model is trained. The rows are ``"oracle/expected"`` and ``"oracle/majority"``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from orcal.ops.stats import CalibrationStats

__all__ = ["ORACLE_LABELS", "majority_tail", "oracle_stats", "oracle_summaries", "oracle_table"]

#: Display labels of the oracle rows.
ORACLE_LABELS = {"oracle/expected": "Oracle p = k/R (MR-ECE's floor)",
                 "oracle/majority": "Oracle P(k ≥ m) at rate k/R (the majority readout's floor)"}


def majority_tail(num_raters: int, majority: int | None = None) -> torch.Tensor:
    """``tail[k] = P(Binomial(R, k / R) >= m)`` for ``k = 0..R`` (float64), ``m = R // 2 + 1`` by default."""
    R = int(num_raters)
    m = R // 2 + 1 if majority is None else int(majority)
    tail = []
    for k in range(R + 1):
        pi = k / R
        tail.append(sum(math.comb(R, j) * pi ** j * (1 - pi) ** (R - j) for j in range(m, R + 1)))
    return torch.tensor(tail, dtype=torch.float64)


def oracle_stats(dataset, n_bins: int = 15, auc_bins: int = 4096, majority: int | None = None
                 ) -> dict[str, CalibrationStats] | None:
    """Per-image statistics of the two oracle rows on ``dataset`` (items with binary ``masks (R, *S)``, and
    ``valid`` where they have it); None for rater label maps of several structures."""
    from orcal.metrics import MultiRaterCalibration

    metrics = {row: MultiRaterCalibration(n_bins=n_bins, auc_bins=auc_bins, per_image=True) for row in ORACLE_LABELS}
    for i in range(len(dataset)):
        item = dataset[i]
        if item.get("num_structures") is not None:
            return None
        masks = torch.as_tensor(item["masks"]).to(torch.uint8)
        R = masks.shape[0]
        k = masks.long().sum(0)
        valid = item.get("valid")
        valid = None if valid is None else torch.as_tensor(valid).bool()[None]
        probs = {"oracle/expected": k.double() / R, "oracle/majority": majority_tail(R, majority)[k]}
        for row, p in probs.items():
            metrics[row].update(p.float()[None], masks[None], valid=valid)
    return {row: m.stats() for row, m in metrics.items()}


def oracle_summaries(dataset, cfg, groups: Sequence | None = None) -> dict[str, dict[str, Any]]:
    """``{row: {metric: summary}}`` of the oracle rows on the test ``dataset``, with the experiment's bootstrap
    (``cfg.n_boot``, ``cfg.fraction``, ``cfg.seed``; ``groups`` as the tables); empty for several structures."""
    from orcal.metrics.comparison import seed_summary

    stats = oracle_stats(dataset, n_bins=int(cfg.n_bins), auc_bins=int(cfg.auc_bins))
    if stats is None:
        return {}
    return {row: seed_summary([st], n_boot=int(cfg.n_boot), fraction=float(cfg.fraction), seed=int(cfg.seed),
                              groups=groups) for row, st in stats.items()}


def oracle_table(oracles: dict[str, dict[str, Any]], digits: int = 4) -> str:
    """Markdown: each oracle row's test-set MR-ECE, AUC and Dice (no interval: the floor is a property of the
    test set, not of a model)."""
    from orcal.metrics.registry import label

    metrics = ("mr_ece", "auc", "dice")
    lines = [f"| Floor | {' | '.join(label(m) for m in metrics)} |", "|---|" + "---|" * len(metrics)]
    for row, summary in oracles.items():
        cells = []
        for m in metrics:
            v = summary.get(m, {}).get("value")
            cells.append("n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}")
        lines.append(f"| {ORACLE_LABELS.get(row, row)} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"
