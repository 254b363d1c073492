"""What every method shares: the per-layer :class:`Options`, running a solver, rebuilding B, A
from an SVD, averaging factors, and :func:`finish` (the cast to the output dtype and its check)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..linalg import SOLVERS, stack_dense
from ..options import AggregateOptions, SolverTuning
from ..types import AggregationResult, LowRank, SVDFactors
from ..validate import LayerInput, _check_finite, all_finite

__all__ = ["Options", "run_solver", "rebuild", "finish", "averages", "weighted_mean", "full_lowrank"]


@dataclass(frozen=True)
class Options:
    """One layer's options as a method sees them: the call's :class:`AggregateOptions` (its fields
    read through, e.g. ``opt.split``), the rank resolved for this layer, the layer's error prefix,
    the solver tuning, and the solver this layer runs (default the call's)."""

    agg: AggregateOptions
    rank: int
    prefix: str = ""
    #: False when validation skipped the NaN/Inf scan: the exact solver reads it off its Grams,
    #: any other solver runs the scan first (see :func:`run_solver`)
    finite_checked: bool = True
    tuning: SolverTuning = field(default_factory=SolverTuning)
    solver: Optional[str] = None

    def __post_init__(self):
        if self.solver is None:
            object.__setattr__(self, "solver", self.agg.solver)

    def __getattr__(self, name):  # method, residual, split, compute_dtype, generator, ...
        if name == "agg":
            raise AttributeError(name)
        return getattr(self.agg, name)


def run_solver(inp: LayerInput, opt: Options, *, full_spectrum: bool, need_tail: bool) -> SVDFactors:
    name = opt.solver
    if name == "auto":
        name = opt.tuning.choose_solver(inp.m, inp.n, inp.R, opt.rank, need_tail=need_tail,
                                        full_spectrum=full_spectrum)
    elif name == "randomized" and full_spectrum:
        raise ValueError(f"{opt.prefix}solver='randomized' computes only the top singular values; "
                         "energy truncation (residual_energy < 1, florist) needs solver 'exact', "
                         "'dense' or 'auto'")
    extra = {"stacked_remainder": True} if (opt.residual == "stacked" and name == "exact") else {}
    if not opt.finite_checked:
        if name == "exact":
            extra["check_finite"] = True
        else:
            _check_finite(inp.B, inp.A, opt.prefix)
    return SOLVERS[name](inp, opt.rank, dtype=opt.compute_dtype, need_tail=need_tail,
                         generator=opt.generator, tuning=opt.tuning, **extra)


def fresh_rows(count: int, n: int, against: torch.Tensor, opt: Options, device) -> torch.Tensor:
    """``count`` orthonormal rows (count x n) orthogonal to the columns of ``against`` (n x k)."""
    g = opt.generator
    gdev = g.device if g is not None else torch.device("cpu")
    if g is None:
        g = torch.Generator(device=gdev)
        g.manual_seed(1)
    x = torch.randn(n, count, generator=g, device=gdev, dtype=torch.float64).to(device)
    if against.numel():
        a = against.to(torch.float64)
        for _ in range(2):  # project twice: classical Gram-Schmidt needs the re-orthogonalisation
            x = x - a @ (a.T @ x)
    q = torch.linalg.qr(x, mode="reduced").Q
    return q.T.to(opt.compute_dtype)


def split_factors(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, s: float, split: str):
    """B (m x k), A (k x n) with s·B·A = U diag(S) Vᵀ."""
    if split == "balanced":  # one pass over each big factor: the scales are folded first
        root = torch.sqrt(S)
        B = U * (root / (math.copysign(1.0, s) * math.sqrt(abs(s))))[None, :]
        A = V.T * (root / math.sqrt(abs(s)))[:, None]
    else:
        B = U * (S / s)[None, :]
        A = V.T.clone()
    return B, A


def cat_lowrank(parts: list, m: int, n: int, dtype, device) -> LowRank:
    parts = [p for p in parts if p is not None and p.rank > 0]
    if not parts:
        return LowRank.zeros(m, n, dtype=dtype, device=device)
    if len(parts) == 1:
        return parts[0]
    return LowRank(torch.cat([p.left.to(dtype) for p in parts], 1),
                   torch.cat([p.right.to(dtype) for p in parts], 0))


def rebuild(inp: LayerInput, opt: Options, svd: SVDFactors, r: int, *, residual_energy: float,
            keep_tail: bool) -> tuple[torch.Tensor, torch.Tensor, Optional[LowRank], float, float]:
    """Top-r → (B, A); the rest → residual. Returns B, A (compute dtype), residual, kept, dropped.

    Components with σ ≤ σ_max·max(m, n)·eps (numerically zero, the matrix_rank rule) are not put
    in B, A: their A rows are fresh orthonormal directions orthogonal to the kept ones and their B
    columns are zero, so B·A is unchanged and training can still use them; their (tiny) part of
    ΔW goes to the residual.
    """
    dt = opt.compute_dtype
    S64 = svd.S.to(torch.float64)
    kU = svd.U.shape[1]
    smax = float(S64[0]) if S64.numel() else 0.0
    zero_tol = smax * max(inp.m, inp.n) * torch.finfo(dt).eps
    r_eff = min(r, kU)
    nl = int((S64[:r_eff] > zero_tol).sum()) if smax > 0 else 0
    total = svd.total_energy
    top_energy = float((S64[:nl] ** 2).sum())
    B_live, A_live = split_factors(svd.U[:, :nl], svd.S[:nl].to(dt), svd.V[:, :nl], inp.out_scaling, opt.split)
    if nl < r:
        A_dead = fresh_rows(r - nl, inp.n, svd.V[:, :nl], opt, inp.device)
        B = torch.cat([B_live, torch.zeros(inp.m, r - nl, dtype=dt, device=inp.device)], 1)
        A = torch.cat([A_live, A_dead], 0)
    else:
        B, A = B_live, A_live
    kept = top_energy / total if total > 0 else 1.0
    if not keep_tail:
        dropped = max(0.0, 1.0 - kept) if total > 0 else 0.0
        return B, A, None, min(kept, 1.0), dropped
    # tail: components nl..kU-1, truncated at cumulative energy residual_energy·‖ΔW‖²
    tail_idx_end = kU
    dropped_energy = 0.0
    if residual_energy < 1.0 and total > 0:
        cum = torch.cumsum(S64 ** 2, 0)
        need = residual_energy * total
        reach = int(torch.searchsorted(cum, torch.tensor([need], dtype=torch.float64)).item()) + 1
        tail_idx_end = max(nl, min(kU, reach))
        dropped_energy = max(0.0, total - float(cum[tail_idx_end - 1])) if tail_idx_end > 0 else total
    # components with σ ≤ σ_max·eps(compute) carry nothing measurable (rank-deficient stacks)
    live_tail = int((S64[nl:tail_idx_end] > smax * torch.finfo(dt).eps).sum()) if smax > 0 else 0
    tail_idx_end = nl + live_tail
    sl = slice(nl, tail_idx_end)
    if svd.SV is not None:
        tail = LowRank(svd.U[:, sl], svd.SV[:, sl].T.contiguous())
    else:
        tail = LowRank(svd.U[:, sl] * svd.S[sl].to(dt)[None, :], svd.V[:, sl].T.contiguous())
    resid = cat_lowrank([tail, svd.remainder], inp.m, inp.n, dt, inp.device)
    dropped = dropped_energy / total if total > 0 else 0.0
    return B, A, resid, min(kept, 1.0), dropped


def _check_outputs(inp: LayerInput, opt: Options, parts) -> None:
    """ValueError when an output has NaN/Inf entries (``validate.all_finite``: one sum per tensor)."""
    for what, t in parts:
        if t is None or t.numel() == 0 or all_finite(t):
            continue
        if t.dtype != opt.compute_dtype:  # the cast to the output dtype overflowed
            wider = {torch.float16: "torch.float32 (or torch.bfloat16, which has float32's range)",
                     torch.bfloat16: "torch.float32", torch.float32: "torch.float64"}.get(t.dtype, "a wider dtype")
            fix = (f"its largest finite value is {torch.finfo(t.dtype).max:.4g}: cast the clients' "
                   f"factors to {wider} (the adapter comes back in the clients' dtype), or pass a larger out_scaling (the adapter's LoRA scale s: "
                   f"B and A shrink by √s; the adapter config's lora_alpha must then match)")
            if opt.split == "left":
                fix += ", or split='balanced' (spreads σ over B and A instead of putting it all in B)"
            raise ValueError(f"{opt.prefix}the aggregated adapter overflows the output dtype "
                             f"{t.dtype}: {what} has {int((~torch.isfinite(t)).sum())} non-finite "
                             f"entries after the cast; {fix}")
        raise ValueError(f"{opt.prefix}the aggregation produced non-finite entries in "
                         f"{what} in the compute dtype {opt.compute_dtype}; pass "
                         f"compute_dtype=torch.float64, or rescale the clients' factors")


def finish(inp: LayerInput, opt: Options, *, B, A, residual, sv, kept, dropped, method, solver,
           exact, info=None) -> AggregationResult:
    """The result: B and A cast to the input dtype, the residual kept unless ``residual="none"``.
    Raises ValueError (naming the layer, the dtype and the remedy) when B or A is not finite after
    the cast, or the spectrum is not: nothing with NaN/Inf is returned."""
    out_B = None if B is None else B.to(inp.dtype).contiguous()
    out_A = A.to(inp.dtype).contiguous()
    res = residual if opt.residual != "none" else None
    # B and A are scanned after the cast (O((m+n)·r)); the residual is not cast (compute dtype) and
    # is built from finite inputs (validated) and the same finite small matrices, so a finite
    # spectrum is enough for it: scanning its (m+n)·R entries would cost a pass over the stacks
    _check_outputs(inp, opt, [("B", out_B), ("A", out_A),
                              ("the singular values", None if sv is None else sv.reshape(-1))])
    return AggregationResult(
        B=out_B, A=out_A, residual=res,
        singular_values=sv.detach().to(torch.float32).cpu() if sv is not None else torch.zeros(0),
        energy_kept=float(kept), method=method, solver=solver, out_scaling=inp.out_scaling,
        energy_dropped=float(dropped), exact=exact, info=info or {})


def weighted_mean(ts: list, ws: list, dtype, pad_cols: Optional[int] = None,
                  pad_rows: Optional[int] = None) -> torch.Tensor:
    out = None
    for t, w in zip(ts, ws):
        t = t.to(dtype)
        if pad_cols is not None and t.shape[1] < pad_cols:
            t = torch.nn.functional.pad(t, (0, pad_cols - t.shape[1]))
        if pad_rows is not None and t.shape[0] < pad_rows:
            t = torch.nn.functional.pad(t, (0, 0, 0, pad_rows - t.shape[0]))
        out = t * w if out is None else out.add_(t, alpha=w)
    return out


def averages(inp: LayerInput, opt: Options, method: str):
    """B̄ = Σ p_k (s_k/s) B_k and Ā = Σ p_k A_k, zero-padding client ranks to max r_k (HetLoRA-style)."""
    r = max(inp.ranks)
    if opt.rank != r:
        raise ValueError(f"{opt.prefix}method {method!r} averages the factors and cannot change the "
                         f"rank: rank={opt.rank} but the clients' max rank is {r}")
    dt = opt.compute_dtype
    wb = [pk * sk / inp.out_scaling for pk, sk in zip(inp.p, inp.s)]
    Bbar = weighted_mean(inp.B, wb, dt, pad_cols=r)
    Abar = weighted_mean(inp.A, inp.p, dt, pad_rows=r)
    return Bbar, Abar


def full_lowrank(inp: LayerInput, dtype) -> LowRank:
    """ΔW = Σ c_k B_k A_k as one LowRank (B_cat, A_cat), rank R (clients of weight 0 left out)."""
    Bc, Ac = stack_dense(inp, dtype)
    if Bc.shape[1] == 0:
        return LowRank.zeros(inp.m, inp.n, dtype=dtype, device=inp.device)
    return LowRank(Bc, Ac)
