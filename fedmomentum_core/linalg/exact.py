"""Exact thin SVD of ΔW_l = X_B,l X_A,lᵀ from the stacked factors, for L same-shaped layers.

Grams of the stacks (R x R), Jacobi (diagonal) equilibrated and Cholesky-factored, ``X = Q L``
with Q kept implicit; for well-conditioned layers both sides go through one batched pass
(:func:`_fast_core`). Fallback: when the equilibrated Gram's Cholesky fails or estimates 1/κ below
``gram_tol`` (clients that share an A initialisation, near-duplicate clients, R > m), that side is
factored with Householder QR instead (stable for any conditioning). Then the R x R core
``C = L_B L_Aᵀ`` (``eigh(C Cᵀ)`` in fp64) gives ``U = Q_B U_c`` and the right factors.
Cost O((m+n)R² + R³); never allocates m x n.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

import fedmomentum_kernels as K

from ..options import SolverTuning
from ..types import LowRank, SVDFactors
from ..validate import LayerInput
from .stacked import Stacked, column_coeffs
from .workspace import thread_workspace

__all__ = ["solve_exact", "solve_exact_batch"]

_DEFAULT = SolverTuning()


@dataclass
class _Basis:
    """Tall X_l = Q_l L_l. Cholesky-QR: Q_l = X_l T_l implicit; QR fallback: explicit Q_l."""

    L: torch.Tensor  # L x k x R fp64 (k = R for Cholesky)
    T: Optional[torch.Tensor]  # L x R x k fp64 (None where every layer uses QR)
    Q: dict  # layer index -> explicit Q (rows x k) for the layers that fell back to QR
    methods: list

    def apply(self, st: Stacked, mat: torch.Tensor) -> list[torch.Tensor]:
        """Q_l @ mat_l for every layer (mat L x k x l fp64) -> L tensors rows x l."""
        if not self.Q:
            return st.tall_apply(self.T @ mat)
        out: list = [None] * mat.shape[0]
        chol = [i for i in range(mat.shape[0]) if i not in self.Q]
        if chol:
            idx = torch.tensor(chol, device=mat.device)
            for i, o in zip(chol, st.subset(chol).tall_apply(self.T[idx] @ mat[idx])):
                out[i] = o
        for i, Q in self.Q.items():
            out[i] = Q @ mat[i, :Q.shape[1]].to(Q.dtype)
        return out


def _finite_from_grams(layers: list[LayerInput], GB: torch.Tensor, GA: torch.Tensor) -> None:
    """Raise the validation error for the first layer whose Gram diagonal is not finite."""
    from ..validate import _check_finite, layer_prefix
    ok = (torch.isfinite(torch.diagonal(GB, dim1=1, dim2=2)).all(dim=1)
          & torch.isfinite(torch.diagonal(GA, dim1=1, dim2=2)).all(dim=1))
    if bool(ok.all()):
        return
    for li in torch.nonzero(~ok).flatten().tolist():
        inp = layers[li]
        pre = layer_prefix(inp.name)
        _check_finite(inp.B, inp.A, pre)  # names the client and factor with NaN/Inf entries
        raise ValueError(f"{pre}factor entries are too large (their squares overflow in the "
                         "compute dtype); rescale the adapters")


def _basis_from_gram(st: Stacked, G: torch.Tensor, gram_tol: float, need_q: bool = True) -> _Basis:
    """Cholesky-QR on the Jacobi-equilibrated Gram; Householder QR where it is ill-conditioned.

    Equilibration: Gs = D⁻¹ G D⁻¹ with D = √diag(G); all-zero columns (clients whose factor is
    zero, or weight 0) get Gs_ii = 1 and contribute nothing since L = R_x D has a zero column there.
    A layer falls back to QR when the Cholesky fails or (min R_ii / max R_ii)² < ``gram_tol``
    (an estimate of 1/κ(Gs); the loss of orthogonality of Cholesky-QR is ~eps·κ(Gs)).
    ``need_q=False``: only L is wanted (no T, and the fallback computes R alone)."""
    d = torch.sqrt(torch.clamp(torch.diagonal(G, dim1=1, dim2=2), min=0.0))  # L x R
    nz = d > 0
    all_nz = bool(nz.all())
    dinv = 1.0 / d if all_nz else torch.where(nz, 1.0 / torch.where(nz, d, torch.ones_like(d)),
                                              torch.zeros_like(d))
    Gs = G * (dinv[:, :, None] * dinv[:, None, :])
    if not all_nz:
        Gs = Gs + torch.diag_embed((~nz).to(Gs.dtype))
    Lc, info = torch.linalg.cholesky_ex(Gs)  # Gs = Lc Lcᵀ, upper factor Rx = Lcᵀ
    diag = torch.diagonal(Lc, dim1=1, dim2=2)
    ratio = (diag.min(dim=1).values / diag.max(dim=1).values) ** 2
    bad = (info != 0) | ~(ratio > gram_tol) | ~torch.isfinite(ratio)
    any_bad = bool(bad.any())
    Rx = Lc.transpose(1, 2)
    T = None
    if need_q:
        eye = torch.eye(Rx.shape[1], dtype=Rx.dtype, device=Rx.device).expand_as(Rx)
        Rinv = torch.where((~bad)[:, None, None], Rx, eye) if any_bad else Rx
        Rinv = torch.linalg.solve_triangular(Rinv, eye, upper=True)
        T = dinv[:, :, None] * Rinv  # X T = X D⁻¹ Rx⁻¹ = Q
    Lmat = Rx * d[:, None, :]
    Qs: dict = {}
    methods = ["cholesky"] * G.shape[0]
    if any_bad:
        Lmat = Lmat.clone()
        for i in torch.nonzero(bad).flatten().tolist():
            X = st.tall_dense(i)
            Xs = X * dinv[i].to(X.dtype)[None, :]
            Q, Rr = torch.linalg.qr(Xs, mode="reduced" if need_q else "r")
            Lq = Rr.to(torch.float64) * d[i][None, :]
            k = Lq.shape[0]
            Lmat[i].zero_()
            Lmat[i, :k] = Lq
            methods[i] = "qr"
            if not need_q:
                continue
            if k < Lmat.shape[1]:  # pad Q so that every layer's basis has R columns
                Q = torch.cat([Q, torch.zeros(Q.shape[0], Lmat.shape[1] - k, dtype=Q.dtype,
                                              device=Q.device)], 1)
            Qs[i] = Q
    return _Basis(L=Lmat, T=T, Q=Qs, methods=methods)


def _core_eigh(C: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``eigh(C Cᵀ)`` of the L x R x R cores: eigenvalues σ² (L x R, descending, clamped at 0) and
    the top k eigenvectors (L x R x k, descending)."""
    lam, W = torch.linalg.eigh(C @ C.transpose(-2, -1))
    lam = torch.flip(lam, dims=[-1]).clamp_min(0.0)
    return lam, torch.flip(W[..., W.shape[-1] - k:], dims=[-1])


