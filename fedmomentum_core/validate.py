"""Input validation for one layer: clear errors naming the layer, the client and
expected vs given. Nothing here modifies its inputs."""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Optional, Sequence

import torch

__all__ = ["LayerInput", "validate_layer", "layer_prefix"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class LayerInput:
    """Validated one-layer input. ``p`` sums to 1; clients with p_k == 0 are kept (callers may skip them)."""

    B: list[torch.Tensor]
    A: list[torch.Tensor]
    p: list[float]
    s: list[float]
    out_scaling: float
    m: int
    n: int
    ranks: list[int]
    dtype: torch.dtype
    device: torch.device
    name: Optional[str] = None

    @property
    def K(self) -> int:
        return len(self.B)

    @property
    def R(self) -> int:
        return sum(self.ranks)

    @property
    def coeffs(self) -> list[float]:
        """c_k = p_k s_k: ΔW = Σ_k c_k B_k A_k."""
        return [pk * sk for pk, sk in zip(self.p, self.s)]


def layer_prefix(name: Optional[str]) -> str:
    return f"layer {name!r}: " if name else ""


def _as_list(x, what: str, pre: str) -> list:
    if isinstance(x, torch.Tensor):
        raise TypeError(f"{pre}{what} must be a sequence of K tensors (one per client), got a single "
                        f"tensor of shape {tuple(x.shape)}")
    try:
        return list(x)
    except TypeError:
        raise TypeError(f"{pre}{what} must be a sequence of tensors, got {type(x).__name__}") from None


def _numbers(x, K: int, what: str, pre: str) -> list[float]:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().reshape(-1).tolist() if x.dim() else float(x)
    if isinstance(x, Real) and not isinstance(x, bool):
        vals = [float(x)] * K
    else:
        try:
            vals = [float(v) for v in x]
        except TypeError:
            raise TypeError(f"{pre}{what} must be a number or a sequence of {K} numbers, "
                            f"got {type(x).__name__}") from None
        except ValueError as e:
            raise TypeError(f"{pre}{what} must hold numbers: {e}") from None
        if len(vals) != K:
            raise ValueError(f"{pre}expected {K} {what} (one per client), got {len(vals)}")
    for k, v in enumerate(vals):
        if not math.isfinite(v):
            raise ValueError(f"{pre}{what}[{k}] (client {k}) is {v}; must be finite")
    return vals


def all_finite(t: torch.Tensor) -> bool:
    """True when no entry of ``t`` is NaN or Inf. A finite sum proves it (an Inf or NaN entry makes
    any float sum Inf or NaN) in one streaming pass, where ``isfinite(t).all()`` also writes and
    reads a mask as large as ``t`` (several times slower); only a non-finite sum (a bad entry, or
    finite entries whose sum overflows) takes the entry-wise test."""
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    return bool(torch.isfinite(t.sum(dtype=acc))) or bool(torch.isfinite(t).all())


def _check_finite(Bl: list, Al: list, pre: str) -> None:
    """NaN/Inf check. Fast path: one fp32 sum per tensor (NaN and Inf propagate through a sum);
    only when a sum is not finite is the tensor scanned entry by entry to name the culprit."""
    sums = torch.stack([t.sum(dtype=torch.float32) for t in (*Bl, *Al)])
    if bool(torch.isfinite(sums).all()):
        return
    for k, (b, a) in enumerate(zip(Bl, Al)):
        for what, t in (("B", b), ("A", a)):
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise ValueError(f"{pre}client {k}: {what} (shape {tuple(t.shape)}) has {bad} "
                                 "NaN/Inf entries")
    # a finite tensor whose fp32 sum overflowed: values near the fp32 limit are unusable anyway
    raise ValueError(f"{pre}factor entries are too large (their fp32 sum overflows); rescale the adapters")


def validate_layer(B: Sequence[torch.Tensor], A: Sequence[torch.Tensor], weights=None, *,
                   scalings=1.0, out_scaling=None, name: Optional[str] = None,
                   check_finite: bool = True) -> LayerInput:
    """Check one layer's client factors and normalise weights/scalings.

    Raises ValueError/TypeError naming the layer, the client index and expected vs given for:
    K = 0, len(A) != len(B), non-tensors, non-2-D, integer/complex dtypes, mixed dtypes, m or n
    differing across clients, B_k columns != A_k rows, zero-rank clients, tensors on different
    devices, NaN/Inf entries, negative/NaN/all-zero weights, wrong number of weights/scalings.
    """
    pre = layer_prefix(name)
    Bl = _as_list(B, "B", pre)
    Al = _as_list(A, "A", pre)
    if len(Bl) == 0:
        raise ValueError(f"{pre}no clients: B and A must hold at least one tensor each (K = 0)")
    if len(Bl) != len(Al):
        raise ValueError(f"{pre}len(B) = {len(Bl)} but len(A) = {len(Al)}: one B and one A per client")
    K = len(Bl)
    ref_dtype = ref_device = None
    m = n = None
    ranks = []
    for k, (b, a) in enumerate(zip(Bl, Al)):
        for what, t in (("B", b), ("A", a)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{pre}client {k}: {what} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"{pre}client {k}: {what} has dtype {t.dtype}; expected one of "
                                "float16, bfloat16, float32, float64")
            if t.dim() != 2:
                raise ValueError(f"{pre}client {k}: {what} must be 2-D, got shape {tuple(t.shape)}")
            if ref_dtype is None:
                ref_dtype, ref_device = t.dtype, t.device
            if t.dtype != ref_dtype:
                raise TypeError(f"{pre}client {k}: {what} has dtype {t.dtype}, expected {ref_dtype} "
                                "(the dtype of client 0's B); cast all clients to one dtype")
            if t.device != ref_device:
                raise ValueError(f"{pre}client {k}: {what} is on {t.device}, expected {ref_device} "
                                 "(all factors must be on one device)")
        if m is None:
            m, n = int(b.shape[0]), int(a.shape[1])
        if b.shape[0] != m:
            raise ValueError(f"{pre}client {k}: B has {b.shape[0]} rows, expected m = {m} "
                             f"(B shape {tuple(b.shape)}; client 0's B has {m} rows)")
        if a.shape[1] != n:
            raise ValueError(f"{pre}client {k}: A has {a.shape[1]} columns, expected n = {n} "
                             f"(A shape {tuple(a.shape)}; client 0's A has {n} columns)")
        if b.shape[1] != a.shape[0]:
            raise ValueError(f"{pre}client {k}: B has {b.shape[1]} columns but A has {a.shape[0]} rows "
                             f"(B {tuple(b.shape)}, A {tuple(a.shape)}): the LoRA rank must match")
        if b.shape[1] < 1:
            raise ValueError(f"{pre}client {k}: LoRA rank is 0 (B {tuple(b.shape)}); rank must be >= 1")
        if m == 0 or n == 0:
            raise ValueError(f"{pre}client {k}: empty layer shape {m} x {n}")
        ranks.append(int(b.shape[1]))
    if check_finite:
        _check_finite(Bl, Al, pre)

    if weights is None:
        w = [1.0] * K
    else:
        w = _numbers(weights, K, "weights", pre)
    for k, v in enumerate(w):
        if v < 0:
            raise ValueError(f"{pre}weights[{k}] (client {k}) is {v}; weights must be >= 0")
    total = sum(w)
    if not math.isfinite(total):
        raise ValueError(f"{pre}the weights' sum overflows float64 (largest weight {max(w):.6g}, "
                         f"K = {K}); rescale the weights (only their ratios matter), e.g. divide "
                         "them all by the largest")
    if total <= 0:
        raise ValueError(f"{pre}all weights are zero; at least one client needs a positive weight")
    p = [v / total for v in w]
    s = _numbers(scalings, K, "scalings", pre)
    if out_scaling is None:
        if any(abs(v - s[0]) > 1e-12 * max(1.0, abs(s[0])) for v in s):
            raise ValueError(f"{pre}clients use different LoRA scalings {s}; pass out_scaling= "
                             "(the scale s of the returned adapter)")
        out_s = s[0]
    else:
        out_s = float(out_scaling)
    if not math.isfinite(out_s) or out_s == 0:
        raise ValueError(f"{pre}out_scaling must be finite and non-zero, got {out_s}")
    return LayerInput(B=Bl, A=Al, p=p, s=s, out_scaling=out_s, m=m, n=n, ranks=ranks,
                      dtype=ref_dtype, device=ref_device, name=name)
