"""Methods whose server step depends on the round: RoLoRA (alternating trained factor) and
FedRot-LoRA (rotational alignment towards the previous global adapter). Both take
``method_options={"round": t, ...}``."""
from __future__ import annotations

import torch

from ..types import AggregationResult, LowRank
from ..validate import LayerInput, all_finite
from .common import Options, finish, weighted_mean
from .factored import LAM, REFERENCE, ROUND, lookup_reference, polar, same_ranks, shared_factor
from .registry import register_method

__all__ = ["rolora", "fedrot_lora", "rolora_trains", "procrustes_rotation"]


def rolora_trains(round: int) -> frozenset:
    """RoLoRA's trained factor: B in odd rounds (A frozen), A in even rounds (B frozen)."""
    return frozenset({"B"}) if round % 2 == 1 else frozenset({"A"})


@register_method("rolora", exact=True, residual="zero", options=(ROUND,), trains_by_round=rolora_trains)
def rolora(inp: LayerInput, opt: Options) -> AggregationResult:
    """RoLoRA (NeurIPS 2025, "Robust Federated Finetuning of LLMs via Alternating Optimization of
    LoRA"): alternating rounds; in odd rounds clients train B with A frozen and shared, in even
    rounds A with B frozen and shared (``MethodSpec.trains_in(round)``; FedLLM-Factory's
    ``alg/rolora.py`` uses ``round % 2 == 1`` for B). The server averages the trained factor only:
    odd B̄ = Σ p_k (s_k/s) B_k with the shared A, even Ā = Σ p_k (s_k/s) A_k with the shared B.
    Exact because the other factor is common (zero residual). Needs ``method_options={"round": t}``
    (t = the round being aggregated); ValueError when the frozen factor differs across clients.
    """
    t = opt.method_options["round"]
    same_ranks(inp, opt, "rolora", "one factor is shared")
    dt = opt.compute_dtype
    c = [pk * sk / inp.out_scaling for pk, sk in zip(inp.p, inp.s)]
    why = f"round {t} trains {'B' if t % 2 else 'A'} only"
    if t % 2 == 1:
        A = shared_factor(inp, opt, "A", "rolora", why).to(dt, copy=True)
        B = weighted_mean(inp.B, c, dt)
    else:
        B = shared_factor(inp, opt, "B", "rolora", why).to(dt, copy=True)
        A = weighted_mean(inp.A, c, dt)
    return finish(inp, opt, B=B, A=A, residual=LowRank.zeros(inp.m, inp.n, dtype=dt, device=inp.device),
                  sv=None, kept=1.0, dropped=0.0, method="rolora", solver="none", exact=True,
                  info={"round": t, "trained": sorted(rolora_trains(t))})


def procrustes_rotation(M: torch.Tensor, lam: float) -> torch.Tensor:
    """The soft Procrustes rotation for cross-correlation M (r x r, fp64).

    The hard rotation R* = UVᵀ (M = UΣVᵀ) maximises tr(Rᵀ M) over orthogonal R. The soft one is
    the polar factor of (1 − λ)I + λR*: the orthogonal matrix nearest to the straight-line
    interpolation (λ = 0: I, λ = 1: R*). It is orthogonal by construction (an SVD's UVᵀ), so
    B_k R · Rᵀ A_k == B_k A_k exactly up to rounding; re-orthogonalising with QR instead would
    depend on the column order, the polar factor does not.
    """
    U, _, Vh = torch.linalg.svd(M)
    Rstar = U @ Vh
    if lam == 1.0:
        return Rstar
    if lam == 0.0:
        return torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    return polar((1.0 - lam) * eye + lam * Rstar)


