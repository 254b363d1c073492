"""Ahead-of-time compilation of every kernel for named GPUs, with no GPU and no driver present.

Used by ``tests/test_kernels_compile.py`` (the compile matrix) and
``benchmarks/bench_kernels.py --compile`` (``benchmarks/results/kernels_compile.md``). Importing
this module needs ``triton`` (the package's ``__init__`` never imports it).

*One table, derived from the launchers.* :func:`matrix` walks :data:`CASES`: for each public op
and each dtype combination the dispatcher can hand to a launcher (fp32/fp16/bf16 factors, mixed
lists, which the launchers upcast to fp32, and for ``lowrank_accumulate_`` fp32/fp16/bf16 ``out``),
both ``tl.dot`` precisions :func:`._tables.input_precision` can return, and every target in
:data:`._tables.GPU_TARGETS`, it calls the launcher's own ``plan_*`` function on small CPU tensors
for that target (the plan asks :func:`._tables.config_for` for the target's config, as on a GPU). The resulting :class:`._tables.Launch`
is turned into a Triton signature by Triton's own argument binder (the one ``kernel[grid](...)``
uses, so types, ``tt.divisibility`` and the value-1 specialisation are exactly the runtime's for
these arguments). A change to a kernel's arguments or to a launcher therefore changes what is
compiled here; nothing is copied by hand.

The representative arguments are contiguous tensors whose sizes are multiples of 16 (the LoRA
shapes of real models: hidden sizes and ranks are), K = 2 clients, one row slice; the runtime may
also build variants for other specialisations (an odd size, K = 1), which compile from the same
code with fewer assumptions.

*What a compile reports* (:class:`CompileResult`): the binary (``cubin`` on NVIDIA, ``hsaco`` on
AMD), the shared memory (LDS) the kernel needs per program (Triton's metadata), and from the
target's own assembler: on NVIDIA the ptxas ``-v`` log Triton writes when ``TRITON_DUMP_PTXAS_LOG``
is set (registers per thread, stack, spill store/load bytes); on AMD the kernel descriptor in the
AMDGCN assembly (VGPRs incl. AGPRs, SGPRs, VGPR spills, scratch bytes).
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from ._tables import GPU_TARGETS, GpuArch, KernelConfig, Launch

__all__ = ["Variant", "CompileJob", "CompileResult", "CASES", "PRECISIONS", "matrix", "compile_job",
           "compile_all", "register_limit", "gpu_target", "violations", "jit_kernels", "canaries"]

#: the values :func:`._tables.input_precision` can return (``tl.dot`` precision of fp32 operands)
PRECISIONS = ("ieee", "tf32")

_DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: factor lists the dispatcher can pass: one dtype, or mixed (a launcher upcasts mixed lists to fp32)
_FACTOR_LISTS = (("fp32", "fp32"), ("fp16", "fp16"), ("bf16", "bf16"), ("fp16", "bf16"))
_M = _N = 256  # representative sizes (multiples of 16, like every real LoRA shape)
_R = 16        # per-client rank


def _label(pair: tuple[str, str]) -> str:
    return pair[0] if pair[0] == pair[1] else "+".join(pair)


def _factors(pair, rows: int, side: str) -> list[torch.Tensor]:
    shape = (rows, _R) if side == "left" else (_R, rows)
    return [torch.empty(shape, dtype=_DT[d]) for d in pair]


@dataclass(frozen=True)
class Variant:
    """One call shape of one public op: ``plan(target, precision) -> Launch | None``."""

    op: str
    dtypes: str
    plan: Callable[[GpuArch, str], Launch | None]


def _accumulate_variants() -> Iterator[Variant]:
    from .lowrank_accumulate import plan_lowrank_accumulate
    for out_dt in ("fp32", "fp16", "bf16"):
        for lp in _FACTOR_LISTS:
            for rp in _FACTOR_LISTS:
                def plan(arch, prec, out_dt=out_dt, lp=lp, rp=rp):
                    out = torch.empty(_M, _N, dtype=_DT[out_dt])
                    return plan_lowrank_accumulate(out, _factors(lp, _M, "left"), _factors(rp, _N, "right"),
                                                   [0.5, -1.0], arch, prec)
                yield Variant("lowrank_accumulate_", f"out={out_dt} L={_label(lp)} R={_label(rp)}", plan)


def _gram_variants() -> Iterator[Variant]:
    from .gram import plan_stacked_gram
    for side in ("left", "right"):
        for fp in _FACTOR_LISTS:
            def plan(arch, prec, side=side, fp=fp):
                fs = _factors(fp, _M, side)
                return plan_stacked_gram([fs], [[0.5, -1.0]], side, arch, prec, splits=1)[1]
            yield Variant(f"stacked_gram({side})", f"factors={_label(fp)}", plan)


def _sketch_variants() -> Iterator[Variant]:
    from .sketch import plan_stacked_expand, plan_stacked_shrink
    # The wrappers (batched_stacked_matmul[_t]) hand the launchers fp32 ``mats`` whatever the caller's
    # dtype; left X_cat @ mat and right X_catᵀ @ mat expand, the other two shrink.
    for op, side, kind in (("stacked_matmul(left)", "left", "expand"), ("stacked_matmul_t(right)", "right", "expand"),
                           ("stacked_matmul(right)", "right", "shrink"), ("stacked_matmul_t(left)", "left", "shrink")):
        for fp in _FACTOR_LISTS:
            def plan(arch, prec, side=side, kind=kind, fp=fp):
                fs = _factors(fp, _M, side)
                if kind == "expand":
                    mats = torch.empty(1, _R * len(fs), 32, dtype=torch.float32)
                    return plan_stacked_expand([fs], [[0.5, -1.0]], side, mats, arch, prec)[1]
                mats = torch.empty(1, _M, 32, dtype=torch.float32)
                return plan_stacked_shrink([fs], [[0.5, -1.0]], side, mats, arch, prec, splits=1)[1]
            yield Variant(op, f"factors={_label(fp)}", plan)


#: the one table: every public op's launcher, by the dtypes it can be called with
CASES: tuple[Callable[[], Iterator[Variant]], ...] = (_accumulate_variants, _gram_variants, _sketch_variants)


def gpu_target(arch: GpuArch):
    """Triton's ``GPUTarget`` for ``arch``."""
    from triton.backends.compiler import GPUTarget
    return GPUTarget(arch.backend, arch.arch, arch.warp_size)


