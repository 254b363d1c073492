"""Every Triton kernel compiled ahead of time for real GPUs, on a machine without one (issue 16).

The interpreter tests (``tests/kernels_interp_cases.py``) check what the kernels compute; the
interpreter accepts programs a GPU compiler rejects or runs badly (``tl.dot`` shapes and dtypes,
layouts, the shared memory of a pipelined config, register spills). Here each kernel x each dtype
combination the dispatcher can launch x both ``tl.dot`` precisions x the config the chooser
returns for the target is compiled with ``triton.compile`` for NVIDIA sm_80 (A100), sm_90
(H100/H200), sm_100 (B200) and AMD gfx942 (MI300X): Triton's bundled ptxas and LLVM AMDGPU
backend need no GPU and no driver. The list of what to compile comes from the launchers
themselves (:func:`fedmomentum_kernels._compile.matrix`); it is compiled once per session in a
process pool (:func:`fedmomentum_kernels._compile.compile_all`, Triton's cache in a temporary
directory that is removed) and every test below reads those results.

``benchmarks/bench_kernels.py --compile`` writes the same matrix as a table to
``benchmarks/results/kernels_compile.md``.
"""
from __future__ import annotations

import dataclasses
import os
import time

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("the kernels are defined for the interpreter in this process (TRITON_INTERPRET=1)",
                allow_module_level=True)

from fedmomentum_kernels import _compile as C  # noqa: E402
from fedmomentum_kernels._tables import GPU_TARGETS, GpuArch, config_for  # noqa: E402

TARGETS = {a.label: a for a in GPU_TARGETS}
#: limits the issue states (per-block shared memory / LDS), checked against the table the chooser reads
STATED_SHARED = {"sm_80": 163 * 1024, "sm_90": 227 * 1024, "sm_100": 227 * 1024, "gfx942": 64 * 1024}


@pytest.fixture(scope="module")
def compiled():
    t0 = time.perf_counter()
    jobs = C.matrix()
    canaries = C.canaries(jobs)
    results, wall = C.compile_all(jobs + canaries)
    n = len(jobs)
    print(f"\ncompile matrix: {n} kernels compiled in {wall:.1f} s wall on {os.cpu_count()} CPUs "
          f"({sum(r.cpu_seconds for r in results[:n]):.1f} CPU s in the workers); "
          f"planning {time.perf_counter() - t0 - wall:.1f} s")
    return results[:n], results[n:]


def test_matrix_covers_every_kernel_target_and_config():
    jobs = C.matrix()
    kernels = set(C.jit_kernels())
    assert len(kernels) >= 4
    for label, arch in TARGETS.items():
        mine = [j for j in jobs if j.arch.label == label]
        assert {j.kernel for j in mine} == kernels, label
        # every config the chooser can return for this target (it depends on the operand dtype)
        chooser = {config_for(arch, d) for d in (torch.float32, torch.float16, torch.bfloat16)}
        assert {j.config for j in mine} == chooser, label
    ops = {u[0] for j in jobs for u in j.uses}
    assert ops == {"lowrank_accumulate_", "stacked_gram(left)", "stacked_gram(right)", "stacked_matmul(left)",
                   "stacked_matmul(right)", "stacked_matmul_t(left)", "stacked_matmul_t(right)"}
    # 3 out dtypes x 4 factor lists x 4 factor lists x 2 precisions per target, all compiled
    acc_uses = [u for j in jobs if j.arch.label == "sm_90" for u in j.uses if u[0] == "lowrank_accumulate_"]
    assert len(acc_uses) == len(set(acc_uses)) == 3 * 4 * 4 * 2


