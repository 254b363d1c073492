"""Gram of the weighted stacked factors, ``B_catᵀ B_cat`` or ``A_cat A_catᵀ`` (Triton).

Layout: :func:`_stacked_gram_kernel` (``@triton.jit``) → :func:`launch_stacked_gram`
(:func:`plan_stacked_gram`: grid, tables, split of the long reduction; then the launch) →
:func:`stacked_gram` / :func:`batched_stacked_gram` (what ``fedmomentum_kernels`` calls on the Triton backend). Torch reference:
:func:`fedmomentum_kernels.reference.stacked_gram`.

Both sides are the same computation on the *tall view* (``rows x t_k``; see
:mod:`._tables`): ``G[a, b] = c_a c_b · Tall_aᵀ Tall_b``. The stacked columns are cut into
chunks of at most ``BLOCK_T`` columns of one client; one program computes one chunk pair
``a <= b`` (so each symmetric block is computed once) over one slice of the rows, for one
layer of the batch (``program_id(1)``), and stores the block and, off the diagonal, its
transpose. Row slices (``program_id(2)``) write separate fp32 partial Grams that are summed
afterwards (deterministic; no atomics). Accumulation is fp32 in registers.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ._tables import (GpuArch, Launch, chunk_table, common_dtype, config_for, input_precision,
                      needs_f32_dot, pair_table, tall_table)

__all__ = ["stacked_gram", "batched_stacked_gram", "launch_stacked_gram", "plan_stacked_gram"]


@triton.jit
def _stacked_gram_kernel(
    g_ptr, tab_ptr, coef_ptr, chunk_ptr, pair_ptr, f0_ptr,
    num_clients, rows, rows_per_split,
    stride_gs, stride_gl, stride_gi, stride_gj,
    CAST_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One (chunk pair, layer, row slice): ``G[s, l, oa:oa+wa, ob:ob+wb] = c_a c_b Xaᵀ Xb``."""
    pid_p = tl.program_id(0)
    layer = tl.program_id(1)
    split = tl.program_id(2)
    a = tl.load(pair_ptr + pid_p * 2)
    b = tl.load(pair_ptr + pid_p * 2 + 1)
    ka = tl.load(chunk_ptr + a * 4)
    sa = tl.load(chunk_ptr + a * 4 + 1)
    wa = tl.load(chunk_ptr + a * 4 + 2)
    oa = tl.load(chunk_ptr + a * 4 + 3)
    kb = tl.load(chunk_ptr + b * 4)
    sb = tl.load(chunk_ptr + b * 4 + 1)
    wb = tl.load(chunk_ptr + b * 4 + 2)
    ob = tl.load(chunk_ptr + b * 4 + 3)
    ra = tab_ptr + (layer * num_clients + ka) * 4
    rb = tab_ptr + (layer * num_clients + kb) * 4
    pa = tl.load(ra).to(tl.pointer_type(f0_ptr.dtype.element_ty))
    sra = tl.load(ra + 1)
    sca = tl.load(ra + 2)
    pb = tl.load(rb).to(tl.pointer_type(f0_ptr.dtype.element_ty))
    srb = tl.load(rb + 1)
    scb = tl.load(rb + 2)
    ca = tl.load(coef_ptr + layer * num_clients + ka)
    cb = tl.load(coef_ptr + layer * num_clients + kb)

    offs_t = tl.arange(0, BLOCK_T)
    offs_r = tl.arange(0, BLOCK_R)
    mask_a = offs_t < wa
    mask_b = offs_t < wb
    r_lo = split * rows_per_split
    r_hi = tl.minimum(rows, r_lo + rows_per_split)
    acc = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    for r0 in range(r_lo, r_hi, BLOCK_R):
        rr = r0 + offs_r
        mask_r = rr < r_hi
        xa = tl.load(pa + rr[:, None] * sra + (sa + offs_t)[None, :] * sca,
                     mask=mask_r[:, None] & mask_a[None, :], other=0.0)
        xb = tl.load(pb + rr[:, None] * srb + (sb + offs_t)[None, :] * scb,
                     mask=mask_r[:, None] & mask_b[None, :], other=0.0)
        if CAST_F32:
            xa = xa.to(tl.float32)
            xb = xb.to(tl.float32)
        acc = tl.dot(tl.trans(xa), xb, acc, input_precision=INPUT_PRECISION)
    acc = acc * (ca * cb)
    base = g_ptr + split * stride_gs + layer * stride_gl
    omask = mask_a[:, None] & mask_b[None, :]
    tl.store(base + (oa + offs_t)[:, None] * stride_gi + (ob + offs_t)[None, :] * stride_gj, acc, mask=omask)
    if a != b:
        tl.store(base + (ob + offs_t)[None, :] * stride_gi + (oa + offs_t)[:, None] * stride_gj, acc,
                 mask=omask)


