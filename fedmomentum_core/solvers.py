"""SVD of ΔW = Σ_k c_k B_k A_k = B_cat · A_cat without forming ΔW (except ``dense``).

Every solver returns :class:`~fedmomentum_core.types.SVDFactors` in the compute dtype:
``U`` (m x k, orthonormal columns), ``S`` (k, descending), ``V`` (n x k), the total
energy ‖ΔW‖²_F, and, when the factors do not hold all of ΔW, the exact remainder.

* :func:`solve_exact`: Grams of the stacked factors (R x R), Jacobi (diagonal) equilibrated and
  Cholesky-factored, ``X = Q L`` with Q kept implicit; for well-conditioned layers both sides go
  through one batched pass (:func:`_fast_core`). Fallback: when the equilibrated Gram's Cholesky
  fails or estimates 1/κ below ``gram_tol`` (clients that share an A initialisation,
  near-duplicate clients, R > m), that side is factored with Householder QR instead
  (``torch.linalg.qr``, stable for any conditioning). Then the R x R core
  ``C = L_B L_Aᵀ = U_c Σ V_cᵀ`` (``eigh(C Cᵀ)`` in fp64) gives ``U = Q_B U_c``, ``V = Q_A V_c``.
  Cost O((m+n)R² + R³); never allocates m x n.
* :func:`solve_randomized`: range finder on ΔW·Ω = B_cat (A_cat Ω) with oversampling and
  power iterations (Halko, Martinsson & Tropp 2011), never forming ΔW; returns the top r and
  the exact remainder ΔW − U S Vᵀ in factored form (rank R + r).
* :func:`solve_dense`: forms ΔW (fused low-rank accumulation) and runs ``torch.linalg.svd``.
"""
from __future__ import annotations

import contextlib
import math
import threading
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


@contextlib.contextmanager
def _small_ops(size: int):
    """Run R x R factorisations single-threaded on CPU when R ≤ :data:`SMALL_SINGLE_THREAD`
    (off by default, see there)."""
    if size > SMALL_SINGLE_THREAD or torch.get_num_threads() == 1:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


#: R up to which the R x R factorisations run on one CPU thread. 0 (off): re-measured on a quiet
#: 2-core CPU, all threads were ~7% faster (4096², K=10, r=16: 16.1 vs 17.2 ms median; a
#: Llama-70B layer, stacked residual: 134 vs 144 ms). Kept as a knob for machines where OpenMP
#: start-up dominates the small factorisations.
SMALL_SINGLE_THREAD = 0


#: stacked rank from which a Gram is formed in two column halves (3/4 of the GEMM FLOPs)
SYMMETRIC_GRAM_MIN_R = 64


def _gram_into(x: torch.Tensor, out: torch.Tensor) -> None:
    """``out = xᵀx`` for a tall x (rows x R), using the symmetry: for R ≥ :data:`SYMMETRIC_GRAM_MIN_R`
    the top-left block and the bottom block row are two GEMMs (3/4 of the full product's FLOPs)
    and the top-right block is the transpose of the bottom-left one. Measured on the 2-core VM
    (fp32, R = 160): 8192 rows 2.6 → 2.2 ms, 28672 rows 9.2 → 8.0 ms."""
    R = x.shape[1]
    if R < SYMMETRIC_GRAM_MIN_R:
        torch.mm(x.T, x, out=out)
        return
    h = R // 2
    a = x[:, :h]
    torch.mm(a.T, a, out=out[:h, :h])
    torch.mm(x[:, h:].T, x, out=out[h:, :])
    out[:h, h:].copy_(out[h:, :h].T)


#: try the one-pass R x R stage (:func:`_fast_core`) before the general one; False: always general
FAST_CORE = True

#: keep scratch stacks between calls (:func:`_workspace`); False allocates them per call
WORKSPACE = True
#: largest stack kept between calls as scratch memory (per side, per thread): see :func:`_workspace`
WORKSPACE_MAX_BYTES = 64 * 2 ** 20
_WS = threading.local()