@dataclass(frozen=True)
class CompileJob:
    """Everything a worker process needs to compile one kernel variant for one target (picklable)."""

    kernel: str  # "module:qualname" of the @triton.jit function
    signature: dict
    constexprs: dict
    attrs: dict
    num_warps: int
    num_stages: int
    arch: GpuArch
    config: KernelConfig
    uses: tuple[tuple[str, str, str], ...] = ()  # (op, dtypes, precision) that launch this variant

    @property
    def kernel_name(self) -> str:
        return self.kernel.rsplit(":", 1)[1]

    @property
    def key(self) -> tuple:
        return (self.kernel, tuple(sorted(self.signature.items())), tuple(sorted(self.constexprs.items())),
                repr(sorted(self.attrs.items())), self.num_warps, self.num_stages, self.arch.label)

    def constexpr(self, name: str):
        from importlib import import_module
        mod, qual = self.kernel.split(":")
        fn = getattr(import_module(mod), qual)
        return self.constexprs[(fn.arg_names.index(name),)]


def _bind(launch: Launch, arch: GpuArch) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of ``launch`` for ``arch``, by Triton's own runtime binder."""
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    fn = launch.kernel
    if not hasattr(fn, "_pack_args"):
        raise RuntimeError("kernels were defined for the interpreter (TRITON_INTERPRET=1): cannot compile them")
    backend = make_backend(gpu_target(arch))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.constexprs, num_warps=launch.num_warps, num_stages=launch.num_stages)
    bound, spec, opts = binder(*launch.args, **kwargs)
    _, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    return dict(signature), dict(constexprs), dict(attrs)


def jit_kernels() -> dict[str, object]:
    """Every ``@triton.jit`` function of the package, by ``"module:qualname"`` (what :func:`matrix` must cover)."""
    import pkgutil
    from importlib import import_module

    from triton.runtime.jit import JITFunction
    pkg = import_module(__package__)
    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = import_module(f"{__package__}.{info.name}")
        for obj in vars(mod).values():
            if isinstance(obj, JITFunction) and obj.fn.__module__ == mod.__name__:
                found[f"{obj.fn.__module__}:{obj.fn.__qualname__}"] = obj
    return found