def _check_reference(ref, inp: LayerInput, opt: Options, r: int):
    Bg, Ag = ref
    if tuple(Bg.shape) != (inp.m, r) or tuple(Ag.shape) != (r, inp.n):
        raise ValueError(f"{opt.prefix}fedrot_lora: the reference adapter must be B_prev {inp.m} x {r} and "
                         f"A_prev {r} x {inp.n} (the clients' shapes), got {tuple(Bg.shape)} and {tuple(Ag.shape)}")
    for what, t in (("B_prev", Bg), ("A_prev", Ag)):
        if not t.dtype.is_floating_point:
            raise TypeError(f"{opt.prefix}fedrot_lora: reference {what} has dtype {t.dtype}; expected a float dtype")
        if not all_finite(t):
            raise ValueError(f"{opt.prefix}fedrot_lora: reference {what} has NaN/Inf entries")
    return Bg.to(inp.device), Ag.to(inp.device)


def _fedrot_check(o: dict) -> None:
    if o["round"] >= 1 and o["reference"] is None:
        raise ValueError("method 'fedrot_lora' needs the option 'reference' (the previous global adapter "
                         f"(B_prev, A_prev), or a dict layer name -> pair) from round 1 on; got round "
                         f"{o['round']} and no reference (round 0 needs none: no rotation)")


@register_method("fedrot_lora", exact=False, residual="none", options=(ROUND, REFERENCE, LAM),
                 check_options=_fedrot_check)
def fedrot_lora(inp: LayerInput, opt: Options) -> AggregationResult:
    """FedRot-LoRA (2026), rotation-aligned federated LoRA aggregation: LoRA's
    factors are defined up to a rotation (B R, Rᵀ A), so clients drift into different bases and
    averaging B and A mixes them. Before averaging, each client's (B_k, A_k) is rotated towards
    the previous global adapter (B_g, A_g) by the closed-form orthogonal Procrustes solution —
    A-alignment in odd rounds (M = A_k A_gᵀ: min ‖RᵀA_k − A_g‖), B-alignment in even rounds
    (M = B_kᵀ B_g: min ‖B_k R − B_g‖), none in round 0 — softened with strength ``lam``
    (:func:`procrustes_rotation`: the polar factor of (1 − λ)I + λR*). The rotation leaves each
    s_k B_k A_k unchanged; then B̄ = Σ p_k (s_k/s) B_k R_k, Ā = Σ p_k R_kᵀ A_k. Server-side here
    (the server holds the previous global adapter). Cost O((m + n) r²) per client (r x r Grams and
    SVDs), never m x n. Not exact (an average of factors). Options: ``round`` (required),
    ``reference`` (required from round 1), ``lam`` (default 0.5). ``result.info["rotations"]``
    holds the K r x r rotations (fp64).
    """
    mo = opt.method_options
    t, lam = mo["round"], mo["lam"]
    r = same_ranks(inp, opt, "fedrot_lora", "each client is rotated towards the one reference adapter")
    dt = opt.compute_dtype
    rots = []
    Bs, As = list(inp.B), list(inp.A)
    if t >= 1:
        Bg, Ag = _check_reference(lookup_reference(mo["reference"], inp, opt, "fedrot_lora"), inp, opt, r)
        Bg64, Ag64 = Bg.to(torch.float64), Ag.to(torch.float64)
        for k in range(inp.K):
            if t % 2 == 1:
                M = inp.A[k].to(torch.float64) @ Ag64.T
            else:
                M = inp.B[k].to(torch.float64).T @ Bg64
            Rk = procrustes_rotation(M, lam)
            rots.append(Rk)
            Rd = Rk.to(dt)
            Bs[k] = inp.B[k].to(dt) @ Rd
            As[k] = Rd.T @ inp.A[k].to(dt)
    Bbar = weighted_mean(Bs, [pk * sk / inp.out_scaling for pk, sk in zip(inp.p, inp.s)], dt)
    Abar = weighted_mean(As, inp.p, dt)
    return finish(inp, opt, B=Bbar, A=Abar, residual=None, sv=None, kept=float("nan"),
                  dropped=float("nan"), method="fedrot_lora", solver="none", exact=False,
                  info={"round": t, "lam": lam, "aligned": ("A" if t % 2 else "B") if t >= 1 else None,
                        "rotations": [R.cpu() for R in rots]})
