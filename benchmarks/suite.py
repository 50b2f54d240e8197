"""The benchmark suite: every op and backend on the same inputs, one table.

For each case (op, size, R) and provider it measures the median wall time of repeated runs after a warm-up,
voxels/s, effective GB/s (the bytes the op must move at least), that rate as a fraction of the memory
bandwidth of a large tensor copy measured in the same run, and the peak extra memory of one call. With
``processes > 1`` each case is also timed in that many fresh processes: the spread a user sees between runs.

The pattern timed is a user's loop: the loss step takes a fresh logits leaf each call
(``z = x.detach().requires_grad_(); loss(z, k).backward()``), the gradient is freed with it, and the
allocator is the platform's default (glibc's, untuned) while timing. Peers are what users would otherwise
call (:mod:`benchmarks.peers`): ``F.cross_entropy`` and one-channel BCE for the loss, torchmetrics on
expanded pairs, MONAI's ECE and torchmetrics' exact AUROC for the statistics.

Peak extra memory: on CUDA, ``torch.cuda.max_memory_allocated`` above what was allocated before the call.
On the CPU, the growth of the process's resident-set high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``) over its resident size before the call, measured after the timing (in the fresh
processes of the spread when there are some) with glibc's malloc then told to return every large block to
the system on free, so the number is what the call really touched: outputs included (for the loss, the
gradient kept in ``.grad``), caches of the allocator excluded.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import orcal
from benchmarks import peers, report
from benchmarks.measure import (
    copy_bandwidth,
    cpu_isa,
    device_description,
    device_name,
    malloc_returns_memory,
    peak_extra_mb,
    time_fn,
)
from orcal.ops import _ext
from orcal.ops import reference as ref

OPS = ("loss", "stats", "readout")
PROVIDERS = ("cpp", "triton", "torch", "compile", "torchmetrics", *peers.LOSS_PEERS, *peers.STATS_PEERS)
RATERS = (3, 7)
RESULTS = Path(__file__).parent / "results"


@dataclass
class Size:
    """One input size: ``batch`` images of ``spatial`` voxels (R + 1 channels for logits)."""

    name: str
    batch: int
    spatial: tuple[int, ...]

    @property
    def voxels(self) -> int:
        return self.batch * math.prod(self.spatial)


def default_sizes(device: str, quick: bool) -> list[Size]:
    """A 2D batch and a CT volume (bigger on a GPU); tiny ones with ``quick``."""
    if quick:
        return [Size("2d-quick", 2, (32, 32)), Size("ct-quick", 1, (8, 16, 16))]
    ct = (128, 256, 256) if device == "cuda" else (64, 128, 128)
    return [Size("2d", 16, (256, 256)), Size("ct", 2 if device == "cuda" else 1, ct)]


@dataclass
class Row:
    op: str
    size: str
    shape: str
    R: int
    provider: str
    median_ms: float = math.nan
    mvox_per_s: float = math.nan
    gb_per_s: float = math.nan
    frac_copy: float = math.nan
    speedup_vs_torch: float = math.nan
    peak_extra_mb: float = math.nan
    check: str = ""
    runs: int = 0
    spread_ms: tuple[float, float] | None = None  # min and max of the medians of separate processes
    error: str = ""
    extra: dict = field(default_factory=dict)


# --- the cases -------------------------------------------------------------------------------------------

@dataclass
class Case:
    """Inputs of one (op, size, R) and how many bytes the op must move at least."""

    op: str
    size: Size
    R: int
    inputs: dict
    bytes_moved: int


def make_case(op: str, size: Size, R: int, device: str, seed: int = 0) -> Case:
    # Drawn on the device itself: a GPU draws a CT volume in milliseconds, the host would take seconds.
    g = torch.Generator(device=device).manual_seed(seed)
    B, S = size.batch, size.spatial
    V = size.voxels
    if op in ("loss", "readout"):
        logits = torch.randn(B, R + 1, *S, generator=g, device=device) * 2
        k = torch.randint(0, R + 1, (B, *S), generator=g, dtype=torch.uint8, device=device)
        if op == "loss":  # logits read + gradient written + k read
            return Case(op, size, R, {"logits": logits, "k": k}, 2 * logits.numel() * 4 + V)
        return Case(op, size, R, {"logits": logits}, logits.numel() * 4 + V * 4)  # logits read + p written
    # stats: probabilities against rater masks, the way a user evaluates (pred read + masks read)
    p = torch.rand(B, *S, generator=g, device=device)
    masks = torch.rand(B, R, *S, generator=g, device=device) < p.unsqueeze(1)  # raters agree with p: calibrated-ish
    return Case(op, size, R, {"p": p, "masks": masks}, V * 4 + masks.numel())


def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)


def provider_fn(case: Case, provider: str) -> tuple[Callable[[], object], Callable[[object], object] | None]:
    """(the call to time, a function of its output giving a comparable value or None)."""
    x = case.inputs
    if case.op == "loss":
        if provider in ("cpp", "triton", "torch"):
            return peers.user_step(lambda z, k: orcal.ordinal_loss(z, k, backend=provider), x["logits"], x["k"]), None
        if provider == "compile":
            return peers.user_step(_compiled(ref.ordinal_loss), x["logits"], x["k"]), None
        return peers.user_step(peers.loss_peer(provider), x["logits"], x["k"]), None
    if case.op == "readout":
        if provider in ("cpp", "triton", "torch"):
            return lambda: orcal.foreground_probability(x["logits"], backend=provider), None
        if provider == "compile":
            f = _compiled(ref.foreground_probability)
            return lambda: f(x["logits"]), None
    # stats: the values each provider reports, by name (compared in _finish_rows)
    def metrics(st):
        m = orcal.calibration_metrics(st)
        return {"mr_ece": m["mr_ece"], "auc": m["auc"]}

    if provider in ("cpp", "triton", "torch"):
        return lambda: orcal.calibration_stats(x["p"], x["masks"], backend=provider), metrics
    if provider in peers.STATS_PEERS:
        fn = peers.stats_peer(provider, case.R)
        key = "auc" if provider == "auroc" else "ece_per_image"
        return lambda: fn(x["p"], x["masks"]), lambda v: {key: float(v)}
    if provider == "compile":
        R = case.R
        f = _compiled(lambda p, masks: ref.calibration_stats(p, ref.orc_targets(masks), R).pack())
        return lambda: f(x["p"], x["masks"]), lambda packed: metrics(orcal.CalibrationStats.unpack(*packed, 15, 4096))
    return lambda: peers.torchmetrics_ece(x["p"], x["masks"]), lambda v: {"mr_ece": float(v)}


def available(provider: str, op: str, device: str) -> str | None:
    """None if ``provider`` can run ``op`` on ``device``, else why not."""
    dev = torch.device(device)
    if provider == "cpp" and not _ext.has_kernel({"loss": "ordinal_loss", "stats": "calibration_stats",
                                                  "readout": "foreground_probability"}[op], dev):
        return _ext.why_no_kernel(dev)
    if provider == "triton":
        return _ext.why_no_triton(dev)
    if provider in ("torchmetrics", *peers.STATS_PEERS) and op != "stats":
        return "not applicable: a statistics peer"
    if provider in peers.LOSS_PEERS and op != "loss":
        return "not applicable: a loss peer"
    if provider == "torchmetrics":
        try:
            import torchmetrics  # noqa: F401
        except ImportError:
            return "torchmetrics is not installed"
    return peers.peer_available(provider)


def run_case(case: Case, provider: str, device: str, repeats: int, budget_s: float, copy_gbs: float
             ) -> tuple[Row, Callable[[], object] | None]:
    """Time one provider on one case (the default allocator); returns the row and the call (for the memory
    pass), or no call when the provider failed."""
    row = Row(case.op, case.size.name, f"{case.size.batch}x{case.R + 1}x" + "x".join(map(str, case.size.spatial)),
              case.R, provider)
    try:
        fn, value_of = provider_fn(case, provider)
        times = time_fn(fn, device, repeats, budget_s)
        out = fn()
        if value_of is not None:
            row.extra["values"] = value_of(out)
        del out
    except Exception as err:  # a provider that fails is reported, the suite goes on
        row.error = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        return row, None
    t = statistics.median(times)
    row.runs = len(times)
    row.median_ms = t * 1e3
    row.mvox_per_s = case.size.voxels / t / 1e6
    row.gb_per_s = case.bytes_moved / t / 1e9
    row.frac_copy = row.gb_per_s / copy_gbs
    return row, fn


def process_spread(row: Row, case: Case, device: str, processes: int, repeats: int) -> None:
    """Time ``row``'s call in ``processes`` fresh interpreters (the same seeded inputs); their medians' range
    goes to ``row.spread_ms``. torch.compile is left out: each process would compile again."""
    if processes < 2 or row.error or row.provider == "compile" or row.median_ms > 1000:
        return
    spec = json.dumps({"op": case.op, "size": [case.size.name, case.size.batch, list(case.size.spatial)],
                       "R": case.R, "provider": row.provider, "device": device, "repeats": repeats})
    medians, peaks = [], []
    for _ in range(processes):
        try:
            proc = subprocess.run([sys.executable, "-m", "benchmarks.suite", spec], capture_output=True, text=True,
                                  timeout=600, cwd=Path(__file__).resolve().parents[1])
        except subprocess.TimeoutExpired:
            continue
        if proc.returncode == 0 and proc.stdout.strip():
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            medians.append(statistics.median(result["times"]))
            peaks.append(result["peak_mb"])
    if medians:
        row.spread_ms = (min(medians) * 1e3, max(medians) * 1e3)
        row.extra["process_medians_ms"] = [m * 1e3 for m in medians]
        # a fresh process's heap holds nothing of other cases: its peak is the call's own
        row.peak_extra_mb = statistics.median(peaks)


def _finish_rows(rows: list[Row]) -> None:
    """Speed-ups against the eager reference; each provider's values beside those of the compiled kernels
    (or the reference where none are built)."""
    by_case: dict[tuple, dict[str, Row]] = {}
    for r in rows:
        by_case.setdefault((r.op, r.size, r.R), {})[r.provider] = r
    names = {"mr_ece": "MR-ECE", "auc": "AUC", "ece_per_image": "ECE per image (MONAI, y = k/R)"}
    for group in by_case.values():
        base = group.get("torch")
        anchor = group.get("cpp") if "cpp" in group and not group["cpp"].error else base
        for r in group.values():
            if base is not None and not r.error and not base.error:
                r.speedup_vs_torch = base.median_ms / r.median_ms
            values = r.extra.get("values", {})
            ref_values = anchor.extra.get("values", {}) if anchor is not None and anchor is not r else {}
            parts = []
            for key, value in values.items():
                text = f"{names[key]} {value:.6f}"
                if key in ref_values:
                    text += f", |d| {abs(value - ref_values[key]):.1e}"
                elif key == "ece_per_image" and "mr_ece" in ref_values:
                    text += f" (pooled MR-ECE {ref_values['mr_ece']:.6f})"
                parts.append(text)
            r.check = "; ".join(parts)


def _bench_staple(device: str, quick: bool) -> dict | None:
    """The STAPLE benchmark of benchmarks.bench_fusion, when that module is present."""
    try:
        from benchmarks.bench_fusion import bench_staple
    except ImportError:
        return None
    shape = (3, 32, 32, 16) if quick else (3, 128, 128, 64)
    return bench_staple(device=device, shape=shape, repeats=2 if quick else 3)


def run_suite(device: str = "cpu", quick: bool = False, ops: tuple[str, ...] = OPS,
              providers: tuple[str, ...] = PROVIDERS, raters: tuple[int, ...] = RATERS,
              sizes: list[Size] | None = None, repeats: int | None = None, budget_s: float | None = None,
              out_dir: Path | str | None = RESULTS, staple: bool = True, progress: bool = True,
              processes: int = 1, size_names: tuple[str, ...] | None = None, training_step: bool = False,
              sass: bool = False) -> tuple[list[Row], dict]:
    """Run the benchmark matrix; print nothing. Writes ``<out_dir>/<device-name>.{md,json}`` after every case
    (a run cut short keeps what it measured) unless ``out_dir`` is None. Returns the rows and the metadata.

    ``processes``: also time every case in that many fresh processes (the spread); ``size_names`` keeps the
    default sizes of those names; ``training_step`` adds the loss's share of an optimiser step; ``sass`` the
    registers, spills and instructions per voxel of every kernel, compiled for sm_90a (:mod:`benchmarks.sass`).
    """
    from orcal._progress import progress_bar

    for name in ops:
        if name not in OPS:
            raise ValueError(f"ops must be among {OPS}, got {name!r}")
    for name in providers:
        if name not in PROVIDERS:
            raise ValueError(f"providers must be among {PROVIDERS}, got {name!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' asked for, but no CUDA GPU is available")
    sizes = sizes or default_sizes(device, quick)
    if size_names:
        sizes = [s for s in sizes if s.name in size_names]
        if not sizes:
            raise ValueError(f"sizes {size_names} match none of {[s.name for s in default_sizes(device, quick)]}")
    repeats = repeats or (3 if quick else 7)
    budget_s = budget_s if budget_s is not None else (0.5 if quick else 3.0)
    copy_gbs, copy_mb = copy_bandwidth(device, quick)
    meta = {
        "device": device, "device_name": device_name(device), "device_description": device_description(device),
        "torch": torch.__version__, "orcal": orcal.__version__, "threads": torch.get_num_threads(),
        "cpu_isa": cpu_isa(), "copy_gbs": copy_gbs, "copy_mb": copy_mb, "processes": processes,
        "date": time.strftime("%Y-%m-%d"), "quick": quick, "skipped": {}, "extras": {},
    }
    # Provider-major, in the order given: a run cut short keeps every op of the first providers.
    plan = [(op, size, R, p) for p in providers for op in ops for size in sizes for R in raters]
    rows: list[Row] = []
    calls: list[tuple[Row, Callable[[], object]]] = []
    case_key, case = None, None
    for op, size, R, provider in progress_bar(plan, desc="benchmarks", enabled=progress):
        reason = available(provider, op, device)
        if reason is not None:
            meta["skipped"][f"{provider}/{op}"] = reason
            continue
        if case_key != (op, size.name, R):
            case_key, case = (op, size.name, R), make_case(op, size, R, device)
        row, fn = run_case(case, provider, device, repeats, budget_s, copy_gbs)
        process_spread(row, case, device, processes, repeats)
        rows.append(row)
        if fn is not None:
            calls.append((row, fn))
        _finish_rows(rows)
        report.write(rows, meta, out_dir, OPS, PROVIDERS)
    if device == "cpu":
        malloc_returns_memory()  # the memory pass, after every timing: freed blocks go back to the system
    for row, fn in calls:
        if math.isnan(row.peak_extra_mb):  # not measured by the fresh processes of process_spread
            with contextlib.suppress(Exception):
                row.peak_extra_mb = peak_extra_mb(fn, device)
    del calls
    if training_step:
        try:
            meta["extras"]["Share of a training step spent in the loss"] = peers.training_step_share(device, quick)
        except Exception as err:  # another benchmark must not sink the suite
            meta["extras"]["Share of a training step spent in the loss"] = {"error": f"{type(err).__name__}: {err}"}
    try:  # several structures: one call against the loop over structures (benchmarks.bench_structures)
        from benchmarks.bench_structures import bench_structures

        ct = default_sizes(device, quick)[-1]  # the CT volume of the matrix, with three structures
        meta["extras"]["Several structures (benchmarks.bench_structures)"] = bench_structures(
            device, (ct.batch, *ct.spatial), repeats=repeats)
    except Exception as err:
        meta["extras"]["Several structures (benchmarks.bench_structures)"] = {"error": f"{type(err).__name__}: {err}"}
    if sass:
        try:
            from benchmarks import sass as sass_table

            meta["extras"][report.SASS_EXTRA] = {"table": sass_table.markdown(sass_table.triton_rows()
                                                                      + sass_table.cuda_rows())}
        except Exception as err:
            meta["extras"][report.SASS_EXTRA] = {"error": f"{type(err).__name__}: {err}"}
    if staple:
        try:
            result = _bench_staple(device, quick)
        except Exception as err:
            result = {"error": f"{type(err).__name__}: {err}"}
        if result is not None:
            meta["extras"]["STAPLE (benchmarks.bench_fusion)"] = result
    report.write(rows, meta, out_dir, OPS, PROVIDERS)
    return rows, meta


def _worker(spec_json: str) -> None:
    """``python -m benchmarks.suite SPEC``: time one case in this fresh process, then its peak memory; prints
    both as JSON."""
    spec = json.loads(spec_json)
    name, batch, spatial = spec["size"]
    case = make_case(spec["op"], Size(name, batch, tuple(spatial)), spec["R"], spec["device"])
    fn, _ = provider_fn(case, spec["provider"])
    times = time_fn(fn, spec["device"], spec["repeats"], 3.0)
    if spec["device"] == "cpu":
        malloc_returns_memory()  # after the timing, as in the suite
    print(json.dumps({"times": times, "peak_mb": peak_extra_mb(fn, spec["device"])}))


if __name__ == "__main__":
    _worker(sys.argv[1])