def matrix(targets: tuple[GpuArch, ...] = GPU_TARGETS) -> list[CompileJob]:
    """Every distinct (kernel, signature, constexprs, launch options, target) the launchers produce.

    Call shapes that give the same compiled kernel (e.g. a Gram of left and of right factors, or
    the ``tf32`` and ``ieee`` settings for bf16 operands, which the launchers map to one variant)
    are one job, with all of them listed in ``uses``."""
    jobs: dict[tuple, CompileJob] = {}
    for arch in targets:
        for make in CASES:
            for var in make():
                for prec in PRECISIONS:
                    launch = var.plan(arch, prec)
                    if launch is None:
                        raise AssertionError(f"{var.op} {var.dtypes}: representative call launched nothing")
                    sig, cex, attrs = _bind(launch, arch)
                    fn = launch.kernel
                    job = CompileJob(f"{fn.fn.__module__}:{fn.fn.__qualname__}", sig, cex, attrs,
                                     launch.num_warps, launch.num_stages, arch, launch.config)
                    use = (var.op, var.dtypes, prec)
                    old = jobs.get(job.key)
                    jobs[job.key] = CompileJob(**{**job.__dict__, "uses": (old.uses if old else ()) + (use,)})
    return list(jobs.values())


@dataclass(frozen=True)
class CompileResult:
    job: CompileJob
    binary_kind: str = ""
    binary_bytes: int = 0
    shared: int = -1          # bytes of shared memory / LDS per program
    registers: int = -1       # NVIDIA: per thread (ptxas); AMD: VGPRs incl. AGPRs per lane
    spill_bytes: int = -1     # NVIDIA: spill stores + loads; AMD: VGPR spills (count) + scratch bytes
    stack_bytes: int = -1     # NVIDIA: stack frame; AMD: private segment (scratch) bytes
    sgpr_spills: int = 0      # AMD only: SGPRs spilled into VGPR lanes (registers, not memory)
    seconds: float = 0.0      # wall seconds of triton.compile in its worker
    cpu_seconds: float = 0.0  # CPU seconds of the same (worker + its ptxas / lld children): load-independent
    magic: bytes = b""        # first 4 bytes of the binary (ELF: b"\x7fELF")
    error: str = ""
    log: str = field(default="", repr=False)

    @property
    def ok(self) -> bool:
        return not self.error and self.binary_bytes > 0


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _amd_field(asm: str, name: str) -> int:
    m = re.search(rf"^\s*\.{name}:\s*(\d+)", asm, re.M)
    return int(m.group(1)) if m else -1


def _cpu() -> float:
    import resource
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def compile_job(job: CompileJob) -> CompileResult:
    """Compile one job in this process (``TRITON_DUMP_PTXAS_LOG`` must be set for NVIDIA resources)."""
    from importlib import import_module

    import triton
    from triton.compiler import ASTSource
    mod, qual = job.kernel.split(":")
    fn = getattr(import_module(mod), qual)
    src = ASTSource(fn, job.signature, job.constexprs, job.attrs)
    buf = io.StringIO()
    t0, c0 = time.perf_counter(), _cpu()
    try:
        with contextlib.redirect_stdout(buf):
            k = triton.compile(src, target=gpu_target(job.arch),
                               options={"num_warps": job.num_warps, "num_stages": job.num_stages})
    except Exception as e:  # reported, asserted by the caller
        return CompileResult(job, seconds=time.perf_counter() - t0, error=f"{type(e).__name__}: {e}"[:4000],
                             log=buf.getvalue()[-4000:])
    secs, cpu = time.perf_counter() - t0, _cpu() - c0
    log = buf.getvalue()
    shared = int(k.metadata.shared)
    if job.arch.backend == "cuda":
        binary = k.asm.get("cubin", b"")
        regs = _PTXAS_REGS.search(log)
        spill = _PTXAS_SPILL.search(log)
        return CompileResult(job, "cubin", len(binary), shared, int(regs.group(1)) if regs else -1,
                             int(spill.group(2)) + int(spill.group(3)) if spill else -1,
                             int(spill.group(1)) if spill else -1, 0, secs, cpu, bytes(binary[:4]), "", log)
    binary = k.asm.get("hsaco", b"")
    asm = k.asm.get("amdgcn", "")
    vgpr_spills = _amd_field(asm, "vgpr_spill_count")
    scratch = _amd_field(asm, "private_segment_fixed_size")
    spills = vgpr_spills + scratch if min(vgpr_spills, scratch) >= 0 else -1
    return CompileResult(job, "hsaco", len(binary), shared, _amd_field(asm, "vgpr_count"), spills, scratch,
                         max(0, _amd_field(asm, "sgpr_spill_count")), secs, cpu, bytes(binary[:4]), "", "")


