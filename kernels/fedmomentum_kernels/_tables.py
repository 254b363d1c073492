"""Pointer/stride tables and launch settings shared by the Triton launchers (pure torch).

The kernels never see a concatenated ``B_cat``/``A_cat``: they read each client's factor
through a small int64 table of ``(data_ptr, row stride, column stride, width)`` rows, one
row per (layer, client), copied to the device once per launch. This module builds those
tables and holds the launch heuristics; it does not import Triton, so it can be imported
(and unit-tested) anywhere.

*Tall view.* Every stacked kernel reads a factor as a *tall* ``rows x t`` matrix:
``side="left"`` factors (``m x t``) as they are, ``side="right"`` factors (``t x n``)
transposed, which is only a swap of the two strides. With that view ``B_catᵀB_cat`` and
``A_cat A_catᵀ`` are the same computation, and so are the four stacked products.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Sequence

import torch

__all__ = ["interpret_mode", "input_precision", "needs_f32_dot", "factor_dtype", "common_dtype", "tall_table",
           "chunk_table", "pair_table", "client_offsets", "GpuArch", "GPU_TARGETS", "arch_of", "KernelConfig",
           "config_for", "stage_bytes", "Launch", "TilePolicy"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def input_precision(device: torch.device) -> str:
    """``tl.dot`` precision for fp32 operands: TF32 exactly when torch would use it for a matmul
    on this device (``torch.backends.cuda.matmul.allow_tf32``), else IEEE fp32."""
    if device.type == "cuda" and not interpret_mode() and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def needs_f32_dot(dtype: torch.dtype) -> bool:
    """True when tiles of ``dtype`` must be upcast to fp32 before ``tl.dot``.

    Only in the interpreter for bfloat16: Triton 3.x's interpreter multiplies the raw uint16
    bits of bf16 tiles in ``tl.dot``. Upcasting is numerically the same (a bf16 x bf16 product is
    exact in fp32 and the accumulation is fp32 either way); on GPU bf16 stays on the tensor cores.
    """
    return dtype == torch.bfloat16 and interpret_mode()


def factor_dtype(tensors: Sequence[torch.Tensor], what: str) -> torch.dtype:
    """The one dtype of ``tensors`` (fp32/fp16/bf16), fp32 when they are mixed; TypeError otherwise."""
    dtypes = set()
    for i, t in enumerate(tensors):
        if t.dtype not in _FLOATS:
            raise TypeError(f"{what} {i} has dtype {t.dtype}; the Triton kernels take "
                            f"float32, float16 or bfloat16")
        dtypes.add(t.dtype)
    if len(dtypes) == 1:
        return dtypes.pop()
    return torch.float32


def common_dtype(tensors: Sequence[torch.Tensor], what: str) -> tuple[list[torch.Tensor], torch.dtype]:
    """``tensors`` in one dtype (the factors are small; mixed lists are upcast to fp32)."""
    dt = factor_dtype(tensors, what)
    return [t if t.dtype == dt else t.to(dt) for t in tensors], dt


def tall_table(layers: Sequence[Sequence[torch.Tensor]], side: str, device: torch.device) -> torch.Tensor:
    """int64 ``[L*K, 4]`` table of ``(data_ptr, stride_row, stride_col, t)`` of each factor's tall view.

    ``layers[l][k]`` is client k's factor in layer l (``m x t`` for left, ``t x n`` for right)."""
    rows = []
    for fs in layers:
        for f in fs:
            if side == "left":
                rows.append((f.data_ptr(), f.stride(0), f.stride(1), f.shape[1]))
            else:
                rows.append((f.data_ptr(), f.stride(1), f.stride(0), f.shape[0]))
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 4).to(device)


def client_offsets(widths: Sequence[int], device: torch.device) -> torch.Tensor:
    """int64 ``[K]``: client k's first column in the stacked index space (exclusive prefix sum)."""
    offs, o = [], 0
    for w in widths:
        offs.append(o)
        o += int(w)
    return torch.tensor(offs, dtype=torch.int64).to(device)


def chunk_table(widths: Sequence[int], block_t: int, device: torch.device) -> torch.Tensor:
    """int64 ``[C, 4]``: ``(client, first column in the client, width <= block_t, stacked offset)``.

    Clients of width 0 contribute no chunk; a client wider than ``block_t`` gives several."""
    rows, o = [], 0
    for k, w in enumerate(widths):
        for s in range(0, int(w), block_t):
            rows.append((k, s, min(block_t, int(w) - s), o + s))
        o += int(w)
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 4).to(device)