@dataclass
class _Core:
    """The R x R stage's result for L layers (see :func:`_fast_core`)."""

    lam: torch.Tensor  # L x R fp64, eigenvalues σ² of C Cᵀ, descending, ≥ 0
    Uc: torch.Tensor  # L x R x k fp64, the top k eigenvectors
    mat_B: torch.Tensor  # L x R x k fp64: U = (B stack as stored) @ mat_B
    mat_A: torch.Tensor  # L x R x k fp64: S Vᵀ = mat_Aᵀ @ (A stack as stored)


def _fast_core(Bs: Stacked, As: Stacked, G32: torch.Tensor, k: int, gram_tol: float) -> Optional[_Core]:
    """The R x R stage for the common case, in one batched pass over both sides; None when any
    layer needs the general path (:func:`_basis_from_gram`: an all-zero column, a non-finite Gram,
    a failed or ill-conditioned Cholesky).

    ``G32`` (2 x L x R x R) holds the Grams of the stacks as stored (B side, A side). With
    D = √diag(G) and the equilibrated Cholesky D⁻¹ G D⁻¹ = Rxᵀ Rx of each side, a stack as stored
    is ``X_raw = Q Rx D``; the weighted stack X = X_raw diag(c) = Q L with L = Rx diag(d·c). Then
    C = L_B L_Aᵀ, ``eigh(C Cᵀ) = W Λ Wᵀ``, and the two products need only
    ``U = Q_B W = X_raw,B (D_B⁻¹ Rx_B⁻¹ W)`` (a triangular solve, no explicit inverse) and
    ``S Vᵀ = Wᵀ L_B X_Aᵀ = (diag(c_A) L_Bᵀ W)ᵀ X_raw,A``: the coefficients never touch the stacks.
    Both sides share every small op (one cast, one equilibration, one batched Cholesky, one host
    sync): the R x R stage is a fixed cost per layer that matters once the Grams are cheap."""
    G = G32.to(torch.float64)
    d = torch.sqrt(torch.diagonal(G, dim1=-2, dim2=-1))  # 2 x L x R; 0 or NaN → fails below
    dinv = torch.reciprocal(d)
    Lc, info = torch.linalg.cholesky_ex(G * (dinv[..., :, None] * dinv[..., None, :]))
    diag = torch.diagonal(Lc, dim1=-2, dim2=-1)
    ratio = (diag.amin(-1) / diag.amax(-1)) ** 2
    if not bool(((info == 0) & (ratio > gram_tol)).all()):  # NaN ratio (zero/non-finite d) → False
        return None
    Rx = Lc.transpose(-2, -1)  # upper, 2 x L x R x R
    col = d * torch.stack((Bs.c, As.c))  # 2 x L x R: L = Rx diag(d·c)
    LB = Rx[0] * col[0][:, None, :]
    lam, Uc = _core_eigh(LB @ (Rx[1] * col[1][:, None, :]).transpose(-2, -1), k)
    mat_B = torch.linalg.solve_triangular(Rx[0], Uc, upper=True) * dinv[0][:, :, None]
    mat_A = (LB.transpose(-2, -1) @ Uc) * As.c[:, :, None]
    return _Core(lam=lam, Uc=Uc, mat_B=mat_B, mat_A=mat_A)


