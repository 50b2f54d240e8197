"""Instruction counts of the GPU kernels, measured without a GPU: the ``--sass`` table of the benchmark suite.

Each Triton kernel is compiled for sm_90a (Triton's ``ASTSource`` -> ``GPUTarget("cuda", 90, 32)``) with the
block sizes its launcher would pick; each CUDA kernel is compiled by nvcc for sm_90a, when nvcc is on the
PATH. ``cuobjdump`` (shipped with Triton) gives the registers, the local memory (spills) and the SASS. The hot
loop is the innermost backward branch of the SASS (for the kernels without a loop, the whole kernel); its
instructions, divided by the voxels one warp handles per trip, are the **warp-instructions per voxel**, which
compare with what an H100 can issue per voxel while streaming at copy bandwidth::

    budget = (SMs x schedulers x clock) / (copy bandwidth / bytes per voxel)

(132 x 4 x 1.755 GHz and 3.0 TB/s on an H100 SXM). A static count: branches inside the loop (the AUC atomics
of inner bins) are counted as if taken.

    python -m benchmarks.sass [--out DIR] [--cuda] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

#: An H100 SXM: warp-instructions issued per second and copy bandwidth (bytes read + written per second).
H100_ISSUE_PER_S = 132 * 4 * 1.755e9
H100_COPY_BYTES_PER_S = 3.0e12
DTYPE_TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}
DTYPE_SIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


@dataclass
class SassRow:
    kernel: str
    provider: str
    dtype: str
    case: str
    registers: int
    spill_bytes: int
    loop_instructions: int
    voxels_per_trip: int  # voxels one warp handles per trip through the hot loop
    bytes_per_voxel: float
    shuffles: int = 0  # SHFL in the hot loop: reductions across the lanes of a warp
    barriers: int = 0  # BAR in the hot loop: reductions across the warps of a block
    error: str = ""

    @property
    def per_voxel(self) -> float:
        return self.loop_instructions / self.voxels_per_trip if self.voxels_per_trip else 0.0

    @property
    def budget(self) -> float:
        """Warp-instructions per voxel an H100 can issue while streaming this kernel's bytes at copy bandwidth."""
        return H100_ISSUE_PER_S / (H100_COPY_BYTES_PER_S / self.bytes_per_voxel)


def _tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(bundled) if bundled.exists() else None


