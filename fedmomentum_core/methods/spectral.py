"""Methods built on the SVD of the exact ΔW: FedMomentum and FLoRIST."""
from __future__ import annotations

import torch

from ..types import AggregationResult, SVDFactors
from ..validate import LayerInput
from .common import Options, finish, rebuild, run_solver
from .registry import register_method

__all__ = ["fedmomentum", "fedmomentum_result", "florist"]


@register_method("fedmomentum", exact=True, residual="tail", batchable=True, defers_residual=True)
def fedmomentum(inp: LayerInput, opt: Options) -> AggregationResult:
    """FedMomentum (arXiv 2603.08014, 2026, "FedMomentum: Preserving LoRA Training Momentum in
    Federated Fine-Tuning").

    The exact ΔW = Σ p_k s_k B_k A_k, its SVD, the top r rebuilt as same-rank B, A (balanced split
    by default) so clients keep training them; the remaining components are the residual, merged
    into the backbone now or later. ``residual_energy`` τ < 1 reproduces the paper's three-way split
    (top r → adapter, tail up to cumulative energy τ → residual, the rest dropped).
    """
    full = opt.residual_energy < 1.0
    if full and opt.residual == "stacked":
        raise ValueError(f"{opt.prefix}residual='stacked' keeps the remainder unsplit; energy truncation "
                         "(residual_energy < 1) needs residual='factored'")
    svd = run_solver(inp, opt, full_spectrum=full, need_tail=opt.residual == "factored")
    return fedmomentum_result(inp, opt, svd)


def fedmomentum_result(inp: LayerInput, opt: Options, svd: SVDFactors) -> AggregationResult:
    """FedMomentum's result from the SVD of the layer's ΔW (the batched engine calls it too)."""
    keep_tail = opt.residual != "none"
    B, A, resid, kept, dropped = rebuild(inp, opt, svd, opt.rank,
                                         residual_energy=opt.residual_energy, keep_tail=keep_tail)
    return finish(inp, opt, B=B, A=A, residual=resid, sv=svd.S, kept=kept,
                  dropped=dropped if keep_tail else 0.0, method="fedmomentum", solver=svd.solver,
                  exact=keep_tail and dropped == 0.0)


@register_method("florist", exact=False, residual="none")
def florist(inp: LayerInput, opt: Options) -> AggregationResult:
    """FLoRIST (Ramesh et al. 2025, "FLoRIST: Singular Value Thresholding for Efficient and
    Accurate Federated Fine-Tuning of LLMs"): SVD in the stacked space, keep the smallest rank
    whose energy reaches ``tau`` (default 0.9; capped by ``rank`` when given), discard the tail.
    The returned adapter's rank is that k, so it varies by layer."""
    tau = 0.9 if opt.tau is None else opt.tau
    svd = run_solver(inp, opt, full_spectrum=True, need_tail=True)
    S64 = svd.S.to(torch.float64)
    total = svd.total_energy
    if total > 0:
        cum = torch.cumsum(S64 ** 2, 0)
        k = int(torch.searchsorted(cum, torch.tensor([tau * total], dtype=torch.float64)).item()) + 1
        k = max(1, min(k, S64.numel()))
    else:
        k = 1
    k = min(k, opt.rank)
    B, A, _, kept, dropped = rebuild(inp, opt, svd, k, residual_energy=1.0, keep_tail=False)
    return finish(inp, opt, B=B, A=A, residual=None, sv=svd.S, kept=kept, dropped=dropped,
                  method="florist", solver=svd.solver, exact=False, info={"tau": tau, "rank": k})
