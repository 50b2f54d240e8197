#!/usr/bin/env bash
# One prepared check of orcal on a CUDA machine (H100/H200), sized for one lease (15 minutes of device time,
# the machine's start included; 10 minutes a command; 8 files back): it finishes in <= 480 s
# (ORCAL_GPU_CHECK_BUDGET), with the results that matter first and every table saved as soon as it exists.
#
#   card -> [build the CUDA extension || Triton tests] -> CUDA tests -> [SASS table (CPU) ||
#        Triton targets table -> reduced benchmark suite (with the training step)]
#
# The build runs in the background while the Triton tests (which need no build) use the GPU. The tests are a
# fixed subset: every op on CUDA and on Triton once per dtype (tests/test_gpu_smoke.py), CUDA-graph capture,
# no host synchronisation, poisoned memory and a tensor of more than 2^31 elements; the breadth is proven
# without a GPU (the emulated CUDA kernels, the Triton interpreter). Time budget per stage: docs/gpu.md.
#
#   bash benchmarks/gpu_check.sh                 # tables in benchmarks/results/; OUT=dir for the files back
#   ORCAL_GPU_CHECK_DRY=1 PYTHON=python bash benchmarks/gpu_check.sh   # CPU dry run (CI): every path, tiny
#
# $OUT gets at most three files: gpu_check.log, summary.md (card, stages, the main tables) and
# results.tar.gz (every table and log), rewritten after each stage, so a run cut short keeps what it measured.
# Every stage runs even if an earlier one failed; the script exits 1 naming the failed stages.
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DRY=${ORCAL_GPU_CHECK_DRY:-0}
BUDGET=${ORCAL_GPU_CHECK_BUDGET:-480}
MAX_OUT_FILES=8
# This run's tables; copied to benchmarks/results/ at the end (not in a dry run, which leaves the repository alone).
RESULTS=$(mktemp -d "${TMPDIR:-/tmp}/orcal_gpu_check.XXXXXX")
LOGS=$RESULTS/logs
START=$(date +%s)
FAILED=()
TIMES=()
mkdir -p "$RESULTS" "$LOGS"
TEE_PID=""
if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  exec > >(tee -a "$OUT/gpu_check.log") 2>&1
  TEE_PID=$!
fi
export ORCAL_GPU_CHECK=1  # tests/test_gpu_smoke.py: a missing CUDA build fails instead of skipping
export PYTHONUNBUFFERED=1

