"""SVD of ΔW = Σ_k c_k B_k A_k = B_cat · A_cat without forming ΔW (except ``dense``).

Every solver returns :class:`~fedmomentum_core.types.SVDFactors` in the compute dtype:
``U`` (m x k, orthonormal columns), ``S`` (k, descending), ``V`` (n x k), the total
energy ‖ΔW‖²_F, and, when the factors do not hold all of ΔW, the exact remainder.

* :func:`solve_exact`: Grams of the stacked factors (R x R), eigen-decomposed after a
  Jacobi (diagonal) equilibration; ``X = Q L`` with ``Q = X D⁻¹ V Λ^{-½}`` kept implicit.
  Fallback: when the equilibrated Gram has λ_min/λ_max below ``gram_tol`` (clients that share
  an A initialisation, near-duplicate clients, R > m), that side is factored with Householder
  QR instead (``torch.linalg.qr``, stable for any conditioning). Then the R x R core
  ``L_B L_Aᵀ = U_c Σ V_cᵀ`` gives ``U = Q_B U_c``, ``V = Q_A V_c``.
  Cost O((m+n)R² + R³); never allocates m x n.
* :func:`solve_randomized`: range finder on ΔW·Ω = B_cat (A_cat Ω) with oversampling and
  power iterations (Halko, Martinsson & Tropp 2011), never forming ΔW; returns the top r and
  the exact remainder ΔW − U S Vᵀ in factored form (rank R + r).
* :func:`solve_dense`: forms ΔW (fused low-rank accumulation) and runs ``torch.linalg.svd``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

import fedmomentum_kernels as K
from fedmomentum_kernels import reference as _ref

from .types import LowRank, SVDFactors
from .validate import LayerInput

__all__ = ["Stacked", "solve_exact", "solve_randomized", "solve_dense", "SOLVERS", "stacked_pair"]


class Stacked:
    """One side of the stacked product, weighted per client.

    ``side="left"``: X = [c_1 B_1 | … | c_K B_K] (m x R); ``side="right"``: X = [d_1 A_1; …] (R x n).
    The *tall* orientation (m x R for left, n x R for right) is what the bases are built on.
    On the torch backend the concatenation is formed once and reused; on the Triton
    backend the per-client factors are read through pointer tables by the kernels.
    """

    def __init__(self, factors, coeffs, side: str, dtype: torch.dtype):
        self.factors = list(factors)
        self.coeffs = [float(c) for c in coeffs]
        self.side = side
        self.dtype = dtype
        self.device = self.factors[0].device
        self.backend = K.select_backend(self.device)
        self._cat = None
        if self.backend == "torch":
            self._cat = _ref._stack(self.factors, self.coeffs, side, dtype)

    @property
    def width(self) -> int:
        """R, the stacked rank."""
        return sum(f.shape[1] if self.side == "left" else f.shape[0] for f in self.factors)

    def gram(self) -> torch.Tensor:
        if self._cat is not None:
            x = self._cat
            return x.T @ x if self.side == "left" else x @ x.T
        return K.stacked_gram(self.factors, self.coeffs, self.side, self.dtype)

    def tall_apply(self, mat: torch.Tensor) -> torch.Tensor:
        """Tall X times ``mat`` (R x l): B_cat @ mat (m x l) or A_catᵀ @ mat (n x l)."""
        mat = mat.to(self.dtype)
        if self._cat is not None:
            return self._cat @ mat if self.side == "left" else self._cat.T @ mat
        if self.side == "left":
            return K.stacked_matmul(self.factors, self.coeffs, "left", mat, self.dtype)
        return K.stacked_matmul_t(self.factors, self.coeffs, "right", mat, self.dtype)

    def tall_apply_t(self, mat: torch.Tensor) -> torch.Tensor:
        """Tall Xᵀ times ``mat``: B_catᵀ @ mat (mat m x l) or A_cat @ mat (mat n x l) -> R x l."""
        mat = mat.to(self.dtype)
        if self._cat is not None:
            return self._cat.T @ mat if self.side == "left" else self._cat @ mat
        if self.side == "left":
            return K.stacked_matmul_t(self.factors, self.coeffs, "left", mat, self.dtype)
        return K.stacked_matmul(self.factors, self.coeffs, "right", mat, self.dtype)

    def tall_dense(self) -> torch.Tensor:
        """The tall stacked matrix itself (m x R or n x R), in the compute dtype."""
        x = self._cat if self._cat is not None else _ref._stack(self.factors, self.coeffs, self.side, self.dtype)
        return x if self.side == "left" else x.T


def stacked_pair(inp: LayerInput, dtype: torch.dtype) -> tuple[Stacked, Stacked]:
    """(B_cat, A_cat) with c_k = sign(p_k s_k)·√|p_k s_k| on B and d_k = √|p_k s_k| on A.

    Clients with c_k == 0 (weight 0) are left out: they contribute nothing."""
    keep = [k for k, c in enumerate(inp.coeffs) if c != 0.0]
    cs = [inp.coeffs[k] for k in keep]
    cb = [math.copysign(math.sqrt(abs(c)), c) for c in cs]
    ca = [math.sqrt(abs(c)) for c in cs]
    return (Stacked([inp.B[k] for k in keep], cb, "left", dtype),
            Stacked([inp.A[k] for k in keep], ca, "right", dtype))


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


@dataclass
class _Basis:
    """X (tall) = Q L, Q = X·T (implicit) or explicit Q; L is k x R (fp64)."""

    L: torch.Tensor
    T: Optional[torch.Tensor] = None
    Q: Optional[torch.Tensor] = None
    method: str = "gram"

    def apply(self, st: Stacked, mat: torch.Tensor) -> torch.Tensor:
        """Q @ mat (mat is k x l, fp64) in the compute dtype."""
        if self.Q is not None:
            return self.Q @ mat.to(self.Q.dtype)
        return st.tall_apply(self.T @ mat)


def _basis(st: Stacked, gram_tol: float) -> _Basis:
    G = st.gram().to(torch.float64)
    G = 0.5 * (G + G.T)
    d = torch.sqrt(torch.clamp(torch.diagonal(G), min=0.0))
    nz = d > 0
    dinv = torch.where(nz, 1.0 / torch.where(nz, d, torch.ones_like(d)), torch.zeros_like(d))
    Gs = G * dinv[:, None] * dinv[None, :]
    lam, V = torch.linalg.eigh(Gs)
    lmax = float(lam[-1]) if lam.numel() else 0.0
    if lmax > 0 and bool(nz.all()) and float(lam[0]) > gram_tol * lmax:
        sq = torch.sqrt(lam)
        T = (dinv[:, None] * V) / sq[None, :]
        L = sq[:, None] * V.T * d[None, :]
        return _Basis(L=L, T=T, method="gram")
    # Fallback: Householder QR of the equilibrated tall matrix (stable for any conditioning).
    X = st.tall_dense()
    Xs = X * dinv.to(X.dtype)[None, :]
    Q, Rr = torch.linalg.qr(Xs, mode="reduced")
    L = Rr.to(torch.float64) * d[None, :]
    return _Basis(L=L, Q=Q, method="qr")


def solve_exact(inp: LayerInput, rank: int, *, dtype: torch.dtype = torch.float32,
                need_tail: bool = True, gram_tol: Optional[float] = None, **_) -> SVDFactors:
    """Exact thin SVD of ΔW from the stacked factors; O((m+n)R² + R³), no m x n allocation.

    ``need_tail=False`` forms only the top ``rank`` singular vectors (U, V have ``rank`` columns,
    S holds all singular values). ``gram_tol`` (default 1e-3 in fp32, 1e-9 in fp64) is the
    λ_min/λ_max of the equilibrated Gram under which a side falls back to Householder QR.
    """
    Bs, As = stacked_pair(inp, dtype)
    if gram_tol is None:
        gram_tol = 1e-9 if dtype == torch.float64 else 1e-3
    bb = _basis(Bs, gram_tol)
    ba = _basis(As, gram_tol)
    core = bb.L @ ba.L.T
    Uc, S, Vch = torch.linalg.svd(core, full_matrices=False)
    total = float((S ** 2).sum())
    k = S.numel() if need_tail else min(rank, S.numel())
    U = bb.apply(Bs, Uc[:, :k])
    V = ba.apply(As, Vch[:k].T)
    return SVDFactors(U=U, S=S.to(dtype), V=V, total_energy=total,
                      solver="exact", remainder=None)


def _orth(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(x, mode="reduced").Q


def solve_randomized(inp: LayerInput, rank: int, *, dtype: torch.dtype = torch.float32,
                     oversample: int = 10, power_iters: int = 2, probes: int = 16,
                     generator: Optional[torch.Generator] = None, **_) -> SVDFactors:
    """Randomized top-``rank`` SVD of ΔW = B_cat A_cat, sketching ΔW·Ω = B_cat (A_cat Ω).

    ``generator`` seeds Ω (a fresh generator seeded 0 when None, so results are reproducible).
    ``total_energy`` is ‖QᵀΔW‖²_F (exact) plus a Hutchinson estimate of the energy outside the
    sketch from ``probes`` extra Gaussian columns. The returned ``remainder`` is the exact
    ΔW − U S Vᵀ in factored form (left = [B_cat | −U S], right = [A_cat; Vᵀ]), so the
    aggregation invariant still holds exactly.
    """
    Bs, As = stacked_pair(inp, dtype)
    m, n, R = inp.m, inp.n, Bs.width
    ell = max(1, min(rank + oversample, R, m, n))
    dev = inp.device
    if generator is None:
        generator = torch.Generator(device=dev)
        generator.manual_seed(0)
    gdev = generator.device

    def randn(rows, cols):
        return torch.randn(rows, cols, generator=generator, device=gdev, dtype=dtype).to(dev)

    def apply_dw(x):  # ΔW @ x, x is n x l
        return Bs.tall_apply(As.tall_apply_t(x))

    def apply_dwt(y):  # ΔWᵀ @ y, y is m x l
        return As.tall_apply(Bs.tall_apply_t(y))

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
    remainder = LowRank(torch.cat([Bs.tall_dense(), -(U * S[:k][None, :])], dim=1),
                        torch.cat([As.tall_dense().T, V.T], dim=0))
    return SVDFactors(U=U, S=S[:k], V=V, total_energy=inside + outside, solver="randomized",
                      remainder=remainder)


def solve_dense(inp: LayerInput, rank: int, *, dtype: torch.dtype = torch.float32, **_) -> SVDFactors:
    """Form ΔW (m x n) with the fused low-rank accumulation, then ``torch.linalg.svd``."""
    dW = torch.zeros(inp.m, inp.n, dtype=dtype, device=inp.device)
    K.lowrank_accumulate_(dW, inp.B, inp.A, inp.coeffs)
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    k = min(S.numel(), inp.R)
    total = float((S.to(torch.float64) ** 2).sum())
    return SVDFactors(U=U[:, :k], S=S[:k], V=Vh[:k].T, total_energy=total, solver="dense")


SOLVERS = {"exact": solve_exact, "randomized": solve_randomized, "dense": solve_dense}
