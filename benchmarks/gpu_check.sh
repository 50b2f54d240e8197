#!/usr/bin/env bash
# One prepared check of orcal on a CUDA machine (H100/H200), sized for one lease: it finishes in <= 420 s on
# an H200, build included, with the results that matter first and every table written as soon as it exists:
#   build -> CUDA tests of the four ops -> Triton tests (compiled kernels, fp16/bf16, > 2^31 elements)
#   -> Triton targets table -> reduced benchmark suite (the CT size, R = 7) -> the other CUDA tests.
# Runs from the repository root with the system python3, no network. See docs/gpu.md.
#
#   bash benchmarks/gpu_check.sh                 # results in benchmarks/results/, copied to $OUT if set
#   ORCAL_GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh   # CPU dry run (CI): every Python path, tiny shapes
#
# Every stage runs even if an earlier one failed (so one run tells everything); the script exits 1 and
# names the failed stages at the end. Each stage has a cap, and no stage runs past ORCAL_GPU_CHECK_BUDGET.
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DRY=${ORCAL_GPU_CHECK_DRY:-0}
BUDGET=${ORCAL_GPU_CHECK_BUDGET:-420}
RESULTS=benchmarks/results
[[ $DRY == 1 ]] && RESULTS=${TMPDIR:-/tmp}/orcal_gpu_check_dry  # a dry run leaves the repository alone
START=$(date +%s)
FAILED=()
mkdir -p "$RESULTS"
TEE_PID=""
if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  exec > >(tee -a "$OUT/gpu_check.log") 2>&1
  TEE_PID=$!
fi