def _workspace(side: str, numel: int, dtype: torch.dtype, device: torch.device) -> Optional[torch.Tensor]:
    """A flat CPU buffer of ``numel`` elements for one side's stacks, reused from call to call.

    Used only where the stacks are scratch (nothing returned views them). A stack written into
    memory fresh from the kernel pays a page fault per 4 KiB (on the 2-core VM, 0.3-0.8 ms per MB:
    more than the copy itself); a buffer kept from the previous call is already mapped. At most
    :data:`WORKSPACE_MAX_BYTES` per side and thread is kept; larger requests return None (the caller
    allocates)."""
    if device.type != "cpu":
        return None
    nbytes = numel * dtype.itemsize
    if nbytes > WORKSPACE_MAX_BYTES:
        return None
    cache = getattr(_WS, "bufs", None)
    if cache is None:
        cache = _WS.bufs = {}
    key = (side, dtype)
    buf = cache.get(key)
    if buf is None or buf.numel() < numel:
        buf = cache[key] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def release_workspace() -> None:
    """Free the scratch stacks this thread keeps between calls (see :func:`_workspace`)."""
    _WS.bufs = {}


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


# ----------------------------------------------------------------------------- exact (batched)

class StackedBatch:
    """L same-shaped layers' stacked factors for one side, coefficients applied on the small side.

    ``X_l = X_raw_l · diag(c_l)`` where X_raw_l is the tall (m x R or n x R) concatenation of layer
    l's client factors (formed once, cast to the compute dtype in the same pass) and c_l the
    per-column coefficients; Grams and products scale the R x R / R x k operands by c instead of
    touching the big factors. On the Triton backend the per-client factors are read through
    pointer tables by the batched kernels instead.

    ``prescale=True`` multiplies each client's block by its coefficient while copying it (c is
    then all ones): the stacks are X itself, as the stacked remainder needs. ``extra`` allocates
    that many spare columns (left) / rows (right) after the R stacked ones in ``full``, where the
    remainder's −US / Vᵀ are written in place. ``gram=True`` (torch backend) forms each layer's
    R x R Gram right after its stack, while that stack is still in cache (:meth:`gram` returns them);
    the randomized solver, which needs no Gram, passes False. ``scratch=True`` (only where nothing
    returned views the stacks) carves them from the per-thread buffer of :func:`_workspace`.
    """

    def __init__(self, layers: list[LayerInput], side: str, coeffs: torch.Tensor, dtype: torch.dtype,
                 extra: int = 0, prescale: bool = False, gram: bool = True, scratch: bool = False,
                 gram_out: Optional[torch.Tensor] = None):
        self.side, self.dtype = side, dtype
        self.layers = layers
        self.c = coeffs  # L x R, fp64
        self.unit = False  # True once the stacks hold X itself (prescaled): c is all ones
        inp0 = layers[0]
        self.device = inp0.device
        self.rows = inp0.m if side == "left" else inp0.n
        self.R = inp0.R
        self.backend = K.select_backend(self.device)
        self.raw = None
        self.full = None
        if self.backend == "torch":
            # left: m x R per layer (interleaving copy); right: R x n (row blocks: plain memcpy),
            # used through transposed views so the A side is never transposed in memory.
            # ``extra`` spare columns/rows let the stacked remainder [X_B | −US], [X_Aᵀ; Vᵀ] be
            # written in place later (no second copy of the stacks). One buffer per layer, not one
            # L x ... block: a residual viewing layer l's stack keeps only that layer alive, and
            # buffers up to glibc's mmap threshold (32 MB) are recycled by malloc round after
            # round instead of being zero-filled afresh by the kernel (measured: 34 vs 8.5 ms for
            # 114 MB on the 2-core VM).
            cvals = coeffs.tolist() if prescale else None
            self.full, self.raw = [], []
            per = self.rows * (self.R + extra)
            flat = _workspace(side, len(layers) * per, dtype, self.device) if scratch else None
            if gram:
                self._G = gram_out if gram_out is not None else torch.empty(
                    len(layers), self.R, self.R, dtype=dtype, device=self.device)
            else:
                self._G = None
            for li, inp in enumerate(layers):
                shape = (self.rows, self.R + extra) if side == "left" else (self.R + extra, self.rows)
                if flat is not None:
                    full = flat[li * per:(li + 1) * per].view(shape)
                else:
                    full = torch.empty(shape, dtype=dtype, device=self.device)
                raw = full[:, :self.R] if side == "left" else full[:self.R]
                off = 0
                for t in (inp.B if side == "left" else inp.A):
                    w = t.shape[1] if side == "left" else t.shape[0]
                    blk = raw[:, off:off + w] if side == "left" else raw[off:off + w]
                    blk.copy_(t)
                    if prescale and cvals[li][off] != 1.0:  # scale the block while still in cache
                        blk.mul_(cvals[li][off])
                    off += w
                self.full.append(full)
                self.raw.append(raw)
                # the Gram right away, while the stack just written is still in cache (measured on
                # a Llama-70B round: faster than stacking every layer first, then the Grams)
                if gram:
                    _gram_into(self._tall(li), self._G[li])
            if prescale:  # the stacks now hold X = X_raw·diag(c): unit coefficients from here on
                self.c = torch.ones_like(coeffs)
                self.unit = True

    def _tall(self, li: int) -> torch.Tensor:
        """Layer li's raw tall stack (rows x R), a view."""
        return self.raw[li] if self.side == "left" else self.raw[li].T

    def _lists(self):
        facs = [(inp.B if self.side == "left" else inp.A) for inp in self.layers]
        return facs

    def raw_gram(self) -> torch.Tensor:
        """L x R x R Gram of the stacks as stored (coefficients not applied), compute dtype."""
        if self.raw is not None:  # formed with the stacks (2-D GEMMs: faster than bmm on CPU)
            if self._G is None:
                raise RuntimeError("StackedBatch was built with gram=False")
            return self._G
        ones = [[1.0] * inp.K for inp in self.layers]
        return K.batched_stacked_gram(self._lists(), ones, self.side, self.dtype)

    def gram(self, raw: Optional[torch.Tensor] = None) -> torch.Tensor:
        """L x R x R Gram of the weighted stack, fp64: :meth:`raw_gram` (or ``raw``, that Gram
        already formed) with the column coefficients applied."""
        G = (self.raw_gram() if raw is None else raw).to(torch.float64)
        return G if self.unit else G * self.c[:, :, None] * self.c[:, None, :]

    def tall_apply(self, mat: torch.Tensor, transposed: bool = False, coeffs: bool = True) -> list[torch.Tensor]:
        """X_l @ mat_l for every layer (mat: L x R x k, fp64) -> L tensors rows x k, compute dtype.

        ``transposed=True`` returns (X_l @ mat_l)ᵀ, k x rows: for the A side that is the layout of
        the raw R x n stack, so the product is written row-major without a transpose. One tensor
        per layer (a residual holding one of them keeps no other layer alive). ``coeffs=False``:
        ``mat`` already carries the column coefficients (it multiplies the stacks as stored)."""
        scaled = (mat if (self.unit or not coeffs) else mat * self.c[:, :, None]).to(self.dtype)
        if self.raw is not None:
            outs: list = [None] * scaled.shape[0]
            for li in reversed(range(scaled.shape[0])):  # last stacked = most likely still cached
                if transposed and self.side == "right":
                    outs[li] = scaled[li].T @ self.raw[li]
                else:
                    o = self._tall(li) @ scaled[li]
                    outs[li] = o.T if transposed else o
            return outs
        ones = [[1.0] * inp.K for inp in self.layers]
        if self.side == "left":
            out = K.batched_stacked_matmul(self._lists(), ones, "left", scaled, self.dtype)
        else:
            out = K.batched_stacked_matmul_t(self._lists(), ones, "right", scaled, self.dtype)
        return list((out.transpose(1, 2) if transposed else out).unbind(0))

    def tall_dense(self, li: int) -> torch.Tensor:
        """Layer li's weighted tall stack (rows x R), explicit (for the QR fallback)."""
        if self.raw is not None:
            return self._tall(li) * self.c[li].to(self.dtype)[None, :]
        inp = self.layers[li]
        facs = inp.B if self.side == "left" else inp.A
        ones = [1.0] * inp.K
        x = _ref._stack(facs, ones, self.side, self.dtype)
        x = x if self.side == "left" else x.T
        return x * self.c[li].to(self.dtype)[None, :]


