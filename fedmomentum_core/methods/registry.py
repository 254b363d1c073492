"""The method registry: name -> :class:`MethodSpec` (the function and its traits). Callers ask
traits; they never compare method names."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

import torch

from ..types import AggregationResult
from ..validate import LayerInput

if TYPE_CHECKING:  # pragma: no cover
    from .common import Options

__all__ = ["METHODS", "MethodSpec", "MethodOption", "REQUIRED", "RESIDUAL_KINDS", "get_method",
           "register_method"]

#: what a method's ``result.residual`` can hold (see :class:`MethodSpec`)
RESIDUAL_KINDS = ("tail", "error", "whole", "zero", "none")


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


#: the default of a :class:`MethodOption` that the caller must give
REQUIRED: Any = _Required()


@dataclass(frozen=True)
class MethodOption:
    """One method-specific option (``aggregate_lora(..., method_options={name: value})``).

    Attributes:
        name: the key in ``method_options``.
        doc: one line: what it is and its accepted values (quoted in error messages).
        default: the value when not given; :data:`REQUIRED` when the caller must give it.
        check: ``check(value) -> normalised value``; raises ValueError/TypeError with a message
            (the method's name and the option's are added). None: accepted as given.
    """
    name: str
    doc: str
    default: Any = None
    check: Optional[Callable[[Any], Any]] = None


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
        options: the :class:`MethodOption` s the method accepts in ``method_options`` (any other
            key, or a missing required one, is a ValueError naming the method and what it accepts).
        check_options: ``check(resolved: dict) -> None``, cross-option checks (e.g. fedrot_lora
            needs ``reference`` from round 1 on); raises ValueError.
        trains_by_round: ``f(round) -> {"A"} | {"B"} | {"A", "B"}`` when the trained factor
            depends on the round (RoLoRA); ask :meth:`trains_in`.
        per_client: the result also holds one adapter per client, ``result.info["per_client"]``:
            a list of K ``(B_k, A_k)`` (input dtype, rank r_k, scale ``result.out_scaling``) that
            client k loads for the next round (FlexLoRA, HetLoRA: heterogeneous client ranks).
        init: the method's own round-0 initialisation of one layer from its base weight, or None
            (PEFT's default: B = 0): ``init(W0, rank, scaling) -> (B, A, W_new)`` with
            ``W_new + scaling·B·A == W0`` (ILoRA's QR initialisation). A training loop applies it
            once, before the first round, to the global model.
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
    options: tuple = ()
    check_options: Optional[Callable[[dict], None]] = None
    trains_by_round: Optional[Callable[[int], Any]] = None
    per_client: bool = False
    init: Optional[Callable[..., Any]] = None

    def __post_init__(self):
        if self.residual not in RESIDUAL_KINDS:
            raise ValueError(f"method {self.name!r}: residual kind must be one of {RESIDUAL_KINDS}, "
                             f"got {self.residual!r}")
        if not set(self.trains) <= {"A", "B"} or not self.trains:
            raise ValueError(f"method {self.name!r}: trains must be a non-empty subset of {{'A', 'B'}}")

    def trains_in(self, round: Optional[int] = None) -> frozenset:
        """The factors clients train in ``round`` (``trains`` unless the method alternates; an
        alternating method needs the round: ValueError without it)."""
        if self.trains_by_round is None:
            return self.trains
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise ValueError(f"method {self.name!r} alternates the trained factor by round: "
                             f"pass the round (an int >= 0), got {round!r}")
        return frozenset(self.trains_by_round(round))

    def takes(self, option: str) -> bool:
        """True when ``option`` is one of the method's :attr:`options`."""
        return any(o.name == option for o in self.options)

    def loop_options(self, round: int, reference: Optional[Mapping] = None) -> dict:
        """The options a federated loop supplies itself, for those this method takes: ``round``
        (the server round) and ``reference`` (the global adapter the round started from,
        module -> (B, A); left out when None). Empty for a method that takes neither."""
        out: dict = {}
        if self.takes("round"):
            out["round"] = int(round)
        if self.takes("reference") and reference is not None:
            out["reference"] = {n: tuple(pair) for n, pair in reference.items()}
        return out

    def resolve_options(self, given: Optional[Mapping] = None) -> Mapping:
        """``given`` checked against :attr:`options`, defaults filled in: a new dict (picklable).
        ValueError naming the method and the options it accepts for an unknown or missing one."""
        if given is None:
            given = {}
        if not isinstance(given, Mapping):
            raise TypeError(f"method_options must be a dict (option name -> value), got {type(given).__name__}")
        known = {o.name: o for o in self.options}
        accepts = (", ".join(f"{o.name!r} ({o.doc}" + (", required)" if o.default is REQUIRED else
                                                      f", default {o.default!r})") for o in self.options)
                   or "no options")
        unknown = [k for k in given if k not in known]
        if unknown:
            raise ValueError(f"method {self.name!r} does not accept the option(s) {unknown}; it accepts "
                             f"{accepts}")
        out = {}
        for name, o in known.items():
            if name not in given:
                if o.default is REQUIRED:
                    raise ValueError(f"method {self.name!r} needs the option {name!r} ({o.doc}) in "
                                     f"method_options; it accepts {accepts}")
                out[name] = o.default
                continue
            v = given[name]
            if o.check is not None and v is not None:
                try:
                    v = o.check(v)
                except (ValueError, TypeError) as e:
                    raise type(e)(f"method {self.name!r}, option {name!r}: {e}") from None
            out[name] = v
        if self.check_options is not None:
            self.check_options(out)
        return out

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
                    defers_residual: bool = False, options=(), check_options=None,
                    trains_by_round=None, per_client: bool = False, init=None):
    """Decorator adding a method and its traits to the registry under ``name``."""
    def deco(fn):
        METHODS[name] = MethodSpec(name=name, fn=fn, paper=paper or (fn.__doc__ or "").strip().split("\n")[0],
                                   exact=exact, residual=residual, keeps_client_B=keeps_client_B,
                                   trains=frozenset(trains), batchable=batchable,
                                   defers_residual=defers_residual, options=tuple(options),
                                   check_options=check_options, trains_by_round=trains_by_round,
                                   per_client=per_client, init=init)
        return fn
    return deco


def get_method(name: str) -> MethodSpec:
    """The registry entry for ``name``; a clear ValueError naming the choices otherwise."""
    spec = METHODS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return spec
