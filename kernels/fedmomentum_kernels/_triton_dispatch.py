"""The Triton backend of :mod:`fedmomentum_kernels` (imported lazily: it needs ``triton``).

Same function names and signatures as :mod:`fedmomentum_kernels.reference`. Each function
checks its arguments (clear ``ValueError``/``TypeError`` naming the layer/client/shape/dtype),
then calls the launcher in ``lowrank_accumulate.py``, ``gram.py`` or ``sketch.py``.

Requests the kernels do not serve go to the torch reference, by design and documented here:
float64 (``out`` of :func:`lowrank_accumulate_`, float64 factors, or ``dtype=torch.float64``;
fp64 ``tl.dot`` is slow or absent on GPUs and the reference is exact in fp64).
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import reference
from .gram import batched_stacked_gram as _tr_batched_gram
from .lowrank_accumulate import lowrank_accumulate_ as _tr_accumulate
from .sketch import batched_stacked_matmul as _tr_batched_matmul
from .sketch import batched_stacked_matmul_t as _tr_batched_matmul_t

__all__ = reference.__all__


def _fp64(*dtypes: torch.dtype) -> bool:
    return any(d == torch.float64 for d in dtypes)


def _check_layers(factors: Sequence[Sequence[torch.Tensor]], coeffs: Sequence[Sequence[float]],
                  side: str) -> tuple[int, list[int], torch.device]:
    """Validate a batch of stacked factors; returns (rows, widths, device)."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if len(factors) == 0 or len(factors[0]) == 0:
        raise ValueError("need at least one layer with at least one client factor")
    if len(coeffs) != len(factors):
        raise ValueError(f"{len(factors)} layers of factors but {len(coeffs)} lists of coefficients")
    dev = factors[0][0].device
    f0 = factors[0][0]
    rows = f0.shape[0] if side == "left" else f0.shape[1]
    widths = None
    for li, (fs, cs) in enumerate(zip(factors, coeffs)):
        if len(fs) != len(cs):
            raise ValueError(f"layer {li}: {len(fs)} factors but {len(cs)} coefficients")
        if len(fs) != len(factors[0]):
            raise ValueError(f"layer {li}: {len(fs)} clients, layer 0 has {len(factors[0])}")
        w = []
        for k, f in enumerate(fs):
            if not isinstance(f, torch.Tensor) or f.dim() != 2:
                raise ValueError(f"layer {li}, client {k}: {side} factor must be a 2-D tensor, got "
                                 f"{getattr(f, 'shape', type(f).__name__)}")
            if not f.dtype.is_floating_point:
                raise TypeError(f"layer {li}, client {k}: {side} factor has dtype {f.dtype}")
            if f.device != dev:
                raise ValueError(f"layer {li}, client {k}: {side} factor on {f.device}, expected {dev}")
            r = f.shape[0] if side == "left" else f.shape[1]
            if r != rows:
                want = f"{rows} x t" if side == "left" else f"t x {rows}"
                raise ValueError(f"layer {li}, client {k}: {side} factor is {tuple(f.shape)}, expected {want}")
            w.append(f.shape[1] if side == "left" else f.shape[0])
        if widths is None:
            widths = w
        elif w != widths:
            raise ValueError(f"layer {li}: client ranks {w} differ from layer 0's {widths}; a batch "
                             "holds layers of one shape and one rank pattern")
    return rows, widths, dev


def _check_mats(mats: torch.Tensor, L: int, want_rows: int, what: str, dev: torch.device) -> None:
    if not isinstance(mats, torch.Tensor) or mats.dim() != 3:
        raise ValueError(f"{what} must be a 3-D (layers x rows x cols) tensor, got "
                         f"{getattr(mats, 'shape', type(mats).__name__)}")
    if mats.shape[0] != L or mats.shape[1] != want_rows:
        raise ValueError(f"{what} is {tuple(mats.shape)}, expected {L} x {want_rows} x l")
    if mats.device != dev:
        raise ValueError(f"{what} on {mats.device}, factors on {dev}")
    if not mats.dtype.is_floating_point:
        raise TypeError(f"{what} has dtype {mats.dtype}")


def _any_fp64(factors) -> bool:
    return any(f.dtype == torch.float64 for fs in factors for f in fs)


# ----------------------------------------------------------------------------- public names

def lowrank_accumulate_(out: torch.Tensor, lefts: Sequence[torch.Tensor],
                        rights: Sequence[torch.Tensor], coeffs: Sequence[float]) -> torch.Tensor:
    """In place ``out += Σ_i coeffs[i] · lefts[i] @ rights[i]`` (Triton; fp64 → reference)."""
    if _fp64(out.dtype, *(t.dtype for t in lefts), *(t.dtype for t in rights)):
        return reference.lowrank_accumulate_(out, lefts, rights, coeffs)
    return _tr_accumulate(out, lefts, rights, coeffs)


def batched_stacked_gram(factors: Sequence[Sequence[torch.Tensor]], coeffs: Sequence[Sequence[float]],
                         side: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """L x T x T Grams of L same-shaped layers, one launch."""
    _check_layers(factors, coeffs, side)
    if _fp64(dtype) or _any_fp64(factors):
        return reference.batched_stacked_gram(factors, coeffs, side, dtype)
    return _tr_batched_gram(factors, coeffs, side, dtype)


def batched_stacked_matmul(factors, coeffs, side: str, mats: torch.Tensor,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``X_cat[l] @ mats[l]`` for the L layers of a batch, one launch."""
    rows, widths, dev = _check_layers(factors, coeffs, side)
    _check_mats(mats, len(factors), sum(widths) if side == "left" else rows, "mats", dev)
    if _fp64(dtype) or _any_fp64(factors):
        return reference.batched_stacked_matmul(factors, coeffs, side, mats, dtype)
    return _tr_batched_matmul(factors, coeffs, side, mats, dtype)


def batched_stacked_matmul_t(factors, coeffs, side: str, mats: torch.Tensor,
                             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``X_cat[l]ᵀ @ mats[l]`` for the L layers of a batch, one launch."""
    rows, widths, dev = _check_layers(factors, coeffs, side)
    _check_mats(mats, len(factors), rows if side == "left" else sum(widths), "mats", dev)
    if _fp64(dtype) or _any_fp64(factors):
        return reference.batched_stacked_matmul_t(factors, coeffs, side, mats, dtype)
    return _tr_batched_matmul_t(factors, coeffs, side, mats, dtype)


def _single_mat(mat: torch.Tensor) -> torch.Tensor:
    if not isinstance(mat, torch.Tensor) or mat.dim() != 2:
        raise ValueError(f"mat must be a 2-D tensor, got {getattr(mat, 'shape', type(mat).__name__)}")
    return mat[None]


def stacked_gram(factors: Sequence[torch.Tensor], coeffs: Sequence[float], side: str,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """T x T Gram of the stacked, coefficient-weighted factors."""
    return batched_stacked_gram([list(factors)], [list(coeffs)], side, dtype)[0]


def stacked_matmul(factors: Sequence[torch.Tensor], coeffs: Sequence[float], side: str,
                   mat: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``X_cat @ mat`` without concatenating the factors."""
    return batched_stacked_matmul([list(factors)], [list(coeffs)], side, _single_mat(mat), dtype)[0]


def stacked_matmul_t(factors: Sequence[torch.Tensor], coeffs: Sequence[float], side: str,
                     mat: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``X_catᵀ @ mat`` without concatenating the factors."""
    return batched_stacked_matmul_t([list(factors)], [list(coeffs)], side, _single_mat(mat), dtype)[0]
