"""Products with the weighted stacked factors, read through pointer tables (Triton).

``stacked_matmul`` (``X_cat @ mat``) and ``stacked_matmul_t`` (``X_catᵀ @ mat``) on either side
are, on the *tall view* ``Tall_k`` of each client factor (``rows x t_k``; see :mod:`._tables`),
one of two kernels:

* *expand* (:func:`_stacked_expand_kernel`): ``out (rows x l) = Σ_k c_k Tall_k @ mat[off_k:off_k+t_k]``
  — the sketch ``B_cat (A_cat Ω)``'s outer product (left ``X_cat @ mat``; right ``X_catᵀ @ mat``).
  One program per ``out`` tile, short reduction over the stacked width.
* *shrink* (:func:`_stacked_shrink_kernel`): ``out[off_a + chunk] (t x l) = c_a Tall_a[:, chunk]ᵀ @ mat``
  — ``A_cat Ω`` and ``B_catᵀ Y`` (right ``X_cat @ mat``; left ``X_catᵀ @ mat``). One program per
  (chunk of one client's columns, column tile of ``mat``, layer, row slice); the long reduction
  over rows is split into slices whose fp32 partials are summed afterwards.

Layout per kernel: ``_name_kernel`` (``@triton.jit``) → ``launch_*`` (``plan_*``: grid, tables,
checks; then the launch)
→ the functions ``fedmomentum_kernels`` calls (:func:`stacked_matmul`, :func:`stacked_matmul_t`,
and their ``batched_*`` forms, whose grid carries the layer index). ``mat`` is used in fp32; the
factors are read in their own dtype and multiplied in fp32. Torch references:
:mod:`fedmomentum_kernels.reference`.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ._tables import (GpuArch, Launch, chunk_table, client_offsets, common_dtype, config_for, input_precision,
                      tall_table)
from .gram import _splits

__all__ = ["stacked_matmul", "stacked_matmul_t", "batched_stacked_matmul", "batched_stacked_matmul_t",
           "launch_stacked_expand", "launch_stacked_shrink", "plan_stacked_expand", "plan_stacked_shrink"]


@triton.jit
def _stacked_expand_kernel(
    out_ptr, tab_ptr, coef_ptr, off_ptr, mat_ptr, f0_ptr,
    num_clients, rows, ncols, n_tiles_c,
    stride_ol, stride_or, stride_oc, stride_ml, stride_mt, stride_mc,
    CAST_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """``out[l, tile] = Σ_k c_k Tall_k[tile_r, :] @ mat[l, off_k:off_k+t_k, tile_c]``."""
    pid = tl.program_id(0)
    layer = tl.program_id(1)
    pid_r = pid // n_tiles_c
    pid_c = pid % n_tiles_c
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = pid_c * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_t = tl.arange(0, BLOCK_T)
    mask_r = offs_r < rows
    mask_c = offs_c < ncols
    mbase = mat_ptr + layer * stride_ml
    acc = tl.zeros((BLOCK_R, BLOCK_L), dtype=tl.float32)
    for k in range(num_clients):
        row = tab_ptr + (layer * num_clients + k) * 4
        p = tl.load(row).to(tl.pointer_type(f0_ptr.dtype.element_ty))
        sr = tl.load(row + 1)
        sc = tl.load(row + 2)
        t = tl.load(row + 3)
        c = tl.load(coef_ptr + layer * num_clients + k)
        off = tl.load(off_ptr + k)
        for t0 in range(0, t, BLOCK_T):
            tt = t0 + offs_t
            mask_t = tt < t
            x = tl.load(p + offs_r[:, None] * sr + tt[None, :] * sc,
                        mask=mask_r[:, None] & mask_t[None, :], other=0.0)
            y = tl.load(mbase + (off + tt)[:, None] * stride_mt + offs_c[None, :] * stride_mc,
                        mask=mask_t[:, None] & mask_c[None, :], other=0.0)
            if CAST_F32:
                x = x.to(tl.float32)
            # c folds into the fp32 factor tile: one accumulator for all clients
            acc = tl.dot(x * c, y, acc, input_precision=INPUT_PRECISION)
    tl.store(out_ptr + layer * stride_ol + offs_r[:, None] * stride_or + offs_c[None, :] * stride_oc,
             acc, mask=mask_r[:, None] & mask_c[None, :])


@triton.jit
def _stacked_shrink_kernel(
    out_ptr, tab_ptr, coef_ptr, chunk_ptr, mat_ptr, f0_ptr,
    num_clients, rows, rows_per_split, ncols, n_tiles_c,
    stride_os, stride_ol, stride_ot, stride_oc, stride_ml, stride_mr, stride_mc,
    CAST_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """``out[s, l, o_a + j, tile_c] = c_a Σ_{rows in slice s} Tall_a[r, s_a + j] mat[l, r, tile_c]``."""
    pid = tl.program_id(0)
    layer = tl.program_id(1)
    split = tl.program_id(2)
    a = pid // n_tiles_c
    pid_c = pid % n_tiles_c
    ka = tl.load(chunk_ptr + a * 4)
    sa = tl.load(chunk_ptr + a * 4 + 1)
    wa = tl.load(chunk_ptr + a * 4 + 2)
    oa = tl.load(chunk_ptr + a * 4 + 3)
    row = tab_ptr + (layer * num_clients + ka) * 4
    p = tl.load(row).to(tl.pointer_type(f0_ptr.dtype.element_ty))
    sr = tl.load(row + 1)
    sc = tl.load(row + 2)
    c = tl.load(coef_ptr + layer * num_clients + ka)
    offs_t = tl.arange(0, BLOCK_T)
    offs_r = tl.arange(0, BLOCK_R)
    offs_c = pid_c * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_t = offs_t < wa
    mask_c = offs_c < ncols
    mbase = mat_ptr + layer * stride_ml
    r_lo = split * rows_per_split
    r_hi = tl.minimum(rows, r_lo + rows_per_split)
    acc = tl.zeros((BLOCK_T, BLOCK_L), dtype=tl.float32)
    for r0 in range(r_lo, r_hi, BLOCK_R):
        rr = r0 + offs_r
        mask_r = rr < r_hi
        x = tl.load(p + rr[:, None] * sr + (sa + offs_t)[None, :] * sc,
                    mask=mask_r[:, None] & mask_t[None, :], other=0.0)
        y = tl.load(mbase + rr[:, None] * stride_mr + offs_c[None, :] * stride_mc,
                    mask=mask_r[:, None] & mask_c[None, :], other=0.0)
        if CAST_F32:
            x = x.to(tl.float32)
        acc = tl.dot(tl.trans(x), y, acc, input_precision=INPUT_PRECISION)
    acc = acc * c
    tl.store(out_ptr + split * stride_os + layer * stride_ol + (oa + offs_t)[:, None] * stride_ot
             + offs_c[None, :] * stride_oc, acc, mask=mask_t[:, None] & mask_c[None, :])


def _prepare(layers, side: str):
    """Factors in one dtype, regrouped per layer; (layers, K, widths, rows, T)."""
    flat, _ = common_dtype([f for fs in layers for f in fs], f"{side} factor")
    K = len(layers[0])
    layers = [flat[i * K:(i + 1) * K] for i in range(len(layers))]
    widths = [f.shape[1] if side == "left" else f.shape[0] for f in layers[0]]
    rows = layers[0][0].shape[0] if side == "left" else layers[0][0].shape[1]
    return layers, K, widths, rows, sum(widths)


def _coef_table(coeffs, device) -> torch.Tensor:
    return torch.tensor([[float(c) for c in cs] for cs in coeffs], dtype=torch.float32).reshape(-1).to(device)


def plan_stacked_expand(layers: Sequence[Sequence[torch.Tensor]], coeffs: Sequence[Sequence[float]], side: str,
                        mats: torch.Tensor, target: torch.device | GpuArch,
                        precision: str) -> tuple[torch.Tensor, Launch | None]:
    """``(out, launch)`` for :func:`launch_stacked_expand` (launch None: ``out`` is already final)."""
    layers, K, widths, rows, T = _prepare(layers, side)
    L, ncols = len(layers), mats.shape[2]
    dev = mats.device
    out = torch.empty(L, rows, ncols, dtype=torch.float32, device=dev)
    if rows == 0 or ncols == 0:
        return out, None
    if T == 0:
        return out.zero_(), None
    cfg = config_for(target, torch.float32)  # the factor tile is used in fp32 (mats is fp32)
    tab = tall_table(layers, side, dev)
    offs = client_offsets(widths, dev)
    n_tiles_c = triton.cdiv(ncols, cfg.block_l)
    grid = (triton.cdiv(rows, cfg.block_m) * n_tiles_c, L)
    f0 = layers[0][0]
    launch = Launch(_stacked_expand_kernel, cfg, grid,
                    (out, tab, _coef_table(coeffs, dev), offs, mats, f0, K, rows, ncols, n_tiles_c,
                     out.stride(0), out.stride(1), out.stride(2), mats.stride(0), mats.stride(1), mats.stride(2)),
                    dict(CAST_F32=f0.dtype != torch.float32, INPUT_PRECISION=precision,
                         BLOCK_R=cfg.block_m, BLOCK_L=cfg.block_l, BLOCK_T=cfg.block_t),
                    cfg.num_warps, cfg.num_stages, keep=(layers,))
    return out, launch


def launch_stacked_expand(layers: Sequence[Sequence[torch.Tensor]], coeffs: Sequence[Sequence[float]],
                          side: str, mats: torch.Tensor) -> torch.Tensor:
    """``out[l] = Σ_k c_k Tall_k @ mats[l, off_k:off_k+t_k]``: L x rows x ncols fp32, one launch.

    ``mats`` is an L x T x ncols fp32 tensor (any strides)."""
    dev = mats.device
    out, launch = plan_stacked_expand(layers, coeffs, side, mats, dev, input_precision(dev))
    if launch is not None:
        launch()
    return out


def plan_stacked_shrink(layers: Sequence[Sequence[torch.Tensor]], coeffs: Sequence[Sequence[float]], side: str,
                        mats: torch.Tensor, target: torch.device | GpuArch, precision: str,
                        splits: int | None = None) -> tuple[torch.Tensor, Launch | None]:
    """``(partials, launch)`` for :func:`launch_stacked_shrink`: the S x L x T x ncols fp32 buffer
    the launch fills (zeros, S = 1, when there is nothing to launch) and the launch (None then)."""
    layers, K, widths, rows, T = _prepare(layers, side)
    L, ncols = len(layers), mats.shape[2]
    dev = mats.device
    cfg = config_for(target, torch.float32)  # the factor tile is used in fp32 (mats is fp32)
    chunks = chunk_table(widths, cfg.block_t, dev)
    C = chunks.shape[0]
    if C == 0 or ncols == 0 or rows == 0:
        return torch.zeros(1, L, T, ncols, dtype=torch.float32, device=dev), None
    n_tiles_c = triton.cdiv(ncols, cfg.block_l)
    if splits is None:
        S, per = _splits(rows, C * n_tiles_c * L, cfg.block_r, cfg.target_programs)
    else:
        per = -(-rows // max(1, splits))
        S = -(-rows // per)
    out = torch.zeros(S, L, T, ncols, dtype=torch.float32, device=dev)
    tab = tall_table(layers, side, dev)
    f0 = layers[0][0]
    launch = Launch(_stacked_shrink_kernel, cfg, (C * n_tiles_c, L, S),
                    (out, tab, _coef_table(coeffs, dev), chunks, mats, f0, K, rows, per, ncols, n_tiles_c,
                     out.stride(0), out.stride(1), out.stride(2), out.stride(3),
                     mats.stride(0), mats.stride(1), mats.stride(2)),
                    dict(CAST_F32=f0.dtype != torch.float32, INPUT_PRECISION=precision,
                         BLOCK_R=cfg.block_r, BLOCK_L=cfg.block_l, BLOCK_T=cfg.block_t),
                    cfg.reduce_warps, cfg.reduce_stages, keep=(layers,))
    return out, launch


def launch_stacked_shrink(layers: Sequence[Sequence[torch.Tensor]], coeffs: Sequence[Sequence[float]],
                          side: str, mats: torch.Tensor, splits: int | None = None) -> torch.Tensor:
    """``out[l, off_a + chunk] = c_a Tall_a[:, chunk]ᵀ @ mats[l]``: L x T x ncols fp32, one launch.

    ``mats`` is an L x rows x ncols fp32 tensor. ``splits`` forces the number of row slices (tests)."""
    dev = mats.device
    out, launch = plan_stacked_shrink(layers, coeffs, side, mats, dev, input_precision(dev), splits)
    if launch is not None:
        launch()
    return out[0] if out.shape[0] == 1 else out.sum(dim=0)


def _as_mats(mats: torch.Tensor) -> torch.Tensor:
    return mats if mats.dtype == torch.float32 else mats.to(torch.float32)


def batched_stacked_matmul(factors: Sequence[Sequence[torch.Tensor]], coeffs: Sequence[Sequence[float]],
                           side: str, mats: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """L x ... : ``X_cat[l] @ mats[l]`` (left: expand over m; right: shrink over n)."""
    mats = _as_mats(mats)
    if side == "left":
        return launch_stacked_expand(factors, coeffs, "left", mats).to(dtype)
    return launch_stacked_shrink(factors, coeffs, "right", mats).to(dtype)


def batched_stacked_matmul_t(factors: Sequence[Sequence[torch.Tensor]], coeffs: Sequence[Sequence[float]],
                             side: str, mats: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """L x ... : ``X_cat[l]ᵀ @ mats[l]`` (left: shrink over m; right: expand over n)."""
    mats = _as_mats(mats)
    if side == "left":
        return launch_stacked_shrink(factors, coeffs, "left", mats).to(dtype)
    return launch_stacked_expand(factors, coeffs, "right", mats).to(dtype)


def stacked_matmul(factors: Sequence[torch.Tensor], coeffs: Sequence[float], side: str,
                   mat: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``X_cat @ mat``: left m x T · T x l -> m x l; right T x n · n x l -> T x l."""
    return batched_stacked_matmul([list(factors)], [list(coeffs)], side, mat[None], dtype)[0]


def stacked_matmul_t(factors: Sequence[torch.Tensor], coeffs: Sequence[float], side: str,
                     mat: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``X_catᵀ @ mat``: left T x m · m x l -> T x l; right n x T · T x l -> n x l."""
    return batched_stacked_matmul_t([list(factors)], [list(coeffs)], side, mat[None], dtype)[0]