def _column_coeffs(layers: list[LayerInput], side: str, split: str = "sqrt") -> torch.Tensor:
    """Per-column coefficients, L x R fp64, with c_B·c_A = c_k for client k's columns.

    ``split="sqrt"``: B side sign(c_k)√|c_k|, A side √|c_k|. ``split="shorter"``: the whole c_k on
    the shorter side (A when n ≤ m) and 1 on the other, so prescaled stacks copy the longer side
    without a scaling pass."""
    if split == "shorter":
        split = "right" if layers[0].n <= layers[0].m else "left"
    rows = []
    for inp in layers:
        col = []
        for c, r in zip(inp.coeffs, inp.ranks):
            if split == "sqrt":
                v = math.sqrt(abs(c))
                col += [math.copysign(v, c) if side == "left" else v] * r
            else:
                col += [c if side == split else 1.0] * r
        rows.append(col)
    return torch.tensor(rows, dtype=torch.float64, device=layers[0].device)


@dataclass
class _BatchBasis:
    """Tall X_l = Q_l L_l. Cholesky-QR: Q_l = X_l T_l implicit; QR fallback: explicit Q_l."""

    L: torch.Tensor  # L x k x R fp64 (k = R for Cholesky)
    T: Optional[torch.Tensor]  # L x R x k fp64 (None where every layer uses QR)
    Q: dict  # layer index -> explicit Q (rows x k) for the layers that fell back to QR
    methods: list

    def apply(self, st: StackedBatch, mat: torch.Tensor) -> list[torch.Tensor]:
        """Q_l @ mat_l for every layer (mat L x k x l fp64) -> L tensors rows x l."""
        if not self.Q:
            return st.tall_apply(self.T @ mat)
        out: list = [None] * mat.shape[0]
        chol = [i for i in range(mat.shape[0]) if i not in self.Q]
        if chol:
            idx = torch.tensor(chol, device=mat.device)
            sub = StackedBatch.__new__(StackedBatch)
            sub.__dict__.update(st.__dict__)
            sub.layers = [st.layers[i] for i in chol]
            sub.c = st.c[idx]
            sub.raw = [st.raw[i] for i in chol] if st.raw is not None else None
            for i, o in zip(chol, sub.tall_apply(self.T[idx] @ mat[idx])):
                out[i] = o
        for i, Q in self.Q.items():
            out[i] = Q @ mat[i, :Q.shape[1]].to(Q.dtype)
        return out


