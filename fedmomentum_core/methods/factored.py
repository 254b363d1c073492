"""Helpers of the factored baselines (FlexLoRA, HetLoRA, FedSVD, RoLoRA, FedRot-LoRA, ILoRA):
option checks, the shared-factor check, the SVD of a thin product and the r x r polar factor.
Nothing here allocates an m x n tensor."""
from __future__ import annotations

from collections.abc import Mapping
from numbers import Integral, Real
from typing import Optional

import torch

from ..validate import LayerInput
from .common import Options
from .registry import REQUIRED, MethodOption

__all__ = ["ROUND", "LAM", "CLIENT_RANKS", "REFERENCE", "client_ranks", "shared_factor",
           "svd_of_product", "polar", "same_ranks"]


def _round(v):
    if isinstance(v, bool) or not isinstance(v, Integral) or int(v) < 0:
        raise ValueError(f"must be an int >= 0 (the federated round being aggregated), got {v!r}")
    return int(v)


def _lam(v):
    if isinstance(v, bool) or not isinstance(v, Real) or not (0.0 <= float(v) <= 1.0):
        raise ValueError(f"must be a number in [0, 1] (0: no rotation, 1: the full Procrustes "
                         f"rotation), got {v!r}")
    return float(v)


def _ranks(v):
    if isinstance(v, (str, bytes, torch.Tensor)) or not hasattr(v, "__iter__"):
        raise TypeError(f"must be a sequence of K ints (one rank per client), got {type(v).__name__}")
    out = []
    for k, x in enumerate(v):
        if isinstance(x, bool) or not isinstance(x, Integral) or int(x) < 1:
            raise ValueError(f"client {k}'s rank must be an int >= 1, got {x!r}")
        out.append(int(x))
    return tuple(out)


def _reference(v):
    if isinstance(v, Mapping):
        return dict(v)
    if (not isinstance(v, (tuple, list)) or len(v) != 2
            or not all(isinstance(t, torch.Tensor) and t.dim() == 2 for t in v)):
        raise TypeError("must be the previous global adapter (B_prev m x r, A_prev r x n) as a pair of "
                        "2-D tensors, or a dict layer name -> such a pair")
    return (v[0], v[1])


ROUND = MethodOption("round", "the round being aggregated, an int >= 0", default=REQUIRED, check=_round)
LAM = MethodOption("lam", "soft-rotation strength in [0, 1]", default=0.5, check=_lam)
CLIENT_RANKS = MethodOption("client_ranks", "K ints, client k's rank for the next round; None: "
                                            "each client's own rank", default=None, check=_ranks)
REFERENCE = MethodOption("reference", "the previous global adapter (B_prev, A_prev), or a dict "
                                      "layer name -> (B_prev, A_prev)", default=None, check=_reference)


def client_ranks(inp: LayerInput, opt: Options, method: str, limit: int, what: str) -> list[int]:
    """The per-client output ranks: ``client_ranks`` or each client's own; each ≤ ``limit``."""
    given = opt.method_options.get("client_ranks")
    ranks = list(inp.ranks) if given is None else list(given)
    if len(ranks) != inp.K:
        raise ValueError(f"{opt.prefix}{method}: client_ranks has {len(ranks)} entries for K = {inp.K} clients")
    for k, rk in enumerate(ranks):
        if rk > limit:
            raise ValueError(f"{opt.prefix}{method}: client {k}'s rank {rk} exceeds {what} = {limit}")
    return ranks


def same_ranks(inp: LayerInput, opt: Options, method: str, why: str) -> int:
    """The clients' common rank; ValueError when they differ or ``rank`` asks for another."""
    if len(set(inp.ranks)) != 1:
        raise ValueError(f"{opt.prefix}{method} needs one rank for all clients ({why}); got ranks {inp.ranks}")
    r = inp.ranks[0]
    if opt.rank != r:
        raise ValueError(f"{opt.prefix}{method} cannot change the rank: rank={opt.rank}, clients use {r}")
    return r


def shared_factor(inp: LayerInput, opt: Options, side: str, method: str, why: str) -> torch.Tensor:
    """Client 0's frozen factor (``side`` "A" or "B") after checking that every client holds the
    same one (rtol 1e-5, atol 1e-8, as ffa_lora); ValueError naming the client otherwise."""
    ts = inp.A if side == "A" else inp.B
    t0 = ts[0].to(torch.float32)
    for k in range(1, inp.K):
        tk = ts[k]
        if tk.shape != ts[0].shape or not torch.allclose(tk.to(torch.float32), t0, rtol=1e-5, atol=1e-8):
            diff = float((tk.to(torch.float32) - t0).abs().max()) if tk.shape == t0.shape else float("nan")
            raise ValueError(f"{opt.prefix}{method} needs one frozen {side} shared by all clients ({why}), "
                             f"but client {k}'s {side} (shape {tuple(tk.shape)}) differs from client 0's "
                             f"(shape {tuple(t0.shape)}, max abs difference {diff:.3g})")
    return ts[0]


def svd_of_product(L: torch.Tensor, Rt: torch.Tensor, scale: float = 1.0):
    """Thin SVD of ``scale · L @ Rt`` (L m x t, Rt t x n) without forming it: Householder QR of
    L and of Rtᵀ, the t x t core's SVD. Returns U (m x t), S (t, descending), V (n x t), all with
    orthonormal columns (t ≤ min(m, n)). Cost O((m + n) t²)."""
    Q1, R1 = torch.linalg.qr(L, mode="reduced")
    Q2, R2 = torch.linalg.qr(Rt.T, mode="reduced")
    core = (R1.to(torch.float64) @ R2.to(torch.float64).T) * scale
    Uc, S, Vch = torch.linalg.svd(core)
    dt = L.dtype
    return Q1 @ Uc.to(dt), S.to(dt), Q2 @ Vch.T.to(dt)


def polar(X: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor U Vᵀ of a square X = U Σ Vᵀ (the nearest orthogonal matrix).
    Unique when X is nonsingular; otherwise one of the nearest (still orthogonal)."""
    U, _, Vh = torch.linalg.svd(X)
    return U @ Vh


def lookup_reference(ref, inp: LayerInput, opt: Options, method: str) -> Optional[tuple]:
    """The layer's reference pair: the pair itself, or ``ref[inp.name]`` for a dict."""
    if ref is None or isinstance(ref, tuple):
        return ref
    if inp.name not in ref:
        raise ValueError(f"{opt.prefix}{method}: the reference dict has no entry for layer {inp.name!r} "
                         f"(it has {sorted(map(str, ref))[:5]}{'...' if len(ref) > 5 else ''})")
    return _reference(ref[inp.name])
