"""Methods for clients of different ranks that give each client its own rank-r_k adapter:
FlexLoRA and HetLoRA. Both set ``result.info["per_client"]`` (the ``per_client`` trait): K pairs
``(B_k, A_k)``, client k's adapter for the next round (input dtype, rank r_k, LoRA scale
``result.out_scaling``); ``result.B``/``result.A`` are the global adapter of rank ``rank``."""
from __future__ import annotations

import dataclasses
import math

import torch

from ..types import AggregationResult
from ..validate import LayerInput
from .common import Options, _check_outputs, finish, rebuild, run_solver, weighted_mean
from .factored import CLIENT_RANKS, client_ranks
from .registry import register_method

__all__ = ["flexlora", "hetlora"]


def _per_client(B: torch.Tensor, A: torch.Tensor, ranks, inp: LayerInput, opt: Options, method: str):
    """K copies of the leading r_k columns of B and rows of A, in the input dtype (checked finite)."""
    outB, outA = B.to(inp.dtype), A.to(inp.dtype)
    _check_outputs(inp, opt, [(f"{method}'s per-client B", outB), (f"{method}'s per-client A", outA)])
    return [(outB[:, :rk].clone(), outA[:rk].clone()) for rk in ranks]


@register_method("flexlora", exact=False, residual="none", options=(CLIENT_RANKS,), per_client=True)
def flexlora(inp: LayerInput, opt: Options) -> AggregationResult:
    """FlexLoRA (Bai et al. 2024, "Federated Fine-tuning of Large Language Models under
    Heterogeneous Tasks and Client Resources", NeurIPS): the exact weighted ΔW = Σ p_k s_k B_k A_k,
    ONE SVD of it, and each client gets its top r_k (its own rank, or ``client_ranks``) as
    B_k = U_{r_k}Σ^½/√s, A_k = Σ^½V_{r_k}ᵀ/√s (``split`` as for fedmomentum): K truncations of one
    SVD. The SVD is the factored one of the stacked factors (``solver``), never the m x n ΔW.
    ``result.B``/``A`` are the top ``rank`` (default max r_k); the tail is dropped (no residual;
    ``energy_dropped`` is the global adapter's). A client rank above the stacked rank R (the rank
    bound of ΔW) is a ValueError.
    """
    ranks = client_ranks(inp, opt, "flexlora", min(inp.R, inp.m, inp.n), "the stacked rank R (min(R, m, n))")
    r_top = max(opt.rank, max(ranks))
    o = dataclasses.replace(opt, rank=r_top)
    svd = run_solver(inp, o, full_spectrum=False, need_tail=False)
    B, A, _, _, _ = rebuild(inp, o, svd, r_top, residual_energy=1.0, keep_tail=False)
    S64 = svd.S.to(torch.float64)
    total = svd.total_energy
    kept = min(1.0, float((S64[:opt.rank] ** 2).sum()) / total) if total > 0 else 1.0
    per = _per_client(B, A, ranks, inp, opt, "flexlora")
    return finish(inp, opt, B=B[:, :opt.rank], A=A[:opt.rank], residual=None, sv=svd.S, kept=kept,
                  dropped=max(0.0, 1.0 - kept), method="flexlora", solver=svd.solver, exact=False,
                  info={"per_client": per, "client_ranks": ranks})


def hetlora_weights(inp: LayerInput, dtype=torch.float64) -> list[float]:
    """HetLoRA's sparsity weights w_k ∝ p_k·‖s_k B_k A_k‖_F (normalised; p_k when every update is
    zero). ‖B_k A_k‖²_F = Σ (B_kᵀB_k) ⊙ (A_k A_kᵀ): two r_k x r_k Grams, never the m x n product."""
    norms = []
    for b, a, sk in zip(inp.B, inp.A, inp.s):
        b, a = b.to(dtype), a.to(dtype)
        sq = float(((b.T @ b) * (a @ a.T)).sum())
        norms.append(abs(sk) * math.sqrt(max(sq, 0.0)))
    raw = [pk * nk for pk, nk in zip(inp.p, norms)]
    tot = sum(raw)
    return [w / tot for w in raw] if tot > 0 else list(inp.p)


@register_method("hetlora", exact=False, residual="none", options=(CLIENT_RANKS,), per_client=True)
def hetlora(inp: LayerInput, opt: Options) -> AggregationResult:
    """HetLoRA (Cho et al. 2024, "Heterogeneous LoRA for Federated Fine-tuning of On-Device
    Foundation Models", EMNLP): B_k and A_k zero-padded to the largest rank r_max and averaged with
    the paper's sparsity-weighted aggregation, w_k ∝ ‖B_k A_k‖_F (times the caller's weights p_k
    and |s_k|: uniform weights and one scale give the paper's weights exactly), computed from
    r_k x r_k Grams; B̄ = Σ w_k (s_k/s) B_k, Ā = Σ w_k A_k. Client k gets the truncation
    (B̄[:, :r_k], Ā[:r_k]) (its own rank, or ``client_ranks`` ≤ r_max). Not exact (an average of
    factors); no residual. ``result.info["weights"]`` holds the w_k. The client-side rank
    self-pruning of the paper is a training-time step and not part of this aggregation.
    """
    rmax = max(inp.ranks)
    if opt.rank != rmax:
        raise ValueError(f"{opt.prefix}hetlora zero-pads to the clients' largest rank and cannot change "
                         f"it: rank={opt.rank} but the clients' max rank is {rmax}")
    ranks = client_ranks(inp, opt, "hetlora", rmax, "the padded rank (the clients' max rank)")
    w = hetlora_weights(inp)
    dt = opt.compute_dtype
    Bbar = weighted_mean(inp.B, [wk * sk / inp.out_scaling for wk, sk in zip(w, inp.s)], dt, pad_cols=rmax)
    Abar = weighted_mean(inp.A, w, dt, pad_rows=rmax)
    per = _per_client(Bbar, Abar, ranks, inp, opt, "hetlora")
    return finish(inp, opt, B=Bbar, A=Abar, residual=None, sv=None, kept=float("nan"),
                  dropped=float("nan"), method="hetlora", solver="none", exact=False,
                  info={"per_client": per, "client_ranks": ranks, "weights": w})
