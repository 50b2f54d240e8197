"""The benchmark suite's report: its rows and extras as one Markdown table, written beside the JSON."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any


def _fmt(x: float, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


SASS_EXTRA = "Kernel instruction counts (sm_90a)"


def markdown(rows: Sequence[Any], meta: dict, ops: Sequence[str], providers: Sequence[str]) -> str:
    """The table of the suite's ``rows`` (:class:`benchmarks.suite.Row`), ops and providers in the given order."""
    lines = [
        f"# orcal benchmarks: {meta['device_description']}",
        "",
        f"torch {meta['torch']}, orcal {meta['orcal']} ({meta['cpu_isa']} CPU kernels), "
        f"{meta['date']}. Memory floor: a {meta['copy_mb']:.0f} MB tensor copy moves {meta['copy_gbs']:.1f} GB/s "
        "(read + write).",
        "",
        "Pattern: a user's loop. Each loss call takes a fresh logits leaf (`z = x.detach().requires_grad_(); "
        "loss(z, k).backward()`), its gradient freed with it; the allocator is the default one while timing. "
        f"Spread: the range of the medians of {meta.get('processes', 1)} separate processes (one process: none). "
        "Median of repeated runs after a warm-up. GB/s counts the bytes the op must move at least (loss fwd+bwd: "
        "logits read + gradient written + k read; stats: probabilities + rater masks read; readout: logits read + "
        "p written); `% copy` is that rate over the copy's. Peak extra MB: "
        + ("`torch.cuda.max_memory_allocated` above the memory in use before the call."
           if meta["device"] == "cuda" else
           "growth of the resident-set high-water mark over the resident size before the call (glibc set to "
           "return large blocks on free), outputs included: for the loss, the gradient left in `.grad`.")
        + " Check: what the provider computes, and its distance to the compiled kernels' value (the eager "
        "reference where none are built). Peers: `cross_entropy` is `F.cross_entropy` on the same R + 1 "
        "channels, `bce` a one-channel BCE with logits to k / R, `torchmetrics` a binary ECE on expanded pairs, "
        "`monai_ece` MONAI's CalibrationErrorMetric per image on y = k / R (averaged over images, not pooled), "
        "`auroc` torchmetrics' exact BinaryAUROC on expanded pairs. Spread is left out for torch.compile (each "
        "process would compile again) and for calls slower than a second.",
        "",
        "| op | size | shape (B x C x S) | R | provider | median ms | spread ms | Mvoxel/s | GB/s | % copy | "
        "x eager | peak extra MB | check |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {p: i for i, p in enumerate(providers)}
    for r in sorted(rows, key=lambda r: (list(ops).index(r.op), r.size, r.R, order[r.provider])):
        if r.error:
            lines.append(f"| {r.op} | {r.size} | {r.shape} | {r.R} | {r.provider} | failed: {r.error} "
                         "| | | | | | | |")
            continue
        spread = "-" if r.spread_ms is None else f"{r.spread_ms[0]:.2f}–{r.spread_ms[1]:.2f}"
        lines.append(
            f"| {r.op} | {r.size} | {r.shape} | {r.R} | {r.provider} | {_fmt(r.median_ms, '.2f')} | {spread} | "
            f"{_fmt(r.mvox_per_s, '.1f')} | {_fmt(r.gb_per_s, '.2f')} | {_fmt(100 * r.frac_copy, '.1f')} | "
            f"{_fmt(r.speedup_vs_torch, '.1f')} | {_fmt(r.peak_extra_mb, '.1f')} | {r.check} |")
    for name, extra in meta.get("extras", {}).items():
        lines += ["", f"## {name}", ""]
        if name.startswith("Share of a training step") and "error" not in extra:
            lines += ["One SGD step (forward, loss, backward, update; median) and the loss alone (fwd + bwd on the "
                      "step's logits, a fresh leaf each call).", "",
                      "| network | input | loss | step ms | loss ms | share of the step |", "|---|---|---|---|---|---|"]
            for net, entry in extra.items():
                for loss, t in entry["losses"].items():
                    lines.append(f"| {net} | {'x'.join(map(str, entry['input']))} | {loss} | {t['step_ms']:.1f} | "
                                 f"{t['loss_ms']:.2f} | {100 * t['share_of_step']:.2f} % |")
            continue
        if name.startswith("Several structures") and "error" not in extra:
            lines += [f"C = {extra['C']} structures of R = {extra['R']} raters on {extra['shape (B x C(R+1) x S)']} "
                      f"logits ({extra['backend']} backend): one call on all structures against a loop that slices "
                      "each structure's channels (the loss: a fresh leaf and backward per call).", "",
                      "| op | one call ms | loop over structures ms | loop / one call |", "|---|---|---|---|"]
            for op in ("loss fwd+bwd", "calibration_stats"):
                t = extra[op]
                lines.append(f"| {op} | {t['one call ms']:.2f} | {t['loop over structures ms']:.2f} | "
                             f"{t['loop / one call']:.2f} |")
            continue
        if name == SASS_EXTRA and "table" in extra:
            lines += ["Compiled for sm_90a without a GPU; warp-instructions per voxel of the hot loop against what an "
                      "H100 can issue per voxel while streaming at copy bandwidth (benchmarks/sass.py).", "",
                      extra["table"]]
            continue
        lines += ["```", json.dumps(extra, indent=1, default=str), "```"]
    return "\n".join(lines) + "\n"


def write(rows: Sequence[Any], meta: dict, out_dir: Path | str | None, ops: Sequence[str],
          providers: Sequence[str]) -> None:
    """``<out_dir>/<device>[-quick].{md,json}``; nothing when ``out_dir`` is None."""
    if out_dir is None:
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = meta["device_name"] + ("-quick" if meta["quick"] else "")
    (out / f"{stem}.md").write_text(markdown(rows, meta, ops, providers))
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1,
                                                 default=str))
    meta["written"] = [str(out / f"{stem}.md"), str(out / f"{stem}.json")]