def pair_table(num_chunks: int, device: torch.device) -> torch.Tensor:
    """int64 ``[P, 2]``: the chunk pairs ``a <= b`` (each symmetric Gram block computed once)."""
    rows = [(a, b) for a in range(num_chunks) for b in range(a, num_chunks)]
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 2).to(device)


@dataclass(frozen=True)
class GpuArch:
    """What the config chooser needs to know about a GPU: its compiler target and its limits.

    ``arch`` is the compute capability as ``major * 10 + minor`` on NVIDIA (90 for H100) or the
    gfx name on AMD (``"gfx942"`` for MI300X); ``shared_bytes`` is the most shared memory (LDS on
    AMD) one program may use, the opt-in maximum per block."""

    backend: str  # "cuda" or "hip" (Triton's GPUTarget backend names)
    arch: int | str
    warp_size: int
    shared_bytes: int
    num_sms: int  # multiprocessors (NVIDIA) / compute units (AMD)
    name: str = ""

    @property
    def label(self) -> str:
        return f"sm_{self.arch}" if self.backend == "cuda" else str(self.arch)


_KIB = 1024
#: max shared memory per block (opt-in), bytes, by NVIDIA compute capability (CUDA C++
#: Programming Guide, "Technical Specifications per Compute Capability").
_CUDA_SHARED = MappingProxyType({70: 96 * _KIB, 72: 48 * _KIB, 75: 64 * _KIB, 80: 163 * _KIB, 86: 99 * _KIB,
                87: 163 * _KIB, 89: 99 * _KIB, 90: 227 * _KIB, 100: 227 * _KIB, 103: 227 * _KIB,
                120: 99 * _KIB})
#: LDS per workgroup on AMD CDNA (64 KiB on gfx90a/gfx942; 160 KiB on gfx950).
_HIP_SHARED = MappingProxyType({"gfx90a": 64 * _KIB, "gfx942": 64 * _KIB, "gfx950": 160 * _KIB})

#: The GPUs the kernels are compiled for ahead of time (tests/test_kernels_compile.py).
GPU_TARGETS: tuple[GpuArch, ...] = (
    GpuArch("cuda", 80, 32, _CUDA_SHARED[80], 108, "A100"),
    GpuArch("cuda", 90, 32, _CUDA_SHARED[90], 132, "H100/H200"),
    GpuArch("cuda", 100, 32, _CUDA_SHARED[100], 148, "B200"),
    GpuArch("hip", "gfx942", 64, _HIP_SHARED["gfx942"], 304, "MI300X"),
)


