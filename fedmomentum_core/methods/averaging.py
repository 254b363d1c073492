"""Methods that average the client factors: FedIT, FFA-LoRA, FedSA-LoRA, FedEx-LoRA."""
from __future__ import annotations

import torch

from ..types import AggregationResult, LowRank
from ..validate import LayerInput
from .common import Options, averages, finish, full_lowrank, weighted_mean
from .registry import register_method

__all__ = ["fedit", "ffa_lora", "fedsa_lora", "fedex_lora"]


@register_method("fedit", exact=False, residual="none")
def fedit(inp: LayerInput, opt: Options) -> AggregationResult:
    """FedIT (Zhang et al. 2024, "Towards Building the Federated GPT: Federated Instruction
    Tuning", ICASSP): B and A averaged separately, weighted by p_k. Not exact:
    Σp·B · Σp·A ≠ Σp·B·A. Clients' s_k/s is folded into B; heterogeneous ranks are zero-padded."""
    Bbar, Abar = averages(inp, opt, "fedit")
    return finish(inp, opt, B=Bbar, A=Abar, residual=None, sv=None, kept=float("nan"),
                  dropped=float("nan"), method="fedit", solver="none", exact=False)


@register_method("ffa_lora", exact=True, residual="zero", trains=("B",))
def ffa_lora(inp: LayerInput, opt: Options) -> AggregationResult:
    """FFA-LoRA (Sun et al. 2024, "Improving LoRA in Privacy-preserving Federated Learning", ICLR):
    A is frozen at a shared initialisation, only B is trained and averaged; exact because A is
    common. Raises ValueError when the clients' A differ."""
    a0 = inp.A[0].to(torch.float32)
    for k in range(1, inp.K):
        ak = inp.A[k]
        if ak.shape != inp.A[0].shape or not torch.allclose(ak.to(torch.float32), a0, rtol=1e-5, atol=1e-8):
            diff = float((ak.to(torch.float32) - a0).abs().max()) if ak.shape == a0.shape else float("nan")
            raise ValueError(f"{opt.prefix}ffa_lora needs one frozen A shared by all clients, but client "
                             f"{k}'s A (shape {tuple(ak.shape)}) differs from client 0's "
                             f"(shape {tuple(a0.shape)}, max abs difference {diff:.3g})")
    r = inp.ranks[0]
    if opt.rank != r:
        raise ValueError(f"{opt.prefix}ffa_lora keeps the shared A, so rank must be {r}, got {opt.rank}")
    dt = opt.compute_dtype
    Bbar = weighted_mean(inp.B, [pk * sk / inp.out_scaling for pk, sk in zip(inp.p, inp.s)], dt)
    return finish(inp, opt, B=Bbar, A=inp.A[0].to(dt, copy=True),  # never alias a client tensor
                  residual=LowRank.zeros(inp.m, inp.n, dtype=dt, device=inp.device), sv=None,
                  kept=1.0, dropped=0.0, method="ffa_lora", solver="none", exact=True)


@register_method("fedsa_lora", exact=False, residual="none", keeps_client_B=True)
def fedsa_lora(inp: LayerInput, opt: Options) -> AggregationResult:
    """FedSA-LoRA (Guo et al. 2025, "Selective Aggregation for Low-Rank Adaptation in Federated
    Learning", ICLR): A (general knowledge) is averaged and shared; B (client-specific) stays with
    each client, so ``B`` is None and there is no residual."""
    if len(set(inp.ranks)) != 1:
        raise ValueError(f"{opt.prefix}fedsa_lora shares A while clients keep their B, so all clients "
                         f"need one rank; got ranks {inp.ranks}")
    if opt.rank != inp.ranks[0]:
        raise ValueError(f"{opt.prefix}fedsa_lora cannot change the rank: rank={opt.rank}, "
                         f"clients use {inp.ranks[0]}")
    Abar = weighted_mean(inp.A, inp.p, opt.compute_dtype)
    return finish(inp, opt, B=None, A=Abar, residual=None, sv=None, kept=float("nan"),
                  dropped=float("nan"), method="fedsa_lora", solver="none", exact=False)


@register_method("fedex_lora", exact=True, residual="error")
def fedex_lora(inp: LayerInput, opt: Options) -> AggregationResult:
    """FedEx-LoRA (Singhal et al. 2025, "FedEx-LoRA: Exact Aggregation for Federated and Efficient
    Fine-Tuning of Foundation Models", ACL): B̄ and Ā averaged; the error ΔW − s·B̄Ā is the
    residual (kept factored: left = [B_cat | −s·B̄], right = [A_cat; Ā], rank R + r)."""
    Bbar, Abar = averages(inp, opt, "fedex_lora")
    full = full_lowrank(inp, opt.compute_dtype)
    resid = LowRank(torch.cat([full.left, -inp.out_scaling * Bbar], 1), torch.cat([full.right, Abar], 0))
    return finish(inp, opt, B=Bbar, A=Abar, residual=resid, sv=None, kept=float("nan"), dropped=0.0,
                  method="fedex_lora", solver="none", exact=True)
