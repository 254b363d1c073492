"""Randomized top-r SVD of ΔW = B_cat A_cat that never forms ΔW (Halko, Martinsson & Tropp 2011).

For large R = Σ r_k (many clients) where the exact solver's R² and R³ terms dominate.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..options import SolverTuning
from ..types import LowRank, SVDFactors
from ..validate import LayerInput
from .stacked import Stacked, column_coeffs

__all__ = ["solve_randomized"]

_DEFAULT = SolverTuning()


def _orth(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(x, mode="reduced").Q


@torch.no_grad()
def solve_randomized(inp: LayerInput, rank: int, *, dtype: torch.dtype = torch.float32,
                     oversample: Optional[int] = None, power_iters: Optional[int] = None,
                     probes: Optional[int] = None, generator: Optional[torch.Generator] = None,
                     tuning: Optional[SolverTuning] = None, **_) -> SVDFactors:
    """Randomized top-``rank`` SVD of ΔW = B_cat A_cat, sketching ΔW·Ω = B_cat (A_cat Ω).

    ``oversample``, ``power_iters``, ``probes`` default to ``tuning``'s. ``generator`` seeds Ω
    (a fresh generator seeded 0 when None, so results are reproducible). ``total_energy`` is
    ‖QᵀΔW‖²_F (exact) plus a Hutchinson estimate of the energy outside the sketch from ``probes``
    extra Gaussian columns. The returned ``remainder`` is the exact ΔW − U S Vᵀ in factored form
    (left = [B_cat | −U S], right = [A_cat; Vᵀ]), so the aggregation invariant still holds exactly.
    """
    tuning = tuning or _DEFAULT
    oversample = tuning.oversample if oversample is None else oversample
    power_iters = tuning.power_iters if power_iters is None else power_iters
    probes = tuning.probes if probes is None else probes
    m, n, R = inp.m, inp.n, inp.R
    ell = max(1, min(rank + oversample, R, m, n))
    k_top = min(rank, ell)
    # stacks prescaled once (each c_k on the shorter side: no scaling pass over the longer), with
    # spare room where the exact remainder's −US and Vᵀ go: no second copy of the (large) stacks
    Xb, Xa = (Stacked.build([inp], side, column_coeffs([inp], side, "shorter"), dtype, extra=k_top,
                            prescale=True, gram=False) for side in ("left", "right"))
    dev = inp.device
    if generator is None:
        generator = torch.Generator(device=dev)
        generator.manual_seed(0)
    gdev = generator.device

    def randn(rows, cols):
        return torch.randn(rows, cols, generator=generator, device=gdev, dtype=dtype).to(dev)

    def apply_dw(x):  # ΔW @ x, x is n x l: B_cat (A_cat x)
        return Xb.tall_apply(Xa.tall_apply_t(x[None])[0][None])[0]

    def apply_dwt(y):  # ΔWᵀ @ y, y is m x l: A_catᵀ (B_catᵀ y)
        return Xa.tall_apply(Xb.tall_apply_t(y[None])[0][None])[0]

    Q = _orth(apply_dw(randn(n, ell)))
    for _ in range(power_iters):
        Z = _orth(apply_dwt(Q))
        Q = _orth(apply_dw(Z))
    M = apply_dwt(Q)  # n x ell = ΔWᵀ Q
    Um, Sm, Vmh = torch.linalg.svd(M.to(torch.float64), full_matrices=False)
    # ΔWᵀ Q = Um Sm Vmh  =>  Qᵀ ΔW = Vmhᵀ Sm Umᵀ  =>  ΔW ≈ (Q Vmhᵀ) Sm Umᵀ
    k = min(rank, Sm.numel())
    U = Q @ Vmh[:k].T.to(dtype)
    V = Um[:, :k].to(dtype)
    S = Sm.to(dtype)
    inside = float((Sm ** 2).sum())
    outside = 0.0
    if probes > 0 and ell < min(m, n, R):
        Y = apply_dw(randn(n, probes))
        Y = Y - Q @ (Q.T @ Y)
        outside = float((Y.to(torch.float64) ** 2).sum()) / probes
    remainder = LowRank(Xb.append(0, -(U * S[:k][None, :])), Xa.append(0, V.T))
    return SVDFactors(U=U, S=S[:k], V=V, total_energy=inside + outside, solver="randomized",
                      remainder=remainder)