left() { echo $((BUDGET - ($(date +%s) - START))); }
stage() { echo; echo "=== [$(($(date +%s) - START))s] $*"; }
# run_stage NAME MAX_SECONDS CMD...: runs CMD with a time limit (never past the budget), records failure.
run_stage() {
  local name=$1 max=$2
  shift 2
  local limit
  limit=$(left)
  ((limit > max)) && limit=$max
  if ((limit < 10)); then
    echo "!!! $name skipped: the time budget is spent"
    FAILED+=("$name (no time left)")
    return 0
  fi
  stage "$name (limit ${limit}s)"
  local rc=0
  timeout --signal=INT --kill-after=10 "$limit" "$@" || rc=$?
  if ((rc != 0)); then
    echo "!!! $name FAILED (exit $rc$( ((rc == 124)) && echo ', timed out'))"
    FAILED+=("$name")
  fi
}
# Copy what exists to $OUT after every stage that writes a table: a lease that ends early keeps it.
save() {
  if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT/results" && cp -r "$RESULTS"/. "$OUT/results/" || true
  fi
}
finish() {
  local rc=$?
  save
  stage "summary"
  ls -l "$RESULTS"
  if ((${#FAILED[@]})); then
    echo "GPU CHECK FAILED: ${FAILED[*]}"
    rc=1
  else
    echo "GPU CHECK PASSED in $(($(date +%s) - START))s"
  fi
  if [[ -n "$TEE_PID" ]]; then  # let tee write the log's tail before the script exits
    exec >&- 2>&-
    wait "$TEE_PID" || true
  fi
  exit "$rc"
}
trap finish EXIT

stage "card and software"
if [[ $DRY == 1 ]]; then
  echo "dry run on the CPU: no CUDA build, Triton in its interpreter, tiny shapes"
  export TRITON_INTERPRET=1
else
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv || true
fi
"$PY" - <<'EOF'
import platform, torch
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "not installed"
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {tv}")
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
EOF

if [[ $DRY == 1 ]]; then
  echo "dry run: skipping the CUDA build"
else
  export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} ORCAL_WITH_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  export MAX_JOBS=${MAX_JOBS:-16}
  run_stage "build the CUDA extension" 120 "$PY" setup.py -q build_ext --inplace
  run_stage "extension report" 15 "$PY" -c "import orcal._ext as e, json; i = e.build_info(); print(json.dumps(i, indent=1, default=str)); assert i['cuda'], 'no CUDA kernels in orcal._C'"
fi

# Tests whose optional packages are missing here skip; a failure or a collection error fails the stage.
PYTEST=("$PY" -m pytest -q -rs -p no:cacheprovider --maxfail=20)
OP_TESTS=(tests/test_kernels.py tests/test_hardening.py tests/test_ops.py)
if [[ $DRY == 1 ]]; then  # no GPU: prove that both selections collect
  run_stage "CUDA tests of the four ops (collect only)" 60 "${PYTEST[@]}" --collect-only -m cuda "${OP_TESTS[@]}"
  run_stage "Triton tests (collect only)" 45 "${PYTEST[@]}" --collect-only -m cuda tests/test_triton.py \
    tests/test_hardening.py -k triton
else
  run_stage "CUDA tests of the four ops" 60 "${PYTEST[@]}" -m cuda "${OP_TESTS[@]}" -k "not triton"
  run_stage "Triton tests (compiled kernels, fp16/bf16, > 2^31 elements)" 45 "${PYTEST[@]}" -m cuda \
    tests/test_triton.py tests/test_hardening.py -k triton
fi

# Triton against its targets on the 3D size of docs/gpu.md (both dtypes): the fused kernels alone and
# through autograd, next to the copy bandwidth, the compiled CUDA kernels and torch.compile(reference).
run_stage "Triton targets table" 60 "$PY" - "$RESULTS" "$DRY" <<'EOF'
import json, statistics, sys, time
from pathlib import Path

import torch

from orcal import _ext, ops, reference

out_dir, dry = Path(sys.argv[1]), sys.argv[2] == "1"
dev = "cpu" if dry else "cuda"
shape = (1, 4, 3, 8, 8) if dry else (2, 8, 128, 256, 256)  # (B, R+1, D, H, W), R = 7
B, C, S = shape[0], shape[1], shape[2:]
R, m = C - 1, (C - 1) // 2 + 1
card = "cpu (dry run)" if dry else torch.cuda.get_device_name(0)
reps = 2 if dry else 10
deadline = time.time() + (30 if dry else 45)


def timed(fn):
    """Median seconds of fn() over reps runs after two warm-ups."""
    fn(); fn()
    times = []
    for _ in range(reps):
        if dev == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); fn(); b.record(); torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return statistics.median(times)


big = torch.empty(1 << (20 if dry else 30), dtype=torch.uint8, device=dev)
dst = torch.empty_like(big)
copy_bw = 2 * big.numel() / timed(lambda: dst.copy_(big))
del big, dst
print(f"{card}: copy bandwidth {copy_bw / 1e9:.0f} GB/s")

gen = torch.Generator(device=dev).manual_seed(0)
k = torch.randint(0, R + 1, (B, *S), device=dev, dtype=torch.uint8, generator=gen)
# Most important first: the time guard below drops the last ones if compiling takes long.
providers = (["triton"] + (["cpp"] if _ext.has_kernel("ordinal_loss", torch.device(dev)) else [])
             + ([] if dry else ["compile"]) + ["torch"])
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


rows, errors = [], []


def write_tables():
    """Write the tables so far (after every provider: a timeout keeps what was measured)."""
    by = {(r["dtype"], r["provider"]): r for r in rows}
    lines = [f"# Triton targets on {card}", "",
             f"Shape {shape} (B, R+1, D, H, W), R = {R}; copy bandwidth {copy_bw / 1e9:.0f} GB/s; median of {reps}.",
             "Targets: Triton at >= 70% of the copy bandwidth, <= 1.3x the compiled CUDA kernel, >= 3x faster "
             "than torch.compile(reference).", "",
             "| dtype | op | provider | ms | fraction of copy bandwidth | time / Triton's |", "|---|---|---|---|---|---|"]
    for (dt, provider), r in by.items():
        base = by.get((dt, "triton"))
        for op, key, frac in (("loss fwd+bwd (autograd)", "loss_fwd_bwd_ms", "loss_bw_fraction"),
                              ("loss fused kernel", "loss_kernel_ms", "loss_kernel_bw_fraction"),
                              ("calibration_stats", "stats_ms", "stats_bw_fraction")):
            if key not in r:
                continue
            ratio = f"{r[key] / base[key]:.2f}x" if base and key in base else ""
            lines.append(f"| {dt} | {op} | {provider} | {r[key]:.3f} | {r.get(frac, float('nan')):.0%} | {ratio} |")
    name = "triton_targets_" + "".join(ch if ch.isalnum() else "_" for ch in card).strip("_").lower()
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    (out_dir / f"{name}.json").write_text(json.dumps({"copy_bandwidth": copy_bw, "rows": rows}, indent=1))
    return lines


for dtype in (torch.float32, torch.bfloat16):
    logits = torch.randn(shape, device=dev, generator=gen).to(dtype)
    L = logits.numel() * logits.element_size()
    V = k.numel()
    for provider in providers:
        if time.time() > deadline:
            print(f"skipping {provider} {dtype}: out of time")
            continue
        f = loss_fn(provider)
        x = logits.clone().requires_grad_()

        def step():
            x.grad = None
            f(x, k).backward()
        try:
            t_loss = timed(step)
            g = stats_fn(provider)
            t_stats = timed(lambda: g(logits, k))
        except Exception as err:  # report it, measure the others, fail at the end
            errors.append(f"{provider} {dtype}: {type(err).__name__}: {err}")
            print("!!!", errors[-1])
            continue
        row = {"card": card, "dtype": str(dtype).removeprefix("torch."), "provider": provider,
               "loss_fwd_bwd_ms": t_loss * 1e3, "stats_ms": t_stats * 1e3,
               # the floor: read logits and k, write the gradient / read logits and k
               "loss_bw_fraction": (2 * L + V) / t_loss / copy_bw, "stats_bw_fraction": (L + V) / t_stats / copy_bw}
        if provider in ("triton", "cpp"):  # the fused kernel alone (forward with its gradient, no autograd)
            op = ops._triton().ordinal_loss_op() if provider == "triton" else torch.ops.orcal.ordinal_loss
            t_fused = timed(lambda: op(logits, k, None, 1.0, m, 1, True))
            row["loss_kernel_ms"] = t_fused * 1e3
            row["loss_kernel_bw_fraction"] = (2 * L + V) / t_fused / copy_bw
        rows.append(row)
        print(json.dumps({key: round(v, 3) if isinstance(v, float) else v for key, v in row.items()}))
        write_tables()
        del x
    del logits

lines = write_tables()
print("\n".join(lines))
if errors:
    sys.exit("errors: " + "; ".join(errors))
EOF
save

# The suite, reduced to what matters on a GPU: the CT size, R = 7; each row written as soon as it is measured.
if [[ $DRY == 1 ]]; then
  run_stage "benchmark suite (reduced)" 120 "$PY" -m benchmarks --device cpu --quick --sizes ct-quick --raters 7 \
    --providers cpp,triton,torch,cross_entropy --processes 1 --no-staple --no-training-step --out "$RESULTS"
else
  run_stage "benchmark suite (reduced)" 120 "$PY" -m benchmarks --device cuda --sizes ct --raters 7 \
    --providers cpp,triton,torch,cross_entropy,compile --repeats 10 --processes 1 --no-staple \
    --no-training-step --out "$RESULTS"
fi
save

if [[ $DRY != 1 ]] && (($(left) > 30)); then  # what the budget has left: bf16 training, the metric on CUDA, ...
  run_stage "the other CUDA tests" 45 "${PYTEST[@]}" -m cuda tests --ignore=tests/test_kernels.py \
    --ignore=tests/test_hardening.py --ignore=tests/test_ops.py --ignore=tests/test_triton.py
fi
