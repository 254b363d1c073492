"""Methods that re-factor the aggregate into an orthonormal factor: FedSVD (orthonormal A from the
SVD of B̄A) and ILoRA (orthonormal B from the QR of ΔW), plus ILoRA's round-0 initialisation."""
from __future__ import annotations

import torch

from ..linalg import stack_dense
from ..types import AggregationResult, LowRank
from ..validate import LayerInput
from .common import Options, finish, fresh_rows, weighted_mean
from .factored import same_ranks, shared_factor, svd_of_product
from .registry import register_method

__all__ = ["fedsvd", "ilora", "ilora_init"]


@register_method("fedsvd", exact=True, residual="zero", trains=("B",))
def fedsvd(inp: LayerInput, opt: Options) -> AggregationResult:
    """FedSVD (NeurIPS 2025, "FedSVD: Adaptive Orthogonalization for Private Federated Learning
    with LoRA"): clients train B only, with one A shared by all; the server averages
    B̄ = Σ p_k (s_k/s) B_k, takes the SVD of s·B̄A = UΣVᵀ (rank ≤ r) and returns A = V_rᵀ
    (orthonormal rows: the next round's shared A) and B = U_rΣ_r/s, as FedLLM-Factory's
    ``alg/fedsvd.py`` does (``split`` is not used: the paper fixes A orthonormal). Factored: QR of
    B̄ (m x r) and of Aᵀ (n x r) and an r x r SVD, never the m x n product (FedLLM-Factory forms
    B̄@A and runs a dense SVD). Exact: s·B·A == Σ p_k s_k B_k A (zero residual). ValueError when
    the clients' A differ or their ranks do.
    """
    r = same_ranks(inp, opt, "fedsvd", "B is averaged against one shared A")
    A0 = shared_factor(inp, opt, "A", "fedsvd", "clients train B only; A is re-orthogonalised by the server")
    dt = opt.compute_dtype
    Bbar = weighted_mean(inp.B, [pk * sk / inp.out_scaling for pk, sk in zip(inp.p, inp.s)], dt)
    U, S, V = svd_of_product(Bbar, A0.to(dt), inp.out_scaling)
    B = U[:, :r] * (S[:r] / inp.out_scaling)[None, :]
    A = V[:, :r].T
    total = float((S.to(torch.float64) ** 2).sum())
    return finish(inp, opt, B=B, A=A, residual=LowRank.zeros(inp.m, inp.n, dtype=dt, device=inp.device),
                  sv=S, kept=1.0, dropped=0.0, method="fedsvd", solver="factored-qr", exact=True,
                  info={"total_energy": total})


def ilora_init(W0: torch.Tensor, rank: int, scaling: float = 1.0, *,
               compute_dtype: torch.dtype = None):
    """ILoRA's round-0 QR initialisation of one layer: W0 = QR, B = Q[:, :r], A = R[:r, :]/s and
    the new base W0 − s·B·A, so that the model (base + s·B·A) is unchanged. Only the leading r
    columns are factored: Householder QR's first r columns of Q are the QR of W0[:, :r], and
    R[:r, :] = Q_rᵀ W0 (cost O(m n r), not a full QR). The new base is m x n by nature (it *is*
    the base weight). Computes in ``compute_dtype`` (default float64 for a float64 W0, else
    float32). Returns (B m x r, A r x n, W_new), in W0's dtype.
    """
    if not isinstance(W0, torch.Tensor) or W0.dim() != 2 or not W0.dtype.is_floating_point:
        raise ValueError(f"ilora_init: W0 must be a 2-D floating tensor, got "
                         f"{getattr(W0, 'shape', type(W0).__name__)}")
    m, n = W0.shape
    if isinstance(rank, bool) or not isinstance(rank, int) or not (1 <= rank <= min(m, n)):
        raise ValueError(f"ilora_init: rank must be an int in [1, min(m, n) = {min(m, n)}], got {rank!r}")
    if not scaling or scaling != scaling:
        raise ValueError(f"ilora_init: scaling must be finite and non-zero, got {scaling}")
    if compute_dtype is None:
        compute_dtype = torch.float64 if W0.dtype == torch.float64 else torch.float32
    W = W0.to(compute_dtype)
    Q = torch.linalg.qr(W[:, :rank], mode="reduced").Q
    Rr = Q.T @ W
    W_new = W - Q @ Rr
    return (Q.to(W0.dtype), (Rr / scaling).to(W0.dtype), W_new.to(W0.dtype))


@register_method("ilora", exact=False, residual="none", init=ilora_init)
def ilora(inp: LayerInput, opt: Options) -> AggregationResult:
    """ILoRA (2025, federated LoRA with QR-based initialisation and concatenated QR aggregation for
    heterogeneous clients): concatenated QR aggregation. ΔW = Σ p_k s_k B_k A_k = QR; the new adapter is
    B = Q[:, :r] (orthonormal columns), A = R[:r, :]/s, so s·B·A = Q_r R_r. Factored: with the
    stacks ΔW = B_cat A_cat, B_cat = Q_B R_B and R_B A_cat = Q_C R_C (an R x n QR), so
    ΔW = (Q_B Q_C) R_C is a QR of ΔW (equal to LAPACK's on the dense ΔW up to the signs of paired
    columns/rows, which cancel in Q_r R_r, when ΔW's leading R columns are independent); cost
    O((m + n)R²), never m x n. Clients of any rank; ``rank`` ≤ min(m, n); when ΔW has fewer than
    r columns' worth of QR (R < r) B is completed with orthonormal columns and A with zero rows.
    The rest Q[:, r:]R[r:] is dropped (``energy_dropped``); the round-0 initialisation is
    :func:`ilora_init` (the ``init`` trait: ``METHODS["ilora"].init``).
    """
    dt = opt.compute_dtype
    r = opt.rank
    Bc, Ac = stack_dense(inp, dt)
    QB, RB = torch.linalg.qr(Bc, mode="reduced")
    QC, RC = torch.linalg.qr(RB @ Ac, mode="reduced")
    Q = QB @ QC
    k = Q.shape[1]
    RC64 = RC.to(torch.float64)
    total = float((RC64 ** 2).sum())
    kept_e = float((RC64[:r] ** 2).sum())
    B = Q[:, :r]
    A = RC[:r] / inp.out_scaling
    if k < r:  # fewer QR columns than the rank: complete B orthonormally, A with zero rows
        extra = fresh_rows(r - k, inp.m, Q, opt, inp.device).T
        B = torch.cat([B, extra], 1)
        A = torch.cat([A, torch.zeros(r - k, inp.n, dtype=dt, device=inp.device)], 0)
    kept = kept_e / total if total > 0 else 1.0
    return finish(inp, opt, B=B, A=A, residual=None, sv=None, kept=kept, dropped=max(0.0, 1.0 - kept),
                  method="ilora", solver="factored-qr", exact=False)
