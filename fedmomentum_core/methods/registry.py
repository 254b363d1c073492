"""The method registry: name -> :class:`MethodSpec` (the function and its traits). Callers ask
traits; they never compare method names."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from ..types import AggregationResult
from ..validate import LayerInput

if TYPE_CHECKING:  # pragma: no cover
    from .common import Options

__all__ = ["METHODS", "MethodSpec", "RESIDUAL_KINDS", "get_method", "register_method"]

#: what a method's ``result.residual`` can hold (see :class:`MethodSpec`)
RESIDUAL_KINDS = ("tail", "error", "whole", "zero", "none")


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
        with torch.no_grad():  # aggregation reads its inputs; it never records autograd history
            return self.fn(inp, opt)


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