def _resources(cubin: Path, cuobjdump: str) -> dict[str, dict[str, int]]:
    """Registers and local memory (bytes per thread) of each function of a cubin."""
    out = subprocess.run([cuobjdump, "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    res, name = {}, None
    for line in out.splitlines():
        m = re.search(r"Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"REG:(\d+).*?STACK:(\d+).*?LOCAL:(\d+)", line)
        if m and name:
            res[name] = {"registers": int(m.group(1)), "spill_bytes": int(m.group(2)) + int(m.group(3))}
    return res


def _functions(cubin: Path, cuobjdump: str) -> dict[str, list[str]]:
    """SASS instruction lines (``/*0120*/ ...``) of each function of a cubin."""
    out = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    funcs, cur = {}, None
    for line in out.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
        elif cur is not None and re.match(r"\s+/\*[0-9a-f]{4,}\*/\s", line):
            cur.append(line)
    return funcs


def _count(lines: list[str], opcode: str) -> int:
    return sum(1 for x in lines if re.search(rf"\b{opcode}\b", x))


def hot_loop(lines: list[str]) -> list[str]:
    """The instructions of the voxel loop (the longest backward branch), or all of them without a loop."""
    lines = [x for x in lines if re.match(r"\s*/\*[0-9a-f]+\*/", x)]
    addr = [int(re.match(r"\s*/\*([0-9a-f]+)\*/", x).group(1), 16) for x in lines]
    best = None
    for i, line in enumerate(lines):
        t = re.search(r"\bBRA(?:\.\w+)*\s+0x([0-9a-f]+)", line)
        if not t:
            continue
        target = int(t.group(1), 16)
        if target < addr[i] and target in addr:  # a loop (not the branch-to-self after EXIT)
            j = addr.index(target)
            if best is None or i - j > best[1] - best[0]:
                best = (j, i)
    body = lines if best is None else lines[best[0]:best[1] + 1]
    return [x for x in body if not re.search(r"\bNOP\b", x)]


# --- the Triton kernels: the launchers' own block sizes ----------------------------------------------------

def triton_cases(raters: tuple[int, ...] = (7, 32), dtypes: tuple[str, ...] = ("float32", "bfloat16")) -> list[dict]:
    """The Triton kernels and settings of the table, with the block sizes their launchers pick (the loss and
    statistics at each R of ``raters``, for each of ``dtypes``)."""
    from orcal.ops._triton import _ops

    cases = []
    for dtype in dtypes:
        size = DTYPE_SIZE[dtype]
        ty = DTYPE_TYPES[dtype]
        acc = "fp64" if dtype == "float64" else "fp32"  # the loss's math dtype
        f64 = dtype == "float64"
        for R in raters:
            C = R + 1
            tile = _ops.voxel_block(C, size)
            cases.append(dict(
                kernel="ordinal_loss_kernel", dtype=dtype, case=f"R={R}, grad", voxels=tile["BLOCK_V"],
                bytes_per_voxel=2 * C * size + 1,
                signature={"x_ptr": f"*{ty}", "k_ptr": "*u8", "valid_ptr": "*u8", "params_ptr": f"*{acc}",
                           "loss_ptr": f"*{acc}", "partial_ptr": f"*{acc}", "grad_ptr": f"*{ty}", "flag_ptr": "*i32",
                           "V": "i32", "nblk": "i32"},
                constexprs={"HAS_VALID": False, "MAP": False, "GRAD": True, "IS_F64": f64, "M": R // 2 + 1,
                            **tile}))
            # rater masks are summed into votes by orc_targets_kernel first; the expected readout at R = 7
            for n_bins, expected in [(15, False), (100, False)] + [(15, True)] * (R == 7):
                tile = _ops.stats_tile(C, n_bins, size)
                cases.append(dict(
                    kernel="calibration_stats_kernel", dtype=dtype,
                    case=f"R={R}, ordinal{' expected' if expected else ''}, votes, {n_bins} bins",
                    voxels=tile["BLOCK_V"],
                    bytes_per_voxel=C * size + 1,
                    signature={"pred_ptr": f"*{ty}", "tgt_ptr": "*u8", "valid_ptr": "*u8", "counts_ptr": "*i64",
                               "partial_ptr": "*fp64", "auc_ptr": "*i64", "flag_ptr": "*i32",
                               **{n: "i32" for n in ("V", "R", "n_bins", "bin_lo", "auc_bins", "P",
                                                     "iters", "count_cols", "a_col", "tp_col", "pos_col",
                                                     "sum_cols", "brier_col")}},
                    constexprs={"KIND": 2, "EXPECTED": expected, "HAS_VALID": False, "IS_F64": f64,
                                "PACKED": True, "FULL": True, "M": R // 2 + 1, **tile}))
        tile = _ops.voxel_block(8, size)
        cases.append(dict(
            kernel="foreground_probability_kernel", dtype=dtype, case="R=7, majority", voxels=tile["BLOCK_V"],
            bytes_per_voxel=8 * size + size,
            signature={"x_ptr": f"*{ty}", "p_ptr": f"*{ty}", "V": "i32", "nblk": "i32"},
            constexprs={"EXPECTED": False, "IS_F64": f64, "M": 4, **tile}))
    cases.append(dict(
        kernel="orc_targets_kernel", dtype="uint8", case="R=7", voxels=1024, bytes_per_voxel=8,
        signature={"masks_ptr": "*u8", "k_ptr": "*u8", "flag_ptr": "*i32", "R": "i32", "V": "i32", "nblk": "i32"},
        constexprs={"R_PAD": 8, "BLOCK_V": 1024}))
    return cases


def compile_triton(case: dict):
    """Compile one of :func:`triton_cases` for sm_90a (no GPU needed); the result's ``asm`` holds ptx and cubin."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from orcal.ops._triton import _ops

    fn = getattr(_ops.kernels(), case["kernel"])
    sig = dict(case["signature"])
    sig.update({name: "constexpr" for name in case["constexprs"]})
    # Pointers from torch's allocator are 16-byte aligned and V a multiple of 16: what the JIT would see.
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if sig.get(name, "").startswith("*") or name == "V"}
    src = ASTSource(fn=fn, signature=sig, constexprs=case["constexprs"], attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": _ops.NUM_WARPS})


def triton_rows(cases: list[dict] | None = None, workdir: Path | None = None) -> list[SassRow]:
    """One row per case of :func:`triton_cases` (all of them by default)."""
    from orcal.ops._triton import _ops

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    cuobjdump = _tool("cuobjdump")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = workdir or Path(tmp)
        for case in triton_cases() if cases is None else cases:
            try:
                compiled = compile_triton(case)
                cubin = workdir / f"{case['kernel']}_{len(rows)}.cubin"
                cubin.write_bytes(compiled.asm["cubin"])
                res = next(iter(_resources(cubin, cuobjdump).values()))
                loop = hot_loop(next(iter(_functions(cubin, cuobjdump).values())))
                rows.append(SassRow(case["kernel"], "triton", case["dtype"], case["case"], res["registers"],
                                    res["spill_bytes"], len(loop), case["voxels"] // _ops.NUM_WARPS,
                                    case["bytes_per_voxel"], _count(loop, "SHFL"), _count(loop, "BAR")))
            except Exception as err:  # report it in the table, measure the others
                rows.append(SassRow(case["kernel"], "triton", case["dtype"], case["case"], 0, 0, 0, 0,
                                    case["bytes_per_voxel"], error=f"{type(err).__name__}: {str(err)[:200]}"))
    return rows


# --- the CUDA kernels: nvcc for sm_90a ----------------------------------------------------------------------

def _signature_head(demangled: str) -> str:
    """``void ns::kernel<T, (E)1>(args)`` -> ``void ns::kernel<T, (E)1>``: up to the ``(`` outside ``<>``."""
    depth = 0
    for i, ch in enumerate(demangled):
        depth += (ch == "<") - (ch == ">")
        if ch == "(" and depth == 0 and i and demangled[i - 1] != " ":
            return demangled[:i]
    return demangled


def cuda_rows() -> list[SassRow]:
    """Registers, spills and the hot loop of every CUDA kernel (nvcc -cubin of each ``csrc/cuda/*.cu``)."""
    with tempfile.TemporaryDirectory() as tmp:
        return _cuda_rows(Path(tmp))


def _cuda_rows(workdir: Path) -> list[SassRow]:
    nvcc = shutil.which("nvcc") or shutil.which(str(Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin/nvcc"))
    cuobjdump = _tool("cuobjdump")
    if not nvcc:
        return [SassRow("csrc/cuda", "cuda", "-", "-", 0, 0, 0, 0, 0.0, error="nvcc not found")]
    import sysconfig

    import torch.utils.cpp_extension as ext

    root = Path(__file__).resolve().parents[1]
    includes = [f"-I{p}" for p in ext.include_paths()] + [f"-I{root / 'csrc'}",
                                                          f"-I{sysconfig.get_paths()['include']}"]
    rows = []
    for cu in sorted((root / "csrc" / "cuda").glob("*.cu")):
        cubin = workdir / (cu.stem + ".cubin")
        # The flags of setup.py's CUDA build (and torch's own), for one architecture.
        cmd = [nvcc, "-cubin", "-O3", "-std=c++20", "-arch=sm_90a", "-o", str(cubin), str(cu), *includes,
               *ext.COMMON_NVCC_FLAGS, "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            rows.append(SassRow(cu.stem, "cuda", "-", "-", 0, 0, 0, 0, 0.0, error=proc.stderr.strip()[-200:]))
            continue
        res = _resources(cubin, cuobjdump)
        for name, lines in _functions(cubin, cuobjdump).items():
            demangled = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip() or name
            head = _signature_head(demangled.replace("(anonymous namespace)::", "")).replace("void ", "")
            short = re.sub(r"<.*", "", head).split("::")[-1]
            targs = head[head.index("<") + 1:head.rindex(">")] if "<" in head else ""
            first = targs.split(",")[0].strip()
            dtype = {"float": "float32", "double": "float64", "c10::BFloat16": "bfloat16",
                     "c10::Half": "float16"}.get(first, "-")
            case = f"{cu.stem}<{targs.replace('c10::', '')}>" if targs else cu.stem
            loop = hot_loop(lines)
            r = res.get(name, {"registers": 0, "spill_bytes": 0})
            # one voxel per thread per trip of a grid-stride loop
            rows.append(SassRow(short, "cuda", dtype, case[:80], r["registers"], r["spill_bytes"], len(loop), 32,
                                0.0, _count(loop, "SHFL"), _count(loop, "BAR")))
    return rows


def markdown(rows: list[SassRow]) -> str:
    lines = ["| kernel | provider | dtype | case | registers | spill bytes | hot-loop instructions | shuffles | "
             "barriers | voxels per warp-trip | warp-instr / voxel | H100 budget at copy bandwidth |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.error:
            error = r.error.replace("|", "/").replace("\n", " ")
            lines.append(f"| {r.kernel} | {r.provider} | {r.dtype} | {r.case} | error: {error} ||||||||")
            continue
        budget = f"{r.budget:.1f}" if r.bytes_per_voxel else ""
        lines.append(f"| {r.kernel} | {r.provider} | {r.dtype} | {r.case} | {r.registers} | {r.spill_bytes} | "
                     f"{r.loop_instructions} | {r.shuffles} | {r.barriers} | {r.voxels_per_trip} | "
                     f"{r.per_voxel:.1f} | {budget} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sass", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="directory for sass.md and sass.json")
    parser.add_argument("--cuda", action="store_true", help="also the CUDA kernels (needs nvcc)")
    parser.add_argument("--quick", action="store_true", help="only float32 at R = 7 (a smoke test of the table)")
    args = parser.parse_args(argv)
    cases = triton_cases()
    if args.quick:
        cases = [c for c in cases if c["dtype"] in ("float32", "uint8") and "R=32" not in c["case"]
                 and "100 bins" not in c["case"]]
    rows = triton_rows(cases) + (cuda_rows() if args.cuda else [])
    table = markdown(rows)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "sass.md").write_text("# Kernel instruction counts (sm_90a, compiled without a GPU)\n\n" + table + "\n")
        (out / "sass.json").write_text(json.dumps([asdict(r) | {"per_voxel": r.per_voxel} for r in rows], indent=1))
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
