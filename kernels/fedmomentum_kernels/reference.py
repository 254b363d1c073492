"""Torch reference implementations of every kernel in this package.

Each function here is both the CPU / no-Triton fallback and the test oracle of the
Triton kernel of the same name. They accept the same arguments as the public
functions in :mod:`fedmomentum_kernels` and never modify their inputs (except the
documented in-place ``out`` of :func:`lowrank_accumulate_`).

Conventions
-----------
A *stacked* factor is a list of per-client tensors with per-client coefficients:

* ``side="left"``:  ``X_cat = [c_1 F_1 | c_2 F_2 | ... ]`` with ``F_k`` of shape m x t_k
  (the lora_B's), so ``X_cat`` is m x T, T = sum t_k.
* ``side="right"``: ``X_cat = [c_1 F_1; c_2 F_2; ...]`` with ``F_k`` of shape t_k x n
  (the lora_A's), so ``X_cat`` is T x n.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = [
    "lowrank_accumulate_",
    "stacked_gram",
    "stacked_matmul",
    "stacked_matmul_t",
    "batched_stacked_gram",
    "batched_stacked_matmul",
    "batched_stacked_matmul_t",
]


def _stack(factors: Sequence[torch.Tensor], coeffs: Sequence[float], side: str,
           dtype: torch.dtype) -> torch.Tensor:
    dim = 1 if side == "left" else 0
    parts = [f.to(dtype) * float(c) for f, c in zip(factors, coeffs)]
    return torch.cat(parts, dim=dim)


def _check_side(side: str) -> None:
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")


def lowrank_accumulate_(out: torch.Tensor, lefts: Sequence[torch.Tensor],
                        rights: Sequence[torch.Tensor], coeffs: Sequence[float]) -> torch.Tensor:
    """In place ``out += sum_i coeffs[i] * lefts[i] @ rights[i]`` with fp32 accumulation.

    ``out`` is read once and written once (the sum is accumulated in an fp32 buffer
    of the same shape when ``out`` is not fp32/fp64)."""
    acc_dtype = torch.float64 if out.dtype == torch.float64 else torch.float32
    acc = out.to(acc_dtype) if out.dtype != acc_dtype else out
    for left, right, c in zip(lefts, rights, coeffs):
        if left.shape[1] == 0:
            continue
        acc.addmm_(left.to(acc_dtype), right.to(acc_dtype), alpha=float(c))
    if acc is not out:
        out.copy_(acc)
    return out


def stacked_gram(factors: Sequence[torch.Tensor], coeffs: Sequence[float], side: str,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The T x T Gram of the stacked factor: ``X_catᵀ X_cat`` (left) or ``X_cat X_catᵀ`` (right)."""
    _check_side(side)
    x = _stack(factors, coeffs, side, dtype)
    return x.T @ x if side == "left" else x @ x.T


def stacked_matmul(factors: Sequence[torch.Tensor], coeffs: Sequence[float], side: str,
                   mat: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``X_cat @ mat``: left side m x T times T x l -> m x l; right side T x n times n x l -> T x l."""
    _check_side(side)
    return _stack(factors, coeffs, side, dtype) @ mat.to(dtype)


def stacked_matmul_t(factors: Sequence[torch.Tensor], coeffs: Sequence[float], side: str,
                     mat: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``X_catᵀ @ mat``: left side T x m times m x l -> T x l; right side n x T times T x l -> n x l."""
    _check_side(side)
    return _stack(factors, coeffs, side, dtype).T @ mat.to(dtype)


# ----------------------------------------------------------------------------- batched by shape
# A batch is L layers of one shape; layer l has its own per-client factors and coefficients
# (the same number of clients and the same t_k in every layer of a batch).

def batched_stacked_gram(factors: Sequence[Sequence[torch.Tensor]], coeffs: Sequence[Sequence[float]],
                         side: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """L x T x T: :func:`stacked_gram` of every layer of the batch."""
    _check_side(side)
    x = torch.stack([_stack(f, c, side, dtype) for f, c in zip(factors, coeffs)])
    return x.transpose(1, 2) @ x if side == "left" else x @ x.transpose(1, 2)


def batched_stacked_matmul(factors, coeffs, side: str, mats: torch.Tensor,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """L x ... : ``X_cat[l] @ mats[l]`` for every layer l."""
    _check_side(side)
    x = torch.stack([_stack(f, c, side, dtype) for f, c in zip(factors, coeffs)])
    return x @ mats.to(dtype)


def batched_stacked_matmul_t(factors, coeffs, side: str, mats: torch.Tensor,
                             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """L x ... : ``X_cat[l]ᵀ @ mats[l]`` for every layer l."""
    _check_side(side)
    x = torch.stack([_stack(f, c, side, dtype) for f, c in zip(factors, coeffs)])
    return x.transpose(1, 2) @ mats.to(dtype)