def _finite_from_grams(layers: list[LayerInput], GB: torch.Tensor, GA: torch.Tensor) -> None:
    """Raise the validation error for the first layer whose Gram diagonal is not finite."""
    from .validate import _check_finite, layer_prefix
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


def _basis_from_gram(st: StackedBatch, G: torch.Tensor, gram_tol: float, need_q: bool = True) -> _BatchBasis:
    """Cholesky-QR on the Jacobi-equilibrated Gram; Householder QR where it is ill-conditioned.

    Equilibration: Gs = D⁻¹ G D⁻¹ with D = √diag(G); all-zero columns (clients whose factor is
    zero, or weight 0) get Gs_ii = 1 and contribute nothing since L = R_x D has a zero column there.
    A layer falls back to QR when the Cholesky fails or (min R_ii / max R_ii)² < ``gram_tol``
    (an estimate of 1/κ(Gs); the loss of orthogonality of Cholesky-QR is ~eps·κ(Gs)).
    ``need_q=False``: only L is wanted (no T, and the fallback computes R alone)."""
    # (no symmetrisation: the Cholesky reads only the lower triangle; every op here is on
    # L x R x R, so each one saved counts on 70B-sized rounds)
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
            methods[i] = "qr"
    return _BatchBasis(L=Lmat, T=T, Q=Qs, methods=methods)


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


def _fast_core(Bs: StackedBatch, As: StackedBatch, G32: torch.Tensor, k: int,
               gram_tol: float) -> Optional[_Core]:
    """The R x R stage for the common case, in one batched pass over both sides; None when any
    layer needs the general path (:func:`_basis_from_gram`: an all-zero column, a non-finite Gram,
    a failed or ill-conditioned Cholesky).

    ``G32`` (2 x L x R x R) holds the Grams of the stacks as stored (B side, A side). With
    D = √diag(G) and the equilibrated Cholesky D⁻¹ G D⁻¹ = Rxᵀ Rx of each side, a stack as stored
    is ``X_raw = Q Rx D``; the weighted stack X = X_raw diag(c) = Q L with L = Rx diag(d·c). Then
    C = L_B L_Aᵀ, ``eigh(C Cᵀ) = W Λ Wᵀ``, and the two products need only
    ``U = Q_B W = X_raw,B (D_B⁻¹ Rx_B⁻¹ W)`` (a triangular solve, no explicit inverse) and
    ``S Vᵀ = Wᵀ L_B X_Aᵀ = (diag(c_A) L_Bᵀ W)ᵀ X_raw,A``: the coefficients never touch the stacks.
    Both sides share every small op (one cast, one equilibration, one batched Cholesky, one
    host sync): on the 2-core CPU the R x R stage of a 4096², R = 160 layer went from 3.3-3.8 to
    2.3-2.5 ms, most of what is left being the fp64 ``eigh`` (~1.4 ms)."""
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


