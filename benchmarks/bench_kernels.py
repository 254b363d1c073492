"""pytest-benchmark suite for the kernel entry points' torch paths (CPU), side by side.

    python -m pytest benchmarks/bench_kernels.py --benchmark-only --benchmark-columns=min,median
    python benchmarks/bench_kernels.py --compile   # AOT compile matrix -> results/kernels_compile.{md,csv}

On a CPU the public functions run their torch references (the Triton kernels need a GPU;
``benchmarks/run_kernels_gpu.py`` measures them there). What this compares, per group:

* ``merge``: ``lowrank_accumulate_`` (one fp32 pass over W, addmm per client) vs the naive
  ``W += Σ c_k L_k @ R_k`` that materialises each m x n product (what FedEx-LoRA / FLoRA do).
* ``gram``: ``stacked_gram`` (reference: weighted concat + one GEMM) vs ``torch.cat`` + GEMM on the
  unweighted stack (the cost floor of any exact factored method).
"""
from __future__ import annotations

import pytest
import torch

import fedmomentum_kernels as K

M = N = 2048
KC, R = 10, 16


@pytest.fixture(scope="module")
def factors():
    g = torch.Generator().manual_seed(0)
    L = [torch.randn(M, R, generator=g) * 0.02 for _ in range(KC)]
    Rt = [torch.randn(R, N, generator=g) * 0.02 for _ in range(KC)]
    return L, Rt, [1.0 / KC] * KC


@pytest.mark.benchmark(group="merge 2048x2048 fp32, K=10, r=16")
def test_lowrank_accumulate(benchmark, factors):
    L, Rt, cs = factors
    W = torch.zeros(M, N)
    benchmark(lambda: K.lowrank_accumulate_(W, L, Rt, cs))


@pytest.mark.benchmark(group="merge 2048x2048 fp32, K=10, r=16")
def test_naive_dense_products(benchmark, factors):
    L, Rt, cs = factors
    W = torch.zeros(M, N)

    def naive():
        for c, a, b in zip(cs, L, Rt):
            W.add_(c * (a @ b))
    benchmark(naive)


@pytest.mark.benchmark(group="merge bf16 W 2048x2048, K=10, r=16")
def test_lowrank_accumulate_bf16(benchmark, factors):
    L, Rt, cs = factors
    W = torch.zeros(M, N, dtype=torch.bfloat16)
    Lb, Rb = [x.bfloat16() for x in L], [x.bfloat16() for x in Rt]
    benchmark(lambda: K.lowrank_accumulate_(W, Lb, Rb, cs))


@pytest.mark.benchmark(group="gram 2048 x 160 fp32")
def test_stacked_gram(benchmark, factors):
    L, _, cs = factors
    benchmark(lambda: K.stacked_gram(L, cs, "left"))


@pytest.mark.benchmark(group="gram 2048 x 160 fp32")
def test_cat_then_gemm(benchmark, factors):
    L, _, _ = factors

    def floor():
        x = torch.cat(L, 1)
        return x.T @ x
    benchmark(floor)


# ----------------------------------------------------------------------------- AOT compile table

def _config_label(job) -> str:
    c = {name: job.constexpr(name) for name in ("BLOCK_M", "BLOCK_N", "BLOCK_R", "BLOCK_L", "BLOCK_T")
         if _has(job, name)}
    tiles = "x".join(str(v) for v in c.values())
    return f"{tiles} w{job.num_warps} s{job.num_stages}"


def _has(job, name) -> bool:
    try:
        job.constexpr(name)
        return True
    except (ValueError, KeyError):
        return False


