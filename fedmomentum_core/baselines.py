"""What users run today, for side-by-side comparisons (benchmarks, the demo, the profiler).

Both baselines form the dense m x n ΔW, as PEFT's ``add_weighted_adapter(..., "svd")`` and the
paper's server do; they return (U_r, S_r, V_r) of the top r.
"""
from __future__ import annotations

import torch

import fedmomentum_kernels as K

from .validate import LayerInput

__all__ = ["dense_delta", "dense_full_svd", "dense_svd_lowrank", "stacked_factors"]


def dense_delta(inp: LayerInput, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ΔW = Σ_k p_k s_k B_k A_k as a dense m x n tensor."""
    dW = torch.zeros(inp.m, inp.n, dtype=dtype, device=inp.device)
    return K.lowrank_accumulate_(dW, inp.B, inp.A, inp.coeffs)


def dense_full_svd(inp: LayerInput, rank: int, dtype: torch.dtype = torch.float32):
    """PEFT-style: dense ΔW, then ``torch.linalg.svd(full_matrices=False)``, keep the top r."""
    U, S, Vh = torch.linalg.svd(dense_delta(inp, dtype), full_matrices=False)
    return U[:, :rank], S[:rank], Vh[:rank].T


def dense_svd_lowrank(inp: LayerInput, rank: int, dtype: torch.dtype = torch.float32,
                      oversample: int = 10, niter: int = 2):
    """The paper's route: dense ΔW, then ``torch.svd_lowrank(q=r+10, niter=2)``."""
    dW = dense_delta(inp, dtype)
    U, S, V = torch.svd_lowrank(dW, q=min(rank + oversample, min(dW.shape)), niter=niter)
    return U[:, :rank], S[:rank], V[:, :rank]


def stacked_factors(inp: LayerInput, dtype: torch.dtype = torch.float32):
    """(B_cat, A_cat) unweighted, for timing the cost floor of any exact factored method: the two
    Gram GEMMs ``B_cat.T @ B_cat`` and ``A_cat @ A_cat.T``."""
    Bc = torch.cat([b.to(dtype) for b in inp.B], 1)
    Ac = torch.cat([a.to(dtype) for a in inp.A], 0)
    return Bc, Ac