@torch.no_grad()
def solve_exact_batch(layers: list[LayerInput], rank: int, *, dtype: torch.dtype = torch.float32,
                      need_tail: bool = True, gram_tol: Optional[float] = None,
                      stacked_remainder: bool = False, check_finite: bool = False,
                      tuning: Optional[SolverTuning] = None) -> list[SVDFactors]:
    """Exact SVD of ΔW_l = X_B,l X_A,lᵀ for L layers of one shape (same m, n, client ranks).

    1. Tall stacks X_B (m x R), X_A (n x R) with the coefficients on the R side, and their Grams
       (the only (m+n)·R² work); Jacobi-equilibrated Cholesky-QR ``X = Q L`` of both, Householder
       QR per layer when ill-conditioned (see :func:`_basis_from_gram`). Q_B is implicit (X_B·T_B);
       the A side needs only L_A (no inverse, and its fallback computes R alone).
    2. Core C = L_B L_Aᵀ (R x R, fp64); ``eigh(C Cᵀ) = W Λ Wᵀ``, σ = √λ (fp64, so squaring
       costs nothing at fp32 accuracy).
    3. ΔW = Q_B C Q_Aᵀ = Σ_i (Q_B w_i)(X_A L_Bᵀ w_i)ᵀ, since Q_A Cᵀ = Q_A L_A L_Bᵀ = X_A L_Bᵀ:
       U = Q_B W and the right factors X_A L_Bᵀ W (= σ_i v_i), one (m+n)·R·k product each side;
       v_i = (X_A L_Bᵀ w_i)/σ_i for σ_i > 0. The identity holds for every σ, zero included, so
       the residual is exact whatever the conditioning.
    Steps 1-2 run in one batched pass over both sides when every layer is well-conditioned
    (:func:`_fast_core`, the common case, unless ``tuning.fast_core`` is False); otherwise the
    general path above, per side.
    ``need_tail=False`` forms only the top ``rank`` columns. ``stacked_remainder=True`` (implies
    no tail) attaches the exact remainder ΔW − U S Vᵀ in stacked form ([X_B | −U S], [X_Aᵀ; Vᵀ],
    rank R + rank), written into spare columns/rows of the stacks: no GEMM beyond the Grams and the
    top-r products, no second copy of the stacks. Never allocates m x n.
    ``check_finite=True``: the NaN/Inf check of the inputs (when the caller validated with
    ``check_finite=False``) is read off the Grams' diagonals (NaN and Inf propagate into Σx²),
    saving a pass over the factors; a non-finite diagonal is traced to the client at fault.
    """
    tuning = tuning or _DEFAULT
    if stacked_remainder:
        need_tail = False
    if gram_tol is None:
        gram_tol = tuning.gram_tol
    if gram_tol is None:
        gram_tol = 1e-9 if dtype == torch.float64 else 1e-3
    R = layers[0].R
    k_top = min(rank, R)
    extra = k_top if stacked_remainder else 0
    # stacked remainder: the stacks are X itself (prescaled), with each c_k on the shorter side only
    split = "shorter" if stacked_remainder else "sqrt"
    L = len(layers)
    dev = layers[0].device
    torch_backend = K.select_backend(dev) == "torch"
    G32 = torch.empty(2, L, R, R, dtype=dtype, device=dev) if torch_backend else None
    sides = {}
    for i, side in enumerate(("left", "right")):
        buf = None
        if tuning.workspace and not stacked_remainder and torch_backend:  # nothing returned views them
            rows = layers[0].m if side == "left" else layers[0].n
            buf = thread_workspace().take(side, L * rows * R, dtype, dev, tuning.workspace_max_bytes)
        sides[side] = Stacked.build(layers, side, column_coeffs(layers, side, split), dtype, extra=extra,
                                    prescale=stacked_remainder, buffer=buf,
                                    gram_out=None if G32 is None else G32[i],
                                    symmetric_min_r=tuning.symmetric_gram_min_r)
    Bs, As = sides["left"], sides["right"]
    if G32 is None:
        G32 = torch.stack((Bs.raw_gram(), As.raw_gram()))
    k = R if need_tail else k_top
    core = _fast_core(Bs, As, G32, k, gram_tol) if tuning.fast_core else None
    if core is not None:
        lam, Uc = core.lam, core.Uc
        methods = [("cholesky", "cholesky")] * L
        core_path = "one-pass"
        # A side first: its stacks were written last and are the likeliest still in cache
        SVt = As.tall_apply(core.mat_A, transposed=True, coeffs=False)  # L tensors k x n, rows σ_i v_iᵀ
        U = Bs.tall_apply(core.mat_B, coeffs=False)  # L tensors m x k
    else:  # general path: zero columns, non-finite Grams, ill-conditioned sides (QR fallback)
        GB, GA = Bs.gram(G32[0]), As.gram(G32[1])  # the raw Grams above, not formed again
        if check_finite:
            _finite_from_grams(layers, GB, GA)
        bb = _basis_from_gram(Bs, GB, gram_tol)
        ba = _basis_from_gram(As, GA, gram_tol, need_q=False)  # L_A only: accurate small σ when X_A is ill-conditioned
        lam, Uc = _core_eigh(bb.L @ ba.L.transpose(1, 2), k)
        LtU = bb.L.transpose(1, 2) @ Uc
        methods = list(zip(bb.methods, ba.methods))
        core_path = "general"
        SVt = As.tall_apply(LtU, transposed=True)  # L tensors k x n, rows σ_i v_iᵀ (row-major: residual rights)
        U = bb.apply(Bs, Uc)  # L tensors m x k
    S = torch.sqrt(lam)  # L x R descending
    # batched over layers: 1/σ for the top rows (0 where σ = 0), S in the compute dtype, the total
    # energies (one host sync)
    top = S[:, :k_top]
    pos = top > 0
    inv = torch.where(pos, torch.reciprocal(torch.where(pos, top, torch.ones_like(top))),
                      torch.zeros_like(top)).to(dtype)
    S_out = S.to(dtype)
    energies = lam.sum(dim=1).tolist()
    out = []
    for li in range(L):
        rem = None
        if stacked_remainder:  # −US and Vᵀ written straight into the spare columns/rows
            lsp, rsp = Bs.spare(li, k), As.spare(li, k_top)
            US = torch.mul(U[li], -S_out[li, None, :k], out=lsp) if lsp is not None else U[li] * -S_out[li, None, :k]
            Vt = (torch.mul(SVt[li][:k_top], inv[li][:, None], out=rsp) if rsp is not None
                  else SVt[li][:k_top] * inv[li][:, None])
            rem = LowRank(Bs.append(li, US), As.append(li, Vt))
        else:
            Vt = SVt[li][:k_top] * inv[li][:, None]  # top rows only: the tail keeps σv
        out.append(SVDFactors(U=U[li], S=S_out[li], V=Vt.T, total_energy=energies[li],
                              solver="exact", remainder=rem, SV=None if stacked_remainder else SVt[li].T,
                              info={"basis": methods[li], "core": core_path}))
    return out


def solve_exact(inp: LayerInput, rank: int, *, dtype: torch.dtype = torch.float32,
                need_tail: bool = True, gram_tol: Optional[float] = None,
                stacked_remainder: bool = False, check_finite: bool = False,
                tuning: Optional[SolverTuning] = None, **_) -> SVDFactors:
    """Exact thin SVD of one layer's ΔW from the stacked factors (see :func:`solve_exact_batch`)."""
    return solve_exact_batch([inp], rank, dtype=dtype, need_tail=need_tail, gram_tol=gram_tol,
                             stacked_remainder=stacked_remainder, check_finite=check_finite,
                             tuning=tuning)[0]
