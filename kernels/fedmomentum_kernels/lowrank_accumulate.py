"""Fused in-place low-rank accumulation: ``out += Σ_i c_i · L_i @ R_i`` (Triton).

Layout: :func:`_lowrank_accumulate_kernel` (the ``@triton.jit`` body) → :func:`launch_lowrank_accumulate`
(:func:`plan_lowrank_accumulate`: grid, strides, dtype/shape checks; then the launch) →
:func:`lowrank_accumulate_` (what
``fedmomentum_kernels.lowrank_accumulate_`` calls on the Triton backend). The torch reference
(CPU fallback and test oracle) is :func:`fedmomentum_kernels.reference.lowrank_accumulate_`.

Each program owns one ``BLOCK_M x BLOCK_N`` tile of ``out``. It walks the factor table
(``L_i`` pointer/strides, ``R_i`` pointer/strides, ``t_i``; no ``torch.cat``), accumulates
``Σ_i c_i L_i[tile, :] @ R_i[:, tile]`` in fp32 registers (``t_i`` is padded with masked
zeros to multiples of ``BLOCK_T >= 16`` for ``tl.dot``), then reads its ``out`` tile once,
adds, and writes it once. ``out`` is touched exactly twice per element, which makes the
kernel bandwidth-bound whenever ``Σ t_i`` is small next to the tile size.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ._tables import GpuArch, Launch, common_dtype, config_for, input_precision, needs_f32_dot

__all__ = ["lowrank_accumulate_", "launch_lowrank_accumulate", "plan_lowrank_accumulate"]

_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _lowrank_accumulate_kernel(
    out_ptr, tab_ptr, coef_ptr, l0_ptr, r0_ptr,
    num_factors, M, N, stride_om, stride_on,
    CAST_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """``out[tile] += Σ_i coef[i] · L_i[tile_m, :] @ R_i[:, tile_n]``.

    ``tab`` rows: ``(L ptr, L stride_m, L stride_t, R ptr, R stride_t, R stride_n, t)``;
    ``l0_ptr``/``r0_ptr`` only carry the element types of the L and R pointers."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, BLOCK_T)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(num_factors):
        row = tab_ptr + i * 7
        lp = tl.load(row + 0).to(tl.pointer_type(l0_ptr.dtype.element_ty))
        ls_m = tl.load(row + 1)
        ls_t = tl.load(row + 2)
        rp = tl.load(row + 3).to(tl.pointer_type(r0_ptr.dtype.element_ty))
        rs_t = tl.load(row + 4)
        rs_n = tl.load(row + 5)
        t = tl.load(row + 6)
        c = tl.load(coef_ptr + i)
        part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for t0 in range(0, t, BLOCK_T):
            tt = t0 + offs_t
            mask_t = tt < t
            lt = tl.load(lp + offs_m[:, None] * ls_m + tt[None, :] * ls_t,
                         mask=mask_m[:, None] & mask_t[None, :], other=0.0)
            rt = tl.load(rp + tt[:, None] * rs_t + offs_n[None, :] * rs_n,
                         mask=mask_t[:, None] & mask_n[None, :], other=0.0)
            if CAST_F32:
                # fp32 operands: c folds into the left tile, one accumulator (half the registers)
                acc = tl.dot(lt.to(tl.float32) * c, rt.to(tl.float32), acc, input_precision=INPUT_PRECISION)
            else:
                # bf16/fp16 operands stay exact on the tensor cores; c is applied in fp32 after
                part = tl.dot(lt, rt, part, input_precision=INPUT_PRECISION)
        if not CAST_F32:
            acc += c * part
    optrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    omask = mask_m[:, None] & mask_n[None, :]
    old = tl.load(optrs, mask=omask, other=0.0).to(tl.float32)
    tl.store(optrs, (old + acc).to(out_ptr.dtype.element_ty), mask=omask)