def test_signatures_come_from_the_launchers():
    """The compiled signature is the launcher's: pointer types follow the tensors it passes."""
    jobs = C.matrix(targets=(TARGETS["sm_90"],))
    fns = C.jit_kernels()
    for j in jobs:
        fn = fns[j.kernel]
        assert list(j.signature) == fn.arg_names, j.kernel
        for name, ty in j.signature.items():
            if fn.params[fn.arg_names.index(name)].is_constexpr:
                assert ty == "constexpr"
    acc = {u[1]: j for j in jobs if j.kernel_name == "_lowrank_accumulate_kernel" for u in j.uses}
    assert acc["out=bf16 L=bf16 R=bf16"].signature["out_ptr"] == "*bf16"
    assert acc["out=bf16 L=bf16 R=bf16"].signature["l0_ptr"] == "*bf16"
    assert acc["out=fp16 L=fp32 R=fp32"].signature["out_ptr"] == "*fp16"
    # mixed lefts/rights are upcast by the launcher: the kernel sees fp32 operands
    assert acc["out=bf16 L=fp16 R=bf16"].signature["l0_ptr"] == "*fp32"
    assert acc["out=bf16 L=fp16 R=bf16"].constexpr("CAST_F32") is True
    assert acc["out=bf16 L=bf16 R=bf16"].constexpr("CAST_F32") is False


def test_config_chooser_is_target_aware():
    nv, amd = TARGETS["sm_90"], TARGETS["gfx942"]
    assert nv.warp_size == 32 and amd.warp_size == 64
    for d in (torch.float32, torch.bfloat16):
        a, b = config_for(nv, d), config_for(amd, d)
        assert a.num_warps * nv.warp_size == b.num_warps * amd.warp_size  # same threads per program
        assert b.num_warps < a.num_warps and b.num_stages <= a.num_stages
        assert a.target_programs == 4 * nv.num_sms and b.target_programs == 4 * amd.num_sms
    for label, want in STATED_SHARED.items():
        assert TARGETS[label].shared_bytes == want
    # stages follow the shared memory a target has
    tiny = dataclasses.replace(nv, shared_bytes=20 * 1024)
    assert config_for(tiny, torch.float32).num_stages < config_for(nv, torch.float32).num_stages
    # fp32 operands get smaller tiles than bf16 (the bf16 tile spills with fp32 operands)
    f, h = config_for(nv, torch.float32), config_for(nv, torch.bfloat16)
    assert f.block_m * f.block_t < h.block_m * h.block_t


def test_violations_detects_each_limit():
    job = C.matrix(targets=(TARGETS["gfx942"],))[0]
    ok = C.CompileResult(job, "hsaco", 100, 1024, 64, 0, 0)
    assert C.violations(ok) == []
    assert C.violations(dataclasses.replace(ok, shared=64 * 1024 + 1))
    assert C.violations(dataclasses.replace(ok, registers=513))
    assert C.violations(dataclasses.replace(ok, spill_bytes=4))
    assert C.violations(dataclasses.replace(ok, binary_bytes=0))
    assert C.violations(dataclasses.replace(ok, error="boom"))
    assert C.violations(dataclasses.replace(ok, registers=-1))  # not reported counts as a failure


@pytest.mark.parametrize("label", list(TARGETS))
def test_every_kernel_compiles_within_limits(compiled, label):
    results, _ = compiled
    mine = [r for r in results if r.job.arch.label == label]
    assert mine
    kind = "cubin" if TARGETS[label].backend == "cuda" else "hsaco"
    bad = []
    for r in mine:
        problems = C.violations(r)
        if r.ok and r.binary_kind != kind:
            problems.append(f"binary is {r.binary_kind}, expected {kind}")
        if problems:
            bad.append(f"{r.job.kernel_name} {r.job.uses[0][1]} {r.job.uses[0][2]} "
                       f"warps={r.job.num_warps} stages={r.job.num_stages}: {'; '.join(problems)}")
    assert not bad, "\n".join(bad)


def test_binaries_are_elf_objects(compiled):
    """cubin and hsaco are ELF files: the bytes are one (not an empty or text blob)."""
    results, _ = compiled
    assert all(r.magic == b"\x7fELF" for r in results)


def test_checks_reject_configs_that_do_not_fit(compiled):
    """The spill checks are not vacuous: the old fp32 tile size spills on sm_80 and sm_90, 256-wide bf16
    tiles on gfx942."""
    _, canaries = compiled
    assert len(canaries) == 3
    for r in canaries:
        assert C.violations(r), f"{r.job.arch.label}: expected a violation, got {r}"