def _splits(rows: int, programs: int, block_r: int, target: int) -> tuple[int, int]:
    """(number of row slices, rows per slice): enough slices to reach ``target`` programs."""
    if rows == 0:
        return 1, 1
    want = max(1, -(-target // max(programs, 1)))
    most = -(-rows // block_r)
    s = max(1, min(want, most))
    per = -(-rows // s)
    per = -(-per // block_r) * block_r
    return -(-rows // per), per


def plan_stacked_gram(layers: Sequence[Sequence[torch.Tensor]], coeffs: Sequence[Sequence[float]], side: str,
                      target: torch.device | GpuArch, precision: str,
                      splits: int | None = None) -> tuple[torch.Tensor, Launch | None]:
    """``(partials, launch)``: the S x L x T x T fp32 buffer the launch fills (zeros, S = 1, when
    there is nothing to launch) and the :class:`Launch` (None then). ``precision`` is ``tl.dot``'s
    for fp32 factors (bf16/fp16 factors get ``"ieee"``, which ``tl.dot`` ignores for them)."""
    dev = layers[0][0].device
    flat, _ = common_dtype([f for fs in layers for f in fs], f"{side} factor")
    K = len(layers[0])
    layers = [flat[i * K:(i + 1) * K] for i in range(len(layers))]
    L = len(layers)
    widths = [f.shape[1] if side == "left" else f.shape[0] for f in layers[0]]
    rows = layers[0][0].shape[0] if side == "left" else layers[0][0].shape[1]
    T = sum(widths)
    # One dtype on both sides of every tl.dot (fp32, or bf16/fp16 with fp32 accumulation).
    cast = needs_f32_dot(flat[0].dtype)
    fp32_dot = cast or flat[0].dtype == torch.float32
    cfg = config_for(target, torch.float32 if fp32_dot else flat[0].dtype)
    chunks = chunk_table(widths, cfg.block_t, dev)
    C = chunks.shape[0]
    if C == 0 or rows == 0:
        return torch.zeros(1, L, T, T, dtype=torch.float32, device=dev), None
    pairs = pair_table(C, dev)
    P = pairs.shape[0]
    if splits is None:
        S, per = _splits(rows, P * L, cfg.block_r, cfg.target_programs)
    else:
        per = -(-rows // max(1, splits))
        S = -(-rows // per)
    g = torch.zeros(S, L, T, T, dtype=torch.float32, device=dev)
    tab = tall_table(layers, side, dev)
    coef = torch.tensor([[float(c) for c in cs] for cs in coeffs], dtype=torch.float32).reshape(-1).to(dev)
    launch = Launch(_stacked_gram_kernel, cfg, (P, L, S),
                    (g, tab, coef, chunks, pairs, flat[0], K, rows, per,
                     g.stride(0), g.stride(1), g.stride(2), g.stride(3)),
                    dict(CAST_F32=cast, INPUT_PRECISION=precision if fp32_dot else "ieee",
                         BLOCK_R=cfg.block_r, BLOCK_T=cfg.block_t),
                    cfg.reduce_warps, cfg.reduce_stages, keep=(flat,))
    return g, launch


def launch_stacked_gram(layers: Sequence[Sequence[torch.Tensor]], coeffs: Sequence[Sequence[float]],
                        side: str, splits: int | None = None) -> torch.Tensor:
    """L x T x T fp32 Grams of the stacked factors of L same-shaped layers (one launch).

    ``layers[l][k]`` is client k's factor in layer l; every layer has the same client widths.
    ``splits`` forces the number of row slices (tests); default: enough to fill the GPU."""
    dev = layers[0][0].device
    g, launch = plan_stacked_gram(layers, coeffs, side, dev, input_precision(dev), splits)
    if launch is not None:
        launch()
    return g[0] if g.shape[0] == 1 else g.sum(dim=0)


def stacked_gram(factors: Sequence[torch.Tensor], coeffs: Sequence[float], side: str,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """T x T Gram ``X_catᵀX_cat`` (left) or ``X_cat X_catᵀ`` (right), fp32 accumulation, in ``dtype``."""
    return launch_stacked_gram([list(factors)], [list(coeffs)], side)[0].to(dtype)


def batched_stacked_gram(factors: Sequence[Sequence[torch.Tensor]], coeffs: Sequence[Sequence[float]],
                         side: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """L x T x T: :func:`stacked_gram` of L same-shaped layers in one launch."""
    return launch_stacked_gram(factors, coeffs, side).to(dtype)