def arch_of(device: torch.device | str) -> GpuArch:
    """The :class:`GpuArch` of a CUDA (or ROCm) device, read from ``torch.cuda``."""
    dev = torch.device(device)
    props = torch.cuda.get_device_properties(dev)
    sms = props.multi_processor_count
    if getattr(torch.version, "hip", None):
        gfx = str(getattr(props, "gcnArchName", "gfx942")).split(":")[0]
        warp = int(getattr(props, "warp_size", 64) or 64)
        return GpuArch("hip", gfx, warp, _HIP_SHARED.get(gfx, 64 * _KIB), sms, props.name)
    cc = props.major * 10 + props.minor
    optin = getattr(props, "shared_memory_per_block_optin", None)
    shared = int(optin) if optin else _CUDA_SHARED.get(cc, 48 * _KIB)
    return GpuArch("cuda", cc, 32, shared, sms, props.name)


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch settings (GPU or interpreter).

    ``num_warps``/``num_stages`` launch the kernels with one output tile per program
    (``lowrank_accumulate_``, the expand product); ``reduce_warps``/``reduce_stages`` the kernels
    that walk a long reduction over rows into a small tile (the Gram, the shrink product)."""

    block_m: int
    block_n: int
    block_t: int
    block_r: int
    block_l: int
    num_warps: int
    num_stages: int
    target_programs: int  # split long reductions until about this many programs run
    reduce_warps: int = 4
    reduce_stages: int = 1


def stage_bytes(cfg: KernelConfig, elem: int) -> tuple[int, int]:
    """Shared memory one pipeline stage buffers, ``(tile kernels, reduce kernels)``, for ``elem``-byte operands.

    Tile kernels stage a ``block_m x block_t`` and a ``block_t x block_n`` tile; reduce kernels a
    ``block_r x block_t`` tile and a ``block_r x max(block_t, block_l)`` tile (Gram: two
    ``block_t``-wide tiles; shrink: ``block_t`` and ``block_l``, ``mat`` always fp32)."""
    tile = (cfg.block_m * cfg.block_t + cfg.block_t * cfg.block_n) * elem
    red = (cfg.block_r * cfg.block_t + cfg.block_r * max(cfg.block_t, cfg.block_l)) * 4
    return tile, red


def _fit_stages(want: int, per_stage: int, budget: int) -> int:
    """The most pipeline stages (at most ``want``, at least 1) whose buffers fit ``budget``."""
    return max(1, min(want, budget // max(per_stage, 1)))


@dataclass(frozen=True)
class TilePolicy:
    """The GPU tile choices :func:`config_for` turns into a :class:`KernelConfig` for one target.

    Why these: 256 threads per program on every target (8 warps of 32 on NVIDIA, 4 wavefronts of 64
    on AMD), so registers per thread stay the same. bf16/fp16 operands take 128 x 128 output tiles
    with 32-wide reduction steps; fp32 operands 64 x 128 with 16-wide steps, because the 128 x 128 x 32
    fp32 tile needs more than the 255 registers an NVIDIA thread has and ptxas spills it (IEEE fp32
    and TF32 alike). The reduce kernels (Gram, shrink) walk rows 64 at a time (128 rows of fp32 spill
    on sm_80). Pipeline depth: 3 on NVIDIA, 2 on AMD (Triton's HIP default: its stream pipeliner
    needs no more to hide global loads), fewer when the target's shared memory cannot hold them.
    tests/test_kernels_compile.py checks each resulting config on every target in
    :data:`GPU_TARGETS` (shared memory, registers, spills as the targets' own assemblers report)."""

    threads: int = 256
    half_tile: tuple[int, int, int] = (128, 128, 32)  # block_m, block_n, block_t for bf16/fp16 operands
    fp32_tile: tuple[int, int, int] = (64, 128, 16)   # the same for fp32 operands
    block_r: int = 64
    block_l: int = 64
    cuda_stages: int = 3
    hip_stages: int = 2
    programs_per_sm: int = 4  # target_programs = this x multiprocessors (compute units)


def config_for(device: torch.device | GpuArch, operands: torch.dtype = torch.float32,
               policy: TilePolicy = TilePolicy()) -> KernelConfig:
    """The launch config for ``device`` (a torch device or a :class:`GpuArch`) and the dtype of the
    operands ``tl.dot`` will see (``operands``: fp32, or the bf16/fp16 of the factors).

    Small tiles in the interpreter (so tests cross tile edges on tiny shapes), whatever the dtype.
    On a GPU, :class:`TilePolicy` for the target: warps from its warp size, tiles from the operand
    dtype, pipeline stages as many as its per-block shared memory (LDS) holds (at most the
    policy's depth for the vendor), ``target_programs`` from its multiprocessor count."""
    if isinstance(device, GpuArch):
        arch = device
    else:
        device = torch.device(device)
        if device.type != "cuda" or interpret_mode():
            return KernelConfig(block_m=32, block_n=32, block_t=16, block_r=32, block_l=16,
                                num_warps=4, num_stages=1, target_programs=8)
        arch = arch_of(device)
    warps = max(1, policy.threads // arch.warp_size)
    wide = operands == torch.float32
    bm, bn, bt = policy.fp32_tile if wide else policy.half_tile
    base = KernelConfig(block_m=bm, block_n=bn, block_t=bt, block_r=policy.block_r, block_l=policy.block_l,
                        num_warps=warps, num_stages=1, target_programs=policy.programs_per_sm * arch.num_sms,
                        reduce_warps=warps, reduce_stages=1)
    depth = policy.cuda_stages if arch.backend == "cuda" else policy.hip_stages
    tile, red = stage_bytes(base, 4 if wide else 2)
    return replace(base, num_stages=_fit_stages(depth, tile, arch.shared_bytes),
                   reduce_stages=_fit_stages(depth, red, arch.shared_bytes))


@dataclass(frozen=True)
class Launch:
    """One kernel launch, planned: what ``kernel[grid](*args, **constexprs, num_warps=…, num_stages=…)`` gets.

    The launchers build it with their ``plan_*`` function and run it; the ahead-of-time compile
    check (:mod:`._compile`) builds it with the same function and compiles it for a named GPU
    instead, so the kernel signatures it compiles are the launchers' own."""

    kernel: object  # a triton JITFunction
    config: KernelConfig  # the config it was planned with (grid and constexprs already follow it)
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict
    num_warps: int
    num_stages: int
    keep: tuple = ()  # tensors the table's raw pointers point into (upcast copies): alive until launched

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps,
                               num_stages=self.num_stages)