now() { echo $(($(date +%s) - START)); }
left() { echo $((BUDGET - $(now))); }
stage() { echo; echo "=== [$(now)s] $*"; }
# run_stage NAME CAP CMD...: runs CMD for at most CAP seconds (never past the budget), records its time and
# a failure (exit status, timeout or a budget already spent).
run_stage() {
  local name=$1 cap=$2
  shift 2
  local limit t0 rc=0
  limit=$(left)
  ((limit > cap)) && limit=$cap
  if ((limit < 10)); then
    echo "!!! $name skipped: the time budget is spent"
    FAILED+=("$name (no time left)")
    TIMES+=("| $name | $cap | skipped |")
    return 0
  fi
  stage "$name (limit ${limit}s)"
  t0=$(date +%s)
  timeout --signal=INT --kill-after=10 "$limit" "$@" || rc=$?
  TIMES+=("| $name | $cap | $(($(date +%s) - t0)) |")
  if ((rc != 0)); then
    echo "!!! $name FAILED (exit $rc$( ((rc == 124)) && echo ', timed out'))"
    FAILED+=("$name")
  fi
}
# save: summary.md and results.tar.gz in $OUT (three files with the log, whatever the stages wrote).
save() {
  [[ -n "${OUT:-}" ]] || return 0
  {
    echo "# orcal GPU check"
    echo
    cat "$LOGS/card.txt" 2>/dev/null || true
    echo
    echo "| stage | cap (s) | took (s) |"
    echo "|---|---|---|"
    printf '%s\n' "${TIMES[@]}"
    echo
    echo "Failed: ${FAILED[*]:-none}"
    for table in "$RESULTS"/*.md; do
      [[ -f $table ]] && { echo; cat "$table"; }
    done
  } >"$OUT/summary.md" 2>/dev/null || true
  tar -czf "$OUT/results.tar.gz.tmp" -C "$RESULTS" . 2>/dev/null \
    && mv "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz" || true
}
finish() {
  local rc=$?
  wait_sass
  save
  stage "summary"
  printf '%s\n' "| stage | cap (s) | took (s) |" "|---|---|---|" "${TIMES[@]}"
  ls -l "$RESULTS"
  if [[ $DRY != 1 ]]; then
    mkdir -p benchmarks/results && cp "$RESULTS"/*.md "$RESULTS"/*.json benchmarks/results/ 2>/dev/null || true
  fi
  if [[ -n "${OUT:-}" ]]; then
    local n
    n=$(find "$OUT" -type f | wc -l)
    echo "$n files in \$OUT (at most $MAX_OUT_FILES come back)"
    ((n <= MAX_OUT_FILES)) || FAILED+=("more than $MAX_OUT_FILES files in \$OUT")
  fi
  if ((${#FAILED[@]})); then
    echo "GPU CHECK FAILED: ${FAILED[*]}"
    rc=1
  else
    echo "GPU CHECK PASSED in $(now)s"
  fi
  if [[ -n "$TEE_PID" ]]; then  # let tee write the log's tail before the script exits
    exec >&- 2>&-
    wait "$TEE_PID" || true
  fi
  exit "$rc"
}
# The SASS table (registers, spills, instructions per voxel) needs only the CPU: it runs in the background
# from the end of the build, while the GPU is timed.
SASS_CAP=120
SASS_PID=""
start_sass() {
  local cmd=("$PY" -m benchmarks.sass --out "$RESULTS")
  if [[ $DRY == 1 ]]; then cmd+=(--quick); else cmd+=(--cuda); fi
  stage "SASS table (background, limit ${SASS_CAP}s)"
  SASS_T0=$(date +%s)
  timeout --kill-after=10 "$SASS_CAP" env -u TRITON_INTERPRET "${cmd[@]}" >"$LOGS/sass.log" 2>&1 &
  SASS_PID=$!
}
wait_sass() {
  [[ -n $SASS_PID ]] || return 0
  local rc=0
  wait "$SASS_PID" || rc=$?
  SASS_PID=""
  TIMES+=("| SASS table (background) | $SASS_CAP | $(($(date +%s) - SASS_T0)) |")
  cat "$LOGS/sass.log"
  ((rc == 0)) || { echo "!!! SASS table FAILED (exit $rc)"; FAILED+=("SASS table"); }
}
trap finish EXIT

# --- card and software ------------------------------------------------------------------------------------
stage "card and software"
{
  if [[ $DRY == 1 ]]; then
    echo "dry run on the CPU: no CUDA build, Triton in its interpreter, tiny shapes"
  else
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv || true
  fi
  echo
  (nvcc --version || "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version) 2>/dev/null | tail -n 2 || echo "nvcc: not found"
  "$PY" - <<'EOF'
import platform, torch
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "not installed"
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {tv}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
else:
    print("device: cpu")
EOF
} 2>&1 | tee "$LOGS/card.txt"
[[ $DRY == 1 ]] && export TRITON_INTERPRET=1

# --- the build (background) and the Triton tests (GPU) at the same time --------------------------------------
PYTEST=("$PY" -m pytest -q -rs -p no:cacheprovider --maxfail=10)
TRITON_TESTS=(tests/test_gpu_smoke.py tests/test_triton.py tests/test_hardening_ops.py -m cuda
  -k "(test_every_op and triton) or (capture_in_a_cuda_graph and triton) or poison or synchronise or 2_to_the_31")
CUDA_TESTS=(tests/test_gpu_smoke.py tests/test_hardening_ops.py -m cuda
  -k "(test_every_op and cpp) or (capture_in_a_cuda_graph and cpp)")
BUILD_CAP=180
BUILD_PID=""
if [[ $DRY != 1 ]]; then
  export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} ORCAL_WITH_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  export MAX_JOBS=${MAX_JOBS:-14}  # two cores stay for the Triton tests' compiles
  stage "build the CUDA extension (background, limit ${BUILD_CAP}s; log in results.tar.gz: build.log)"
  BUILD_T0=$(date +%s)
  timeout --kill-after=10 "$BUILD_CAP" "$PY" setup.py -q build_ext --inplace >"$LOGS/build.log" 2>&1 &
  BUILD_PID=$!
  run_stage "Triton tests (every op per dtype, graphs, no sync, > 2^31 elements)" 150 "${PYTEST[@]}" \
    "${TRITON_TESTS[@]}"
else  # no GPU: prove that both selections collect something
  run_stage "Triton tests (collect only)" 60 "${PYTEST[@]}" --collect-only "${TRITON_TESTS[@]}"
  run_stage "CUDA tests (collect only)" 60 "${PYTEST[@]}" --collect-only "${CUDA_TESTS[@]}"
  start_sass
fi

if [[ -n $BUILD_PID ]]; then
  BUILD_RC=0
  wait "$BUILD_PID" || BUILD_RC=$?
  TIMES+=("| build the CUDA extension | $BUILD_CAP | $(($(date +%s) - BUILD_T0)) |")
  tail -n 25 "$LOGS/build.log"
  start_sass
  if ((BUILD_RC != 0)); then
    echo "!!! build the CUDA extension FAILED (exit $BUILD_RC$( ((BUILD_RC == 124)) && echo ', timed out')):" \
      "the CUDA tests and the cpp rows cannot run"
    FAILED+=("build the CUDA extension" "CUDA tests (no build)")
  else
    run_stage "extension report" 15 "$PY" -c "import orcal.ops._ext as e, json; i = e.build_info(); \
print(json.dumps(i, indent=1, default=str)); assert i['cuda'], 'no CUDA kernels in orcal._C'"
    run_stage "CUDA tests (every op per dtype, graphs)" 60 "${PYTEST[@]}" "${CUDA_TESTS[@]}"
  fi
fi
save

# --- Triton against its targets ------------------------------------------------------------------------------
# On the 3D size of docs/gpu.md, providers before dtypes (Triton f32, bf16, then CUDA, eager, torch.compile):
# the fused loss alone and through autograd, calibration_stats, next to the copy bandwidth. The first call
# of each provider and dtype (its cold compile) is timed apart and a provider whose compile would not fit
# in what is left of the stage is skipped, never cut half way.
run_stage "Triton targets table" 110 "$PY" - "$RESULTS" "$DRY" 100 <<'EOF'
import json, statistics, sys, time
from pathlib import Path

import torch

from orcal import ops
from orcal.ops import _ext, _triton, reference

out_dir, dry, stage_s = Path(sys.argv[1]), sys.argv[2] == "1", float(sys.argv[3])
dev = "cpu" if dry else "cuda"
shape = (1, 4, 3, 8, 8) if dry else (2, 8, 128, 256, 256)  # (B, R+1, D, H, W), R = 7
B, C, S = shape[0], shape[1], shape[2:]
R, m = C - 1, (C - 1) // 2 + 1
card = "cpu (dry run)" if dry else torch.cuda.get_device_name(0)
reps = 2 if dry else 10
deadline = time.time() + stage_s
#: Seconds a cold first call may take (compile included), to decide whether a provider still fits.
COLD_S = {"compile": 60.0, "triton": 15.0, "cpp": 2.0, "torch": 2.0}


def sync():
    if dev == "cuda":
        torch.cuda.synchronize()


def timed(fn):
    """Median seconds of fn() over reps runs after one more warm-up."""
    fn()
    times = []
    for _ in range(reps):
        if dev == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); fn(); b.record(); torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return statistics.median(times)


def first_call(fn):
    """Seconds of the first (cold: compiling) call."""
    sync(); t = time.perf_counter(); fn(); sync()
    return time.perf_counter() - t


big = torch.empty(1 << (20 if dry else 30), dtype=torch.uint8, device=dev)
dst = torch.empty_like(big)
copy_bw = 2 * big.numel() / timed(lambda: dst.copy_(big))
del big, dst
print(f"{card}: copy bandwidth {copy_bw / 1e9:.0f} GB/s")

gen = torch.Generator(device=dev).manual_seed(0)
k = torch.randint(0, R + 1, (B, *S), device=dev, dtype=torch.uint8, generator=gen)
logits_by_dtype = {dt: torch.randn(shape, device=dev, generator=gen).to(dt) for dt in (torch.float32, torch.bfloat16)}
providers = (["triton"] + (["cpp"] if _ext.has_kernel("ordinal_loss", torch.device(dev)) else [])
             + ["torch"] + ([] if dry else ["compile"]))
compiled = {}


def loss_fn(provider):
    if provider == "compile":
        return compiled.setdefault("loss", torch.compile(lambda x, kk: reference.ordinal_loss(x, kk)))
    return lambda x, kk: ops.ordinal_loss(x, kk, backend=provider)


def stats_fn(provider):
    if provider == "compile":
        def raw(x, kk):
            p = reference.binary_probability(x, "ordinal", "majority", m)
            return reference.calibration_stats(p, kk, R, 15, 4096, m).pack()
        return compiled.setdefault("stats", torch.compile(raw))
    return lambda x, kk: ops.calibration_stats(x, kk, num_raters=R, kind="ordinal", backend=provider)


rows, errors, skipped = [], [], []


def write_tables():
    """Write the tables so far (after every row: a timeout keeps what was measured)."""
    by = {(r["dtype"], r["provider"]): r for r in rows}
    lines = [f"# Triton targets on {card}", "",
             f"Shape {shape} (B, R+1, D, H, W), R = {R}; copy bandwidth {copy_bw / 1e9:.0f} GB/s; median of {reps}.",
             "Targets: Triton at >= 70% of the copy bandwidth, <= 1.3x the compiled CUDA kernel, >= 3x faster "
             "than torch.compile(reference).", "",
             "| dtype | op | provider | ms | fraction of copy bandwidth | time / Triton's | first call (s) |",
             "|---|---|---|---|---|---|---|"]
    for (dt, provider), r in by.items():
        base = by.get((dt, "triton"))
        for op, key, frac in (("loss fwd+bwd (autograd)", "loss_fwd_bwd_ms", "loss_bw_fraction"),
                              ("loss fused kernel", "loss_kernel_ms", "loss_kernel_bw_fraction"),
                              ("calibration_stats", "stats_ms", "stats_bw_fraction")):
            if key not in r:
                continue
            ratio = f"{r[key] / base[key]:.2f}x" if base and key in base else ""
            cold = r.get("first_call_s", {}).get(key.removesuffix("_ms"), float("nan"))
            lines.append(f"| {dt} | {op} | {provider} | {r[key]:.3f} | {r.get(frac, float('nan')):.0%} | {ratio} | "
                         f"{cold:.1f} |")
    lines += [f"\nNot measured: {s}" for s in skipped]
    name = "triton_targets_" + "".join(ch if ch.isalnum() else "_" for ch in card).strip("_").lower()
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    (out_dir / f"{name}.json").write_text(json.dumps({"copy_bandwidth": copy_bw, "rows": rows, "skipped": skipped},
                                                     indent=1))
    return lines


for provider in providers:  # providers before dtypes: every provider gets its float32 row first
    for dtype, logits in logits_by_dtype.items():
        left = deadline - time.time()
        # a cold compile per dtype (torch.compile specialises on it); warm calls cost ~(reps + 2) x a few ms
        if left < COLD_S[provider] + 5:
            skipped.append(f"{provider} {dtype}: {left:.0f}s left in the stage, a cold start takes up to "
                           f"{COLD_S[provider]:.0f}s")
            print("skipping", skipped[-1])
            continue
        L = logits.numel() * logits.element_size()
        V = k.numel()
        f, g = loss_fn(provider), stats_fn(provider)
        x = logits.clone().requires_grad_()

        def step():
            x.grad = None
            f(x, k).backward()
        try:
            cold = {"loss_fwd_bwd": first_call(step), "stats": first_call(lambda: g(logits, k))}
            t_loss = timed(step)
            t_stats = timed(lambda: g(logits, k))
        except Exception as err:  # report it, measure the others, fail at the end
            errors.append(f"{provider} {dtype}: {type(err).__name__}: {err}")
            print("!!!", errors[-1])
            continue
        row = {"card": card, "dtype": str(dtype).removeprefix("torch."), "provider": provider,
               "loss_fwd_bwd_ms": t_loss * 1e3, "stats_ms": t_stats * 1e3, "first_call_s": cold,
               # the floor: read logits and k, write the gradient / read logits and k
               "loss_bw_fraction": (2 * L + V) / t_loss / copy_bw, "stats_bw_fraction": (L + V) / t_stats / copy_bw}
        if provider in ("triton", "cpp"):  # the fused kernel alone (forward with its gradient, no autograd)
            op = _triton.ordinal_loss_op() if provider == "triton" else torch.ops.orcal.ordinal_loss
            t_fused = timed(lambda: op(logits, k, None, 1.0, m, 1, True))
            row["loss_kernel_ms"] = t_fused * 1e3
            row["loss_kernel_bw_fraction"] = (2 * L + V) / t_fused / copy_bw
        rows.append(row)
        print(json.dumps({key: round(v, 3) if isinstance(v, float) else v for key, v in row.items()}))
        write_tables()
        del x

lines = write_tables()
print("\n".join(lines))
if errors:
    sys.exit("errors: " + "; ".join(errors))
EOF
save

# --- the suite, reduced to what matters on a GPU: the CT size, R = 7, the loss's share of a training step ---
# torch.compile is left to the targets table (its cold compiles would take most of this stage).
if [[ $DRY == 1 ]]; then
  run_stage "benchmark suite (reduced, training step)" 120 "$PY" -m benchmarks --device cpu --quick --sizes ct-quick \
    --raters 7 --providers cpp,triton,torch,cross_entropy --processes 1 --no-staple --out "$RESULTS"
else
  run_stage "benchmark suite (reduced, training step)" 100 "$PY" -m benchmarks --device cuda --sizes ct --raters 7 \
    --providers cpp,triton,torch,cross_entropy --repeats 10 --processes 1 --no-staple --out "$RESULTS"
fi
save