def write_compile_table(out_dir) -> None:
    """Compile the whole matrix (as tests/test_kernels_compile.py does) and write the table."""
    import os
    import sys
    from pathlib import Path

    import triton

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import machine, write_csv
    from fedmomentum_kernels import _compile as C
    from triton.backends.nvidia.compiler import get_ptxas

    jobs = C.matrix()
    canaries = C.canaries(jobs)
    everything, wall = C.compile_all(jobs + canaries)
    results, canary_results = everything[:len(jobs)], everything[len(jobs):]
    rows = []
    for r in results:
        j = r.job
        # the row is named by the call shape whose factors have the kernel's own operand type
        own = (j.signature.get("l0_ptr") or j.signature.get("f0_ptr") or "").lstrip("*")
        dtypes = sorted({u[1] for u in j.uses}, key=lambda d: (d.count("+"), -d.count(own), d))
        rows.append({
            "kernel": j.kernel_name, "target": j.arch.label, "gpu": j.arch.name,
            "dtypes": dtypes[0] + (f" (+{len(dtypes) - 1} more call shapes)" if len(dtypes) > 1 else ""),
            "all_dtypes": "; ".join(sorted(dtypes)), "precision": "/".join(sorted({u[2] for u in j.uses})),
            "ops": "; ".join(sorted({u[0] for u in j.uses})), "config": _config_label(j),
            "shared_bytes": r.shared, "shared_limit": j.arch.shared_bytes, "registers": r.registers,
            "spills": r.spill_bytes, "stack": r.stack_bytes, "sgpr_to_vgpr": r.sgpr_spills,
            "binary": f"{r.binary_kind} {r.binary_bytes} B", "compile_s": round(r.seconds, 2),
            "compile_cpu_s": round(r.cpu_seconds, 2), "violations": "; ".join(C.violations(r)),
        })
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(str(out_dir / "kernels_compile.csv"), rows)
    bad = [x for x in rows if x["violations"]]
    cpu = sum(r.cpu_seconds for r in results)
    lines = [
        "# Triton kernels compiled ahead of time for GPUs (`benchmarks/bench_kernels.py --compile`)",
        "",
        f"Machine (no GPU): {machine()}; triton {triton.__version__}; "
        f"ptxas {get_ptxas(90).version}. {len(rows)} distinct kernels (kernel x dtypes x "
        f"`tl.dot` precision x target, each with the config `config_for` returns for that target and "
        f"operand dtype) compiled in {wall:.1f} s wall with {os.cpu_count()} worker processes "
        f"({cpu:.1f} CPU s, ptxas/LLVM included). Violations: {len(bad)}.",
        "",
        "Columns: shared = bytes of shared memory (LDS on AMD) per program, from Triton's metadata, "
        "against the target's per-block limit; registers = per thread from `ptxas -v` (NVIDIA) or "
        "VGPRs incl. AGPRs per lane from the AMDGCN kernel descriptor (AMD); spills = ptxas spill "
        "store + load bytes (NVIDIA) or VGPR spill count + scratch bytes (AMD); sgpr→vgpr = SGPRs "
        "parked in VGPR lanes (AMD, not memory). Config = tile sizes (M/N or R/L, then T) "
        "w = warps (wavefronts of 64 on AMD) s = pipeline stages. Call shapes that compile to the "
        "same kernel are one row (the CSV lists them all). compile s = wall seconds in a worker on "
        "this shared 2-core machine, cpu s = its CPU seconds.",
        "",
        "| kernel | dtypes | dot precision | target | config | shared B (limit) | registers | spills "
        "| sgpr→vgpr | binary | compile s | cpu s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for x in sorted(rows, key=lambda x: (x["kernel"], x["target"], x["dtypes"], x["precision"])):
        lines.append(f"| {x['kernel']} | {x['dtypes']} | {x['precision']} | {x['target']} | {x['config']} "
                     f"| {x['shared_bytes']} ({x['shared_limit']}) | {x['registers']} | {x['spills']} "
                     f"| {x['sgpr_to_vgpr']} | {x['binary']} | {x['compile_s']} | {x['compile_cpu_s']} |")
    lines += ["", "## Configs the checks reject (compiled in the same run)", "",
              "The fp32 tile size `lowrank_accumulate_` had before issue 16 (128 x 128 x 32, 3 stages; with today's "
              "kernel body, which already needs half the registers of the old one), and "
              "an oversized bf16 tile on gfx942: what the limits say about them.", ""]
    for r in canary_results:
        lines.append(f"- {r.job.uses[0][0]} {r.job.kernel_name} {r.job.uses[0][1]} on {r.job.arch.label}, "
                     f"{_config_label(r.job)}: shared {r.shared} B, registers {r.registers}, spills "
                     f"{r.spill_bytes}, stack {r.stack_bytes} -> {'; '.join(C.violations(r)) or 'fits'}")
    if bad:
        lines += ["", "## Violations", ""] + [f"- {x['kernel']} {x['target']} {x['dtypes']}: {x['violations']}"
                                              for x in bad]
    (out_dir / "kernels_compile.md").write_text("\n".join(lines) + "\n")
    print(f"{len(rows)} kernels, {wall:.1f} s wall, {cpu:.1f} CPU s, {len(bad)} violations -> {out_dir}")


if __name__ == "__main__":
    import argparse
    from pathlib import Path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compile", action="store_true", help="write results/kernels_compile.{md,csv}")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    if not args.compile:
        ap.error("run the timing suite with pytest (see the docstring); --compile writes the compile table")
    write_compile_table(args.out)
