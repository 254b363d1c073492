"""The dense solver: form ΔW (m x n) with the fused low-rank accumulation, then a LAPACK SVD.
Only worth it when R ≥ min(m, n) (the stacks are no smaller than ΔW), and as the baseline."""
from __future__ import annotations

import torch

import fedmomentum_kernels as K

from ..types import SVDFactors
from ..validate import LayerInput

__all__ = ["solve_dense"]


@torch.no_grad()
def solve_dense(inp: LayerInput, rank: int, *, dtype: torch.dtype = torch.float32, **_) -> SVDFactors:
    """Form ΔW (m x n) with the fused low-rank accumulation, then ``torch.linalg.svd``."""
    dW = torch.zeros(inp.m, inp.n, dtype=dtype, device=inp.device)
    K.lowrank_accumulate_(dW, inp.B, inp.A, inp.coeffs)
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    k = min(S.numel(), inp.R)
    total = float((S.to(torch.float64) ** 2).sum())
    return SVDFactors(U=U[:, :k], S=S[:k], V=Vh[:k].T, total_energy=total, solver="dense")
