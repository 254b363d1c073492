"""Aggregation methods: one registry, one signature.

Every method takes a validated :class:`~fedmomentum_core.validate.LayerInput` and the
shared options (:class:`Options`) and returns an
:class:`~fedmomentum_core.types.AggregationResult`. Use :func:`aggregate_layer` (re-exported
as ``fedmomentum.aggregate_lora``) rather than calling them directly.

| name        | what the server does                                              | exact? |
|-------------|-------------------------------------------------------------------|--------|
| fedmomentum | exact ΔW, SVD, top-r → B, A; tail → residual                       | yes    |
| fedit       | average B and A separately                                          | no     |
| ffa_lora    | A frozen and shared; average B                                      | yes    |
| fedsa_lora  | average A only; B stays per client (B=None)                         | —      |
| flora       | the whole ΔW → residual (merged into the backbone); fresh adapter   | yes    |
| fedex_lora  | average B and A; the error ΔW − s·B̄Ā → residual                    | yes    |
| florist     | SVD of the stacked factors, keep energy ≥ tau, discard the tail     | no     |
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .planner import choose_solver
from .solvers import SOLVERS, stacked_pair
from .types import AggregationResult, LowRank, SVDFactors
from .validate import LayerInput, _check_finite, layer_prefix, validate_layer

__all__ = ["METHODS", "MethodSpec", "RESIDUAL_KINDS", "get_method", "register_method", "aggregate_layer", "aggregate_layers", "Options", "BATCH_BYTES"]

_RESIDUAL_MODES = ("factored", "stacked", "none")
_SPLITS = ("balanced", "left")
_COMPUTE = (torch.float32, torch.float64)
_SOLVER_NAMES = ("auto", "exact", "randomized", "dense")


@dataclass(frozen=True)
class Options:
    rank: int
    solver: str
    residual: str
    split: str
    compute_dtype: torch.dtype
    generator: Optional[torch.Generator]
    residual_energy: float
    tau: Optional[float]
    prefix: str
    #: False when validation skipped the NaN/Inf scan: the exact solver reads it off its Grams,
    #: any other solver runs the scan first (see :func:`_run_solver`)
    finite_checked: bool = True


@dataclass(frozen=True)
class MethodSpec:
    """One aggregation method and its traits. Callers ask these traits; they never compare
    method names.

    Attributes:
        name: registry key (``fedmomentum.METHODS[name]``).
        fn: ``fn(LayerInput, Options) -> AggregationResult``.
        paper: citation of the method's paper.
        exact: W_new + s·B·A == W_old + ΔW once the residual is merged (float tolerance).
        residual: what ``result.residual`` holds: ``"tail"`` (the SVD tail beyond rank r),
            ``"error"`` (ΔW − s·B̄Ā), ``"whole"`` (all of ΔW; the adapter restarts), ``"zero"``
            (always zero: the method is exact by construction) or ``"none"`` (no residual).
        keeps_client_B: clients keep their own B (``result.B`` is None).
        trains: the factors clients train in the next round (``{"A", "B"}`` or ``{"B"}``).
        batchable: same-shaped layers can share the batched exact engine.
        defers_residual: the residual may be kept and merged into the backbone later (every
            other method's residual is merged in the round it is produced).
    """
    name: str
    fn: Callable[..., AggregationResult]
    paper: str
    exact: bool
    residual: str
    keeps_client_B: bool = False
    trains: frozenset = frozenset({"A", "B"})
    batchable: bool = False
    defers_residual: bool = False

    def __post_init__(self):
        if self.residual not in RESIDUAL_KINDS:
            raise ValueError(f"method {self.name!r}: residual kind must be one of {RESIDUAL_KINDS}, "
                             f"got {self.residual!r}")
        if not set(self.trains) <= {"A", "B"} or not self.trains:
            raise ValueError(f"method {self.name!r}: trains must be a non-empty subset of {{'A', 'B'}}")

    @property
    def has_residual(self) -> bool:
        """True when the method can produce a non-trivial residual (dropping it loses ΔW)."""
        return self.residual in ("tail", "error", "whole")

    def __call__(self, inp: LayerInput, opt: "Options") -> AggregationResult:
        return self.fn(inp, opt)


#: what a method's ``result.residual`` can hold (see :class:`MethodSpec`)
RESIDUAL_KINDS = ("tail", "error", "whole", "zero", "none")

#: the registry: name -> :class:`MethodSpec`
METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, *, paper: str = "", exact: bool = False, residual: str = "none",
                    keeps_client_B: bool = False, trains=("A", "B"), batchable: bool = False,
                    defers_residual: bool = False):
    """Decorator adding a method and its traits to the registry under ``name``."""
    def deco(fn):
        METHODS[name] = MethodSpec(name=name, fn=fn, paper=paper or (fn.__doc__ or "").strip().split("\n")[0],
                                   exact=exact, residual=residual, keeps_client_B=keeps_client_B,
                                   trains=frozenset(trains), batchable=batchable,
                                   defers_residual=defers_residual)
        return fn
    return deco


def get_method(name: str) -> MethodSpec:
    """The registry entry for ``name``; a clear ValueError naming the choices otherwise."""
    spec = METHODS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return spec


# ----------------------------------------------------------------------------- helpers

def _run_solver(inp: LayerInput, opt: Options, *, full_spectrum: bool, need_tail: bool) -> SVDFactors:
    name = opt.solver
    if name == "auto":
        name = choose_solver(inp.m, inp.n, inp.R, opt.rank, need_tail=need_tail,
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
                         generator=opt.generator, **extra)


def _fresh_rows(count: int, n: int, against: torch.Tensor, opt: Options, device) -> torch.Tensor:
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


def _split(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, s: float, split: str):
    """B (m x k), A (k x n) with s·B·A = U diag(S) Vᵀ."""
    if split == "balanced":  # one pass over each big factor: the scales are folded first
        root = torch.sqrt(S)
        B = U * (root / (math.copysign(1.0, s) * math.sqrt(abs(s))))[None, :]
        A = V.T * (root / math.sqrt(abs(s)))[:, None]
    else:
        B = U * (S / s)[None, :]
        A = V.T.clone()
    return B, A


def _cat_lowrank(parts: list[LowRank], m: int, n: int, dtype, device) -> LowRank:
    parts = [p for p in parts if p is not None and p.rank > 0]
    if not parts:
        return LowRank.zeros(m, n, dtype=dtype, device=device)
    if len(parts) == 1:
        return parts[0]
    return LowRank(torch.cat([p.left.to(dtype) for p in parts], 1),
                   torch.cat([p.right.to(dtype) for p in parts], 0))


def _rebuild(inp: LayerInput, opt: Options, svd: SVDFactors, r: int, *, residual_energy: float,
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
    B_live, A_live = _split(svd.U[:, :nl], svd.S[:nl].to(dt), svd.V[:, :nl], inp.out_scaling, opt.split)
    if nl < r:
        A_dead = _fresh_rows(r - nl, inp.n, svd.V[:, :nl], opt, inp.device)
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
    resid = _cat_lowrank([tail, svd.remainder], inp.m, inp.n, dt, inp.device)
    dropped = dropped_energy / total if total > 0 else 0.0
    return B, A, resid, min(kept, 1.0), dropped


def _finish(inp: LayerInput, opt: Options, *, B, A, residual, sv, kept, dropped, method, solver,
            exact, info=None) -> AggregationResult:
    out_B = None if B is None else B.to(inp.dtype).contiguous()
    res = residual if opt.residual != "none" else None
    return AggregationResult(
        B=out_B, A=A.to(inp.dtype).contiguous(), residual=res,
        singular_values=sv.detach().to(torch.float32).cpu() if sv is not None else torch.zeros(0),
        energy_kept=float(kept), method=method, solver=solver, out_scaling=inp.out_scaling,
        energy_dropped=float(dropped), exact=exact, info=info or {})


def _weighted_mean(ts: list[torch.Tensor], ws: list[float], dtype, pad_cols: Optional[int] = None,
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


def _averages(inp: LayerInput, opt: Options, method: str):
    """B̄ = Σ p_k (s_k/s) B_k and Ā = Σ p_k A_k, zero-padding client ranks to max r_k (HetLoRA-style)."""
    r = max(inp.ranks)
    if opt.rank != r:
        raise ValueError(f"{opt.prefix}method {method!r} averages the factors and cannot change the "
                         f"rank: rank={opt.rank} but the clients' max rank is {r}")
    dt = opt.compute_dtype
    wb = [pk * sk / inp.out_scaling for pk, sk in zip(inp.p, inp.s)]
    Bbar = _weighted_mean(inp.B, wb, dt, pad_cols=r)
    Abar = _weighted_mean(inp.A, inp.p, dt, pad_rows=r)
    return Bbar, Abar


def _full_lowrank(inp: LayerInput, dtype) -> LowRank:
    """ΔW = Σ c_k B_k A_k as one LowRank (B_cat, A_cat), rank R."""
    Bs, As = stacked_pair(inp, dtype)
    if Bs.width == 0:
        return LowRank.zeros(inp.m, inp.n, dtype=dtype, device=inp.device)
    return LowRank(Bs.tall_dense(), As.tall_dense().T)


# ----------------------------------------------------------------------------- methods

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
    svd = _run_solver(inp, opt, full_spectrum=full, need_tail=opt.residual == "factored")
    return _fedmomentum_result(inp, opt, svd)


def _fedmomentum_result(inp: LayerInput, opt: Options, svd: SVDFactors) -> AggregationResult:
    keep_tail = opt.residual != "none"
    B, A, resid, kept, dropped = _rebuild(inp, opt, svd, opt.rank,
                                          residual_energy=opt.residual_energy, keep_tail=keep_tail)
    return _finish(inp, opt, B=B, A=A, residual=resid, sv=svd.S, kept=kept,
                   dropped=dropped if keep_tail else 0.0, method="fedmomentum", solver=svd.solver,
                   exact=keep_tail and dropped == 0.0)


@register_method("florist", exact=False, residual="none")
def florist(inp: LayerInput, opt: Options) -> AggregationResult:
    """FLoRIST (Ramesh et al. 2025, "FLoRIST: Singular Value Thresholding for Efficient and
    Accurate Federated Fine-Tuning of LLMs"): SVD in the stacked space, keep the smallest rank
    whose energy reaches ``tau`` (default 0.9; capped by ``rank`` when given), discard the tail.
    The returned adapter's rank is that k, so it varies by layer."""
    tau = 0.9 if opt.tau is None else opt.tau
    svd = _run_solver(inp, opt, full_spectrum=True, need_tail=True)
    S64 = svd.S.to(torch.float64)
    total = svd.total_energy
    if total > 0:
        cum = torch.cumsum(S64 ** 2, 0)
        k = int(torch.searchsorted(cum, torch.tensor([tau * total], dtype=torch.float64)).item()) + 1
        k = max(1, min(k, S64.numel()))
    else:
        k = 1
    k = min(k, opt.rank)
    B, A, _, kept, dropped = _rebuild(inp, opt, svd, k, residual_energy=1.0, keep_tail=False)
    return _finish(inp, opt, B=B, A=A, residual=None, sv=svd.S, kept=kept, dropped=dropped,
                   method="florist", solver=svd.solver, exact=False, info={"tau": tau, "rank": k})


@register_method("fedit", exact=False, residual="none")
def fedit(inp: LayerInput, opt: Options) -> AggregationResult:
    """FedIT (Zhang et al. 2024, "Towards Building the Federated GPT: Federated Instruction
    Tuning", ICASSP): B and A averaged separately, weighted by p_k. Not exact:
    Σp·B · Σp·A ≠ Σp·B·A. Clients' s_k/s is folded into B; heterogeneous ranks are zero-padded."""
    Bbar, Abar = _averages(inp, opt, "fedit")
    return _finish(inp, opt, B=Bbar, A=Abar, residual=None, sv=None, kept=float("nan"),
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
    Bbar = _weighted_mean(inp.B, [pk * sk / inp.out_scaling for pk, sk in zip(inp.p, inp.s)], dt)
    return _finish(inp, opt, B=Bbar, A=inp.A[0].to(dt),
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
    Abar = _weighted_mean(inp.A, inp.p, opt.compute_dtype)
    return _finish(inp, opt, B=None, A=Abar, residual=None, sv=None, kept=float("nan"),
                   dropped=float("nan"), method="fedsa_lora", solver="none", exact=False)


@register_method("flora", exact=True, residual="whole")
def flora(inp: LayerInput, opt: Options) -> AggregationResult:
    """FLoRA (Wang et al. 2024, "FLoRA: Federated Fine-Tuning Large Language Models with
    Heterogeneous Low-Rank Adaptations", NeurIPS): stack all client factors (rank R), merge the
    whole ΔW into the backbone (returned as the residual), and restart from a fresh adapter with
    PEFT's init (A kaiming-uniform(a=√5), B zero), seeded by ``generator``."""
    dt = opt.compute_dtype
    g = opt.generator
    gdev = g.device if g is not None else torch.device("cpu")
    if g is None:
        g = torch.Generator(device=gdev)
        g.manual_seed(2)
    bound = 1.0 / math.sqrt(inp.n)
    A = (torch.rand(opt.rank, inp.n, generator=g, device=gdev, dtype=dt) * 2 - 1).mul_(bound).to(inp.device)
    B = torch.zeros(inp.m, opt.rank, dtype=dt, device=inp.device)
    return _finish(inp, opt, B=B, A=A, residual=_full_lowrank(inp, dt), sv=None, kept=0.0,
                   dropped=0.0, method="flora", solver="none", exact=True)


@register_method("fedex_lora", exact=True, residual="error")
def fedex_lora(inp: LayerInput, opt: Options) -> AggregationResult:
    """FedEx-LoRA (Singhal et al. 2025, "FedEx-LoRA: Exact Aggregation for Federated and Efficient
    Fine-Tuning of Foundation Models", ACL): B̄ and Ā averaged; the error ΔW − s·B̄Ā is the
    residual (kept factored: left = [B_cat | −s·B̄], right = [A_cat; Ā], rank R + r)."""
    Bbar, Abar = _averages(inp, opt, "fedex_lora")
    full = _full_lowrank(inp, opt.compute_dtype)
    resid = LowRank(torch.cat([full.left, -inp.out_scaling * Bbar], 1), torch.cat([full.right, Abar], 0))
    return _finish(inp, opt, B=Bbar, A=Abar, residual=resid, sv=None, kept=float("nan"), dropped=0.0,
                   method="fedex_lora", solver="none", exact=True)


# ----------------------------------------------------------------------------- entry point

def _options(method, solver, residual, split, compute_dtype, residual_energy, tau, generator,
             pre: str) -> None:
    if method not in METHODS:
        raise ValueError(f"{pre}unknown method {method!r}; choose one of {sorted(METHODS)}")
    if solver not in _SOLVER_NAMES:
        raise ValueError(f"{pre}unknown solver {solver!r}; choose one of {list(_SOLVER_NAMES)}")
    if residual not in _RESIDUAL_MODES:
        raise ValueError(f"{pre}residual must be one of {list(_RESIDUAL_MODES)}, got {residual!r}")
    if split not in _SPLITS:
        raise ValueError(f"{pre}split must be one of {list(_SPLITS)}, got {split!r}")
    if compute_dtype not in _COMPUTE:
        raise TypeError(f"{pre}compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}")
    if not (0.0 < float(residual_energy) <= 1.0):
        raise ValueError(f"{pre}residual_energy must be in (0, 1], got {residual_energy}")
    if tau is not None and not (0.0 < float(tau) <= 1.0):
        raise ValueError(f"{pre}tau must be in (0, 1], got {tau}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{pre}generator must be a torch.Generator, got {type(generator).__name__}")


def _resolve_rank(rank, inp: LayerInput, pre: str) -> int:
    if rank is None:
        r = max(inp.ranks)
    else:
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise TypeError(f"{pre}rank must be an int, got {type(rank).__name__}")
        r = rank
    if r < 1:
        raise ValueError(f"{pre}rank must be >= 1, got {r}")
    if r > min(inp.m, inp.n):
        raise ValueError(f"{pre}rank {r} exceeds min(m, n) = {min(inp.m, inp.n)} for a {inp.m} x {inp.n} layer")
    return r


#: stacked-factor bytes one batched exact call may hold (the batch is split to stay under it)
BATCH_BYTES = 256 * 2 ** 20


def aggregate_layers(layers, weights=None, *, names=None, rank=None, scalings=1.0, out_scaling=None,
                     method: str = "fedmomentum", solver: str = "auto", residual: str = "factored",
                     split: str = "balanced", compute_dtype: torch.dtype = torch.float32,
                     generator: Optional[torch.Generator] = None, residual_energy: float = 1.0,
                     tau: Optional[float] = None) -> list[AggregationResult]:
    """Aggregate several layers at once; same-shaped layers share batched work.

    ``layers`` is a sequence of ``(B_list, A_list)`` pairs; ``weights``, ``scalings`` and
    ``out_scaling`` apply to every layer (for per-layer scalings call :func:`aggregate_layer`
    per layer, or group layers that share them).
    FedMomentum layers whose solver resolves to ``exact`` are grouped by (m, n, client ranks,
    dtype, device) and solved with :func:`~fedmomentum_core.solvers.solve_exact_batch` in chunks of
    at most :data:`BATCH_BYTES` of stacked factors (one GEMM per layer per step, the R x R
    factorisations batched in torch.linalg). Everything else runs layer by layer. Results are in
    input order and equal the per-layer results up to float rounding.
    """
    from .solvers import solve_exact_batch

    layers = list(layers)
    names = list(names) if names is not None else [None] * len(layers)
    if len(names) != len(layers):
        raise ValueError(f"{len(names)} names for {len(layers)} layers")
    kw = dict(rank=rank, scalings=scalings, out_scaling=out_scaling, method=method, solver=solver,
              residual=residual, split=split, compute_dtype=compute_dtype, generator=generator,
              residual_energy=residual_energy, tau=tau)
    _options(method, solver, residual, split, compute_dtype, residual_energy, tau, generator, "")
    results: list[Optional[AggregationResult]] = [None] * len(layers)
    groups: dict = {}
    prepared = []
    for i, ((B, A), nm) in enumerate(zip(layers, names)):
        pre = layer_prefix(nm)
        # the NaN/Inf check is read off the Grams in the batched exact path (no extra pass);
        # layers that go through aggregate_layer are validated in full there
        inp = validate_layer(B, A, weights, scalings=scalings, out_scaling=out_scaling, name=nm,
                             check_finite=False)
        r = _resolve_rank(rank, inp, pre)
        prepared.append((inp, r))
        batchable = METHODS[method].batchable and residual_energy >= 1.0
        if batchable:
            chosen = solver if solver != "auto" else choose_solver(
                inp.m, inp.n, inp.R, r, need_tail=residual == "factored", full_spectrum=False)
            if residual == "stacked" and residual_energy < 1.0:
                chosen = "per-layer"  # let aggregate_layer raise its clear error
            batchable = chosen == "exact"
        if batchable:
            key = (inp.m, inp.n, tuple(inp.ranks), inp.dtype, str(inp.device), r)
            groups.setdefault(key, []).append(i)
        else:
            results[i] = aggregate_layer(B, A, weights, name=nm, **kw)
    for key, idxs in groups.items():
        m, n, ranks, _, _, r = key
        per_layer = (m + n) * sum(ranks) * torch.finfo(compute_dtype).bits // 8
        chunk = max(1, BATCH_BYTES // max(1, per_layer))
        for c0 in range(0, len(idxs), chunk):
            part = idxs[c0:c0 + chunk]
            t0 = time.perf_counter()
            inps = [prepared[i][0] for i in part]
            svds = solve_exact_batch(inps, r, dtype=compute_dtype, need_tail=residual == "factored",
                                     stacked_remainder=residual == "stacked", check_finite=True)
            for i, svd in zip(part, svds):
                inp = prepared[i][0]
                opt = Options(rank=r, solver="exact", residual=residual, split=split,
                              compute_dtype=compute_dtype, generator=generator,
                              residual_energy=float(residual_energy), tau=tau,
                              prefix=layer_prefix(inp.name))
                res = _fedmomentum_result(inp, opt, svd)
                res.info["R"] = inp.R
                results[i] = res
            dt = (time.perf_counter() - t0) / len(part)
            for i in part:
                results[i].info["seconds"] = dt
                results[i].info["batched"] = len(part)
    return results  # type: ignore[return-value]


def aggregate_layer(B, A, weights=None, *, rank=None, scalings=1.0, out_scaling=None,
                    method: str = "fedmomentum", solver: str = "auto", residual: str = "factored",
                    split: str = "balanced", compute_dtype: torch.dtype = torch.float32,
                    generator: Optional[torch.Generator] = None, residual_energy: float = 1.0,
                    tau: Optional[float] = None, name: Optional[str] = None) -> AggregationResult:
    """Aggregate one layer's K client LoRA factors (see ``fedmomentum.aggregate_lora``)."""
    pre = layer_prefix(name)
    _options(method, solver, residual, split, compute_dtype, residual_energy, tau, generator, pre)
    # FedMomentum's solvers scan for NaN/Inf themselves (the exact one off its Grams, no extra pass)
    defer = METHODS[method].batchable  # the exact solver scans for NaN/Inf off its Grams
    inp = validate_layer(B, A, weights, scalings=scalings, out_scaling=out_scaling, name=name,
                         check_finite=not defer)
    r = _resolve_rank(rank, inp, pre)
    opt = Options(rank=r, solver=solver, residual=residual, split=split, compute_dtype=compute_dtype,
                  generator=generator, residual_energy=float(residual_energy), tau=tau, prefix=pre,
                  finite_checked=not defer)
    t0 = time.perf_counter()
    res = METHODS[method](inp, opt)
    res.info.setdefault("seconds", time.perf_counter() - t0)
    res.info.setdefault("R", inp.R)
    return res