def solve_exact_batch(layers: list[LayerInput], rank: int, *, dtype: torch.dtype = torch.float32,
                      need_tail: bool = True, gram_tol: Optional[float] = None,
                      stacked_remainder: bool = False, check_finite: bool = False) -> list[SVDFactors]:
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
    (:func:`_fast_core`, the common case); otherwise the general path above, per side.
    ``need_tail=False`` forms only the top ``rank`` columns. ``stacked_remainder=True`` (implies
    no tail) attaches the exact remainder ΔW − U S Vᵀ in stacked form ([X_B | −U S], [X_Aᵀ; Vᵀ],
    rank R + rank), written into spare columns/rows of the stacks: no GEMM beyond the Grams and the
    top-r products, no second copy of the stacks. Never allocates m x n.
    ``check_finite=True``: the NaN/Inf check of the inputs (when the caller validated with
    ``check_finite=False``) is read off the Grams' diagonals (NaN and Inf propagate into Σx²),
    saving a pass over the factors; a non-finite diagonal is traced to the client at fault.
    """
    if stacked_remainder:
        need_tail = False
    if gram_tol is None:
        gram_tol = 1e-9 if dtype == torch.float64 else 1e-3
    R = layers[0].R
    k_top = min(rank, R)
    extra = k_top if stacked_remainder else 0
    # stacked remainder: the stacks are X itself (prescaled), with each c_k on the shorter side only
    split = "shorter" if stacked_remainder else "sqrt"
    scratch = WORKSPACE and not stacked_remainder  # nothing returned views the stacks
    L = len(layers)
    dev = layers[0].device
    G32 = torch.empty(2, L, R, R, dtype=dtype, device=dev) if K.select_backend(dev) == "torch" else None
    Bs = StackedBatch(layers, "left", _column_coeffs(layers, "left", split), dtype, extra=extra,
                      prescale=stacked_remainder, scratch=scratch, gram_out=None if G32 is None else G32[0])
    As = StackedBatch(layers, "right", _column_coeffs(layers, "right", split), dtype, extra=extra,
                      prescale=stacked_remainder, scratch=scratch, gram_out=None if G32 is None else G32[1])
    if G32 is None:
        G32 = torch.stack((Bs.raw_gram(), As.raw_gram()))
    k = R if need_tail else k_top
    with _small_ops(R):
        core = _fast_core(Bs, As, G32, k, gram_tol) if FAST_CORE else None
    if core is not None:
        lam, Uc = core.lam, core.Uc
        methods = [("cholesky", "cholesky")] * L
        # A side first: its stacks were written last and are the likeliest still in cache
        SVt = As.tall_apply(core.mat_A, transposed=True, coeffs=False)  # L tensors k x n, rows σ_i v_iᵀ
        U = Bs.tall_apply(core.mat_B, coeffs=False)  # L tensors m x k
    else:  # general path: zero columns, non-finite Grams, ill-conditioned sides (QR fallback)
        GB, GA = Bs.gram(G32[0]), As.gram(G32[1])  # the raw Grams above, not formed again
        if check_finite:
            _finite_from_grams(layers, GB, GA)
        with _small_ops(R):
            bb = _basis_from_gram(Bs, GB, gram_tol)
            ba = _basis_from_gram(As, GA, gram_tol, need_q=False)  # L_A only: accurate small σ when X_A is ill-conditioned
        with _small_ops(R):
            Lt = bb.L.transpose(1, 2)
            lam, Uc = _core_eigh(bb.L @ ba.L.transpose(1, 2), k)
            LtU = Lt @ Uc
        methods = list(zip(bb.methods, ba.methods))
        SVt = As.tall_apply(LtU, transposed=True)  # L tensors k x n, rows σ_i v_iᵀ (row-major: residual rights)
        U = bb.apply(Bs, Uc)  # L tensors m x k
    S = torch.sqrt(lam)  # L x R descending
    inplace = stacked_remainder and Bs.full is not None and As.full is not None  # stacks pre-scaled
    # batched over layers: 1/σ for the top rows (0 where σ = 0), S and −S in the compute dtype,
    # the total energies (one host sync)
    top = S[:, :k_top]
    pos = top > 0
    inv = torch.where(pos, torch.reciprocal(torch.where(pos, top, torch.ones_like(top))),
                      torch.zeros_like(top)).to(dtype)
    S_out = S.to(dtype)
    energies = lam.sum(dim=1).tolist()
    out = []
    for li in range(len(layers)):
        rem = None
        if stacked_remainder and inplace:  # −US and Vᵀ written straight into the spare columns/rows
            left, right = Bs.full[li], As.full[li]
            torch.mul(U[li], -S_out[li, None, :k], out=left[:, R:])
            Vt = torch.mul(SVt[li][:k_top], inv[li][:, None], out=right[R:])
            rem = LowRank(left, right)
        else:
            Vt = SVt[li][:k_top] * inv[li][:, None]  # top rows only: the tail keeps σv
            if stacked_remainder:
                US = U[li] * -S_out[li, None, :k]
                rem = LowRank(torch.cat([Bs.tall_dense(li), US], 1),
                              torch.cat([As.tall_dense(li).T, Vt], 0))
        out.append(SVDFactors(U=U[li], S=S_out[li], V=Vt.T, total_energy=energies[li],
                              solver="exact", remainder=rem, SV=None if stacked_remainder else SVt[li].T,
                              info={"basis": methods[li]}))
    return out


def solve_exact(inp: LayerInput, rank: int, *, dtype: torch.dtype = torch.float32,
                need_tail: bool = True, gram_tol: Optional[float] = None,
                stacked_remainder: bool = False, check_finite: bool = False, **_) -> SVDFactors:
    """Exact thin SVD of one layer's ΔW from the stacked factors (see :func:`solve_exact_batch`)."""
    return solve_exact_batch([inp], rank, dtype=dtype, need_tail=need_tail, gram_tol=gram_tol,
                             stacked_remainder=stacked_remainder, check_finite=check_finite)[0]


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
    m, n = inp.m, inp.n
    ell = max(1, min(rank + oversample, inp.R, m, n))
    k_top = min(rank, ell)
    if K.select_backend(inp.device) == "torch":
        # stacks pre-scaled once, with spare room where the exact remainder's −US and Vᵀ go:
        # no second copy of the (large, R = Σ r_k) stacks
        split = "shorter"  # each c_k on the shorter side: no scaling pass over the longer
        Xb = StackedBatch([inp], "left", _column_coeffs([inp], "left", split), dtype, extra=k_top,
                          prescale=True, gram=False)
        Xa = StackedBatch([inp], "right", _column_coeffs([inp], "right", split), dtype, extra=k_top,
                          prescale=True, gram=False)
        Bs = As = None
        rawB, rawA = Xb.raw[0], Xa.raw[0]  # m x R, R x n
        R = inp.R
    else:
        Bs, As = stacked_pair(inp, dtype)
        R = Bs.width
    dev = inp.device
    if generator is None:
        generator = torch.Generator(device=dev)
        generator.manual_seed(0)
    gdev = generator.device

    def randn(rows, cols):
        return torch.randn(rows, cols, generator=generator, device=gdev, dtype=dtype).to(dev)

    def apply_dw(x):  # ΔW @ x, x is n x l
        if Bs is None:
            return rawB @ (rawA @ x)
        return Bs.tall_apply(As.tall_apply_t(x))

    def apply_dwt(y):  # ΔWᵀ @ y, y is m x l
        if Bs is None:
            return rawA.T @ (rawB.T @ y)
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
    if Bs is None:
        left, right = Xb.full[0], Xa.full[0]  # m x (R + k_top), (R + k_top) x n
        left[:, R:R + k].copy_(-(U * S[:k][None, :]))
        right[R:R + k].copy_(V.T)
        remainder = LowRank(left[:, :R + k], right[:R + k])
    else:
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