def plan_lowrank_accumulate(out: torch.Tensor, lefts: Sequence[torch.Tensor], rights: Sequence[torch.Tensor],
                            coeffs: Sequence[float], target: torch.device | GpuArch, precision: str) -> Launch | None:
    """Check dtypes, build the factor table and grid; the :class:`Launch` (None: nothing to add).

    ``target`` is what :func:`._tables.config_for` chooses the tiles for (``out.device``, or a
    named GPU when compiling ahead of time), given the operands' dtype.
    ``out`` must be fp32/fp16/bf16 (fp64 is served by the torch reference in the dispatcher).
    Mixed-dtype factor lists, and lefts and rights of different dtypes, are upcast to fp32 (a copy
    of the small factors, never of ``out``).
    ``precision`` is ``tl.dot``'s for fp32 operands; bf16/fp16 operands get ``"ieee"`` (ignored by
    ``tl.dot`` for them), so one kernel variant serves both settings."""
    if out.dtype not in _OUT_DTYPES:
        raise TypeError(f"out has dtype {out.dtype}; the Triton kernel takes float32, float16 or bfloat16")
    m, n = out.shape
    keep = [i for i in range(len(lefts)) if lefts[i].shape[1] > 0 and float(coeffs[i]) != 0.0]
    if not keep or m == 0 or n == 0:
        return None
    ls, _ = common_dtype([lefts[i] for i in keep], "left factor")
    rs, _ = common_dtype([rights[i] for i in keep], "right factor")
    if ls[0].dtype != rs[0].dtype:
        # fp16 lefts with bf16 rights (or any pair of different dtypes): both sides in fp32, so one
        # kernel variant per (out dtype, operand dtype) exists; a copy of the small factors only.
        ls = [x.to(torch.float32) for x in ls]
        rs = [x.to(torch.float32) for x in rs]
    cast = ls[0].dtype == torch.float32 or needs_f32_dot(ls[0].dtype)
    cfg = config_for(target, torch.float32 if cast else ls[0].dtype)
    dev = out.device
    tab = torch.tensor([(l.data_ptr(), l.stride(0), l.stride(1), r.data_ptr(), r.stride(0), r.stride(1),
                         l.shape[1]) for l, r in zip(ls, rs)], dtype=torch.int64).to(dev)
    coef = torch.tensor([float(coeffs[i]) for i in keep], dtype=torch.float32).to(dev)
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n))
    return Launch(_lowrank_accumulate_kernel, cfg, grid,
                  (out, tab, coef, ls[0], rs[0], len(ls), m, n, out.stride(0), out.stride(1)),
                  dict(CAST_F32=cast, INPUT_PRECISION=precision if cast else "ieee",
                       BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_T=cfg.block_t),
                  cfg.num_warps, cfg.num_stages, keep=(ls, rs))


def launch_lowrank_accumulate(out: torch.Tensor, lefts: Sequence[torch.Tensor],
                              rights: Sequence[torch.Tensor], coeffs: Sequence[float]) -> torch.Tensor:
    """Plan (:func:`plan_lowrank_accumulate`) with this device's config and launch: one program per tile."""
    dev = out.device
    launch = plan_lowrank_accumulate(out, lefts, rights, coeffs, dev, input_precision(dev))
    if launch is not None:
        launch()
    return out


def lowrank_accumulate_(out: torch.Tensor, lefts: Sequence[torch.Tensor],
                        rights: Sequence[torch.Tensor], coeffs: Sequence[float]) -> torch.Tensor:
    """In place ``out += Σ_i coeffs[i] · lefts[i] @ rights[i]`` (fp32 accumulation); returns ``out``.

    Arguments are those of :func:`fedmomentum_kernels.lowrank_accumulate_` (already checked
    there); ``lefts[i]`` is ``m x t_i``, ``rights[i]`` is ``t_i x n``, ``t_i`` may differ or be 0."""
    return launch_lowrank_accumulate(out, lefts, rights, coeffs)