def _init_worker(cache_dir: str) -> None:
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ.pop("TRITON_INTERPRET", None)
    import triton  # noqa: F401  (imported once per worker, after the environment is set)


def compile_all(jobs: list[CompileJob], workers: int | None = None) -> tuple[list[CompileResult], float]:
    """Compile ``jobs`` in a pool of fresh processes (one per CPU by default); ``(results, wall seconds)``.

    Triton's cache goes to a temporary directory that is removed afterwards, so every compile is
    a real one and nothing is left on disk."""
    import multiprocessing as mp
    if not workers:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cache = tempfile.mkdtemp(prefix="fedmomentum-aot-")
    t0 = time.perf_counter()
    try:
        with ProcessPoolExecutor(max_workers=max(1, workers), mp_context=mp.get_context("spawn"),
                                 initializer=_init_worker, initargs=(cache,)) as pool:
            done = list(pool.map(compile_job, jobs, chunksize=1))
        results = done
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return results, time.perf_counter() - t0


def register_limit(arch: GpuArch, num_warps: int) -> int:
    """Most registers per thread (NVIDIA) / VGPRs incl. AGPRs per lane (AMD CDNA3) a program may use."""
    if arch.backend == "cuda":
        return min(255, 65536 // (num_warps * arch.warp_size))
    return 512


def violations(res: CompileResult) -> list[str]:
    """What is wrong with one compiled kernel for its target (empty: it fits).

    A binary exists; shared memory (LDS) per program within the target's per-block limit;
    registers within :func:`register_limit`; no spills (NVIDIA: ptxas spill store/load bytes and
    stack frame; AMD: VGPR spills and scratch). SGPRs parked in VGPR lanes on AMD are not spills."""
    job, arch, out = res.job, res.job.arch, []
    if res.error:
        return [f"compile failed: {res.error.splitlines()[0] if res.error else ''}"]
    if res.binary_bytes <= 0:
        out.append(f"no {res.binary_kind or 'binary'} produced")
    if not 0 <= res.shared <= arch.shared_bytes:
        out.append(f"shared memory {res.shared} B > {arch.shared_bytes} B per block on {arch.label}")
    limit = register_limit(arch, job.num_warps)
    if not 0 < res.registers <= limit:
        out.append(f"{res.registers} registers per thread (limit {limit}, or not reported)")
    if res.spill_bytes != 0:
        out.append(f"spills: {res.spill_bytes} (bytes on NVIDIA, VGPR count + scratch bytes on AMD)")
    if res.stack_bytes != 0:
        out.append(f"stack / scratch {res.stack_bytes} B")
    return out


def canaries(jobs: list[CompileJob]) -> list[CompileJob]:
    """Configs :func:`violations` must reject, built from ``jobs`` (so they track the launchers too):
    the fp32 tile size ``lowrank_accumulate_`` had before issue 16 (128 x 128 x 32, 3 stages) on
    sm_80 and sm_90, which ptxas spills, and a 256 x 256 x 64 bf16 tile on gfx942."""
    import dataclasses
    fns = jit_kernels()
    out = []
    for label, dt, blocks, stages, what in (
            ("sm_80", "out=fp32 L=fp32 R=fp32", (128, 128, 32), 3, "pre-issue fp32 tile"),
            ("sm_90", "out=fp32 L=fp32 R=fp32", (128, 128, 32), 3, "pre-issue fp32 tile"),
            ("gfx942", "out=bf16 L=bf16 R=bf16", (256, 256, 64), 2, "oversized bf16 tile")):
        job = next(j for j in jobs if j.arch.label == label and j.kernel_name == "_lowrank_accumulate_kernel"
                   and any(u[1] == dt and u[2] == "ieee" for u in j.uses))
        fn = fns[job.kernel]
        cex = dict(job.constexprs)
        for name, v in zip(("BLOCK_M", "BLOCK_N", "BLOCK_T"), blocks):
            cex[(fn.arg_names.index(name),)] = v
        out.append(dataclasses.replace(job, constexprs=cex, num_stages=stages, uses=((what, dt, "ieee"),)))
    return out
