"""The model-level engine: aggregate every module of a plan, one module's client factors at a time.

Pure torch: no PEFT, Flower or file I/O. A binding (``fedmomentum.peft``) turns its inputs into
:class:`LayerSpec` s (one per adapted module: shape, per-client ranks and scalings) and supplies
loaders; this module runs them and returns :class:`ModuleResult` s and a :class:`ModelAggregation`.

* :class:`LayerSpec` — the generic part of a module: name, kind, ``m x n`` of ΔW' = B @ A, the
  client ranks and scalings. A binding subclasses it (adding its key names) and overrides
  :meth:`LayerSpec.out_keys` to name the output tensors in its format.
* :func:`aggregate_module` — one module given its K client factors (the method's result, the
  residual turned into the base weight's orientation, a :class:`ModuleReport`).
* :func:`run_plan` — every module of a plan with any tensor loader, per-module callback
  (streaming), ``max_memory`` budget (:func:`check_budget`) and optional profiling; non-LoRA
  tensors averaged with p_k (:func:`average_tensors`).
* :class:`ModelAggregation` / :func:`format_report` — the result and its table.

Orientation: ΔW' = Σ_k p_k s_k B_k A_k is m x n; the base weight is ΔW' (``kind == "linear"``) or
ΔW'ᵀ (any other kind: GPT-2 Conv1D, Embedding). Residuals are returned in the base weight's
orientation, so merging is always ``weight += left @ right``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch

from . import profiling as _profiling
from .methods import aggregate_layer, get_method
from .planner import choose_solver
from .solvers import release_workspace as _release_workspace
from .types import LowRank

__all__ = [
    "LayerSpec", "ModuleReport", "ModuleResult", "ModelAggregation", "format_report",
    "module_out_scaling", "aggregate_module", "run_plan", "check_budget", "average_tensors",
    "check_method_residual", "FactorLoader", "TensorLoader",
]


@dataclass(frozen=True)
class LayerSpec:
    """One adapted module across the K clients (shapes and scalings only; no tensors)."""

    name: str                 #: the module's name (used in reports, errors and output keys)
    kind: str                 #: "linear" (base weight is ΔW'), anything else: the weight is ΔW'ᵀ
    m: int                    #: rows of ΔW' = B @ A
    n: int                    #: columns of ΔW'
    ranks: tuple[int, ...]    #: r_k per client
    scalings: tuple[float, ...]  #: s_k per client

    @property
    def transpose(self) -> bool:
        """True when the base weight is ΔW'ᵀ (Conv1D fan_in_fan_out, Embedding)."""
        return self.kind != "linear"

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.n, self.m) if self.transpose else (self.m, self.n)

    def out_keys(self) -> tuple[str, str]:
        """(A key, B key) of the output tensors; bindings override it with their format's names."""
        return f"{self.name}.A", f"{self.name}.B"


# ----------------------------------------------------------------------------- results

@dataclass
class ModuleReport:
    """What happened at one module (``fedmomentum.ModelAggregation.report`` rows)."""

    name: str
    shape: tuple[int, int]      #: (m, n) of ΔW' = B @ A (lora_B rows, lora_A columns)
    ranks: tuple[int, ...]      #: per client
    rank: int                   #: output rank
    solver: str
    seconds: float              #: aggregation time (excludes reading the factors)
    energy_kept: float          #: ‖top-r‖² / ‖ΔW‖² (nan for methods that do not compute it)
    method: str = "fedmomentum"
    kind: str = "linear"
    out_scaling: float = 1.0
    residual_rank: int = 0      #: 0 when there is none or it was discarded
    residual: str = "factored"  #: "factored", "discarded" (energy in energy_dropped) or "none"
    energy_dropped: float = 0.0
    exact: bool = True
    read_seconds: float = 0.0   #: time to load this module's client factors
    info: dict = field(default_factory=dict)
    #: with ``profile=True`` (see :mod:`fedmomentum_core.profiling`): modelled FLOPs, bytes read +
    #: written, and the peak memory growth while this module was read and aggregated; else None
    flops: Optional[float] = None
    bytes: Optional[int] = None
    peak_memory_bytes: Optional[int] = None


@dataclass
class ModuleResult:
    """:func:`aggregate_module`'s output for one module."""

    tensors: dict[str, torch.Tensor]   #: saved-form adapter keys -> new factors (input dtype)
    residual: Optional[LowRank]        #: base-weight orientation, scalings included
    report: ModuleReport
    out_alpha: float
    out_use_rslora: bool


@dataclass
class ModelAggregation:
    """A model-level aggregation (``fedmomentum.aggregate`` / ``fedmomentum.peft.aggregate_adapters``).

    Attributes:
        state_dict: the new adapter in PEFT saved key names (``…lora_A.weight``/``…lora_B.weight``,
            ``…lora_embedding_A/B``) plus the averaged non-LoRA tensors, in the input dtype: what
            ``set_peft_model_state_dict`` / ``save_pretrained`` expect. ``fedsa_lora`` gives A only.
        residuals: module path -> :class:`LowRank` in the orientation of that base module's
            ``weight`` (merge with ``weight += left @ right``), scalings included, compute dtype
            (fp32 by default). Empty when the residual was discarded or the method has none.
        report: one :class:`ModuleReport` per module, in module order.
        config: the output adapter_config fields (r, lora_alpha, use_rslora, rank_pattern,
            alpha_pattern, target_modules, … copied from client 0 otherwise).
        method: the method used; ``residual_mode``: "factored", "discarded" or "none".
    """

    state_dict: dict[str, torch.Tensor]
    residuals: dict[str, LowRank]
    report: list[ModuleReport]
    config: dict
    method: str = "fedmomentum"
    residual_mode: str = "factored"
    seconds: float = 0.0
    profile: bool = False
    #: input keys deliberately not carried over (e.g. frozen base-layer copies)
    skipped_keys: list = field(default_factory=list)

    def summary(self) -> str:
        """The closing table the CLI prints."""
        return format_report(self)


def format_report(agg: ModelAggregation, max_rows: int = 60) -> str:
    """A plain-text table of the per-module report (first ``max_rows`` rows and a total line)."""
    rows = agg.report
    head = f"{'module':<52} {'m x n':>12} {'ranks':>12} {'r':>4} {'solver':>10} {'res.r':>5} {'kept':>8} {'ms':>8}"
    lines = [head, "-" * len(head)]
    for rep in rows[:max_rows]:
        name = rep.name if len(rep.name) <= 52 else "…" + rep.name[-51:]
        ranks = ",".join(str(r) for r in rep.ranks) if len(set(rep.ranks)) > 1 else f"{len(rep.ranks)}x{rep.ranks[0]}"
        kept = "-" if rep.energy_kept != rep.energy_kept else f"{rep.energy_kept:.4f}"
        lines.append(f"{name:<52} {f'{rep.shape[0]}x{rep.shape[1]}':>12} {ranks:>12} {rep.rank:>4} "
                     f"{rep.solver:>10} {rep.residual_rank:>5} {kept:>8} {1e3 * rep.seconds:>8.1f}")
    if len(rows) > max_rows:
        lines.append(f"… {len(rows) - max_rows} more modules")
    tot = sum(r.seconds for r in rows)
    rd = sum(r.read_seconds for r in rows)
    dropped = [r.energy_dropped for r in rows if r.energy_dropped == r.energy_dropped and r.energy_dropped > 0]
    lines.append(f"{len(rows)} modules, method {agg.method}, residual {agg.residual_mode}: "
                 f"{tot:.3f} s aggregating, {rd:.3f} s reading"
                 + (f"; max energy dropped {max(dropped):.3g}" if dropped else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- one module

def module_out_scaling(spec: LayerSpec, p: Sequence[float]) -> float:
    """The output scale s at a module: the clients' common s_k, else the p-weighted mean Σ p_k s_k."""
    s = spec.scalings
    if all(abs(v - s[0]) <= 1e-12 * max(1.0, abs(s[0])) for v in s):
        return float(s[0])
    return float(sum(pk * sk for pk, sk in zip(p, s)))


def aggregate_module(spec: LayerSpec, B: Sequence[torch.Tensor], A: Sequence[torch.Tensor],
                     p: Sequence[float], *, rank: Optional[int] = None, method: str = "fedmomentum",
                     solver: str = "auto", residual: str = "factored", out_use_rslora: bool = False,
                     clients: Optional[Sequence[str]] = None, read_seconds: float = 0.0,
                     **layer_kwargs) -> ModuleResult:
    """Aggregate one module given its K client factors (lora_B, lora_A as stored by PEFT).

    ``rank`` None keeps max r_k; ``residual`` "factored" keeps the tail, "none" drops it (reported
    as "discarded" with its energy for fedmomentum). The output scaling is the clients' common s_k
    or, when they differ, Σ p_k s_k (a scale of B·A only: the product s·B·A is what is aggregated);
    the returned ``out_alpha`` is s·r (s·√r with ``out_use_rslora``). Errors from the layer are
    re-raised as ValueError/TypeError naming the module and the clients' names.
    """
    out_s = module_out_scaling(spec, p)
    r = rank if rank is not None else max(spec.ranks)
    try:
        res = aggregate_layer(list(B), list(A), list(p), rank=r, scalings=list(spec.scalings),
                              out_scaling=out_s, method=method, solver=solver, residual=residual,
                              name=spec.name, **layer_kwargs)
    except (ValueError, TypeError) as e:
        msg = str(e)
        if clients is not None:
            for k in sorted(range(len(clients)), reverse=True):  # "client 10" before "client 1"
                msg = msg.replace(f"client {k}", f"client {k} ({clients[k]})")
        raise type(e)(msg) from None
    a_key, b_key = spec.out_keys()
    tensors = {a_key: res.A}
    if res.B is not None:
        tensors[b_key] = res.B
    resid = res.residual
    if resid is not None and resid.rank == 0:
        resid = None
    if resid is not None and spec.transpose:
        resid = LowRank(resid.right.T.contiguous(), resid.left.T.contiguous())
    traits = get_method(method)
    if residual == "none":
        mode = "discarded" if traits.residual != "none" else "none"
    else:
        mode = "factored" if resid is not None else "none"
    dropped = float(res.energy_dropped)
    if mode == "discarded" and traits.residual == "tail" and res.energy_kept == res.energy_kept:
        dropped = max(0.0, 1.0 - float(res.energy_kept))  # the whole tail was dropped
    r_out = res.rank
    alpha = out_s * (math.sqrt(r_out) if out_use_rslora else r_out)
    rep = ModuleReport(name=spec.name, shape=(spec.m, spec.n), ranks=spec.ranks, rank=r_out,
                       solver=res.solver, seconds=float(res.info.get("seconds", 0.0)),
                       energy_kept=float(res.energy_kept), method=method, kind=spec.kind,
                       out_scaling=out_s, residual_rank=0 if resid is None else resid.rank,
                       residual=mode, energy_dropped=dropped, exact=bool(res.exact),
                       read_seconds=read_seconds,
                       info={k: v for k, v in res.info.items() if k != "seconds"})
    return ModuleResult(tensors, resid, rep, alpha, out_use_rslora)


# ----------------------------------------------------------------------------- the loop

FactorLoader = Callable[[LayerSpec], tuple[list[torch.Tensor], list[torch.Tensor]]]
TensorLoader = Callable[[str], list[torch.Tensor]]


def check_method_residual(method: str, residual: str) -> None:
    """ValueError for an unknown method or a residual mode other than "factored"/"none"."""
    get_method(method)
    if residual not in ("factored", "none"):
        raise ValueError(f"residual must be 'factored' or 'none', got {residual!r}")


def run_plan(plan: Any, load_factors: FactorLoader, load_other: Optional[TensorLoader] = None, *,
             rank: Optional[int] = None, method: str = "fedmomentum", solver: str = "auto",
             residual: str = "factored", progress: bool = False, profile: bool = False,
             on_module: Optional[Callable[[ModuleResult], None]] = None, keep_residuals: bool = True,
             max_memory: Union[str, int, None] = None, out_use_rslora: bool = False,
             make_config: Optional[Callable[[Sequence[ModuleResult]], dict]] = None,
             **layer_kwargs) -> ModelAggregation:
    """Aggregate every module of ``plan``, loading one module's client factors at a time.

    ``plan`` has ``modules`` (:class:`LayerSpec` s), ``p`` (normalised weights), ``clients``
    (names for errors), ``other_keys`` (per client, the non-LoRA keys to average) and
    ``skipped_keys``. ``make_config(results)`` builds the result's ``config`` from the module
    results (residuals already dropped; empty dict when not given): the binding that knows the
    adapter format supplies it. ``out_use_rslora``: output alpha = s·√r instead of s·r.

    ``load_factors(spec)`` returns ``(B_list, A_list)`` for that module (lora_B, lora_A per client);
    ``load_other(key)`` the K tensors of a non-LoRA key (averaged with p_k). ``on_module`` sees each
    :class:`ModuleResult` as it is produced (e.g. to stream or merge its residual at once);
    ``keep_residuals=False`` then drops each residual after ``on_module`` (memory: one module). With
    ``progress`` a tqdm bar runs over the modules; ``profile`` adds per-module read time and byte
    counts to :class:`ModuleReport.info` (the report is stored either way) and fills the
    report's ``flops``, ``bytes`` and ``peak_memory_bytes`` (:mod:`fedmomentum_core.profiling`).
    ``max_memory`` (e.g. ``"2GB"``) is a budget for the memory this call holds on top of its
    inputs' storage: one module's factors and work at a time plus the outputs kept until the end;
    it is checked from the shapes before anything is read (ValueError naming the module that
    cannot fit, or saying that the kept outputs alone exceed it).
    """
    check_method_residual(method, residual)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
        raise TypeError(f"rank must be an int or None, got {type(rank).__name__}")
    if max_memory is not None:
        check_budget(plan.modules, max_memory, rank=rank, solver=solver, residual=residual)
    out_rs = bool(out_use_rslora)
    t_all = time.perf_counter()
    it: Iterable[LayerSpec] = plan.modules
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(plan.modules, desc=f"aggregate ({method})", unit="module")
        it = bar
    results: list[ModuleResult] = []
    state: dict[str, torch.Tensor] = {}
    residuals: dict[str, LowRank] = {}
    try:
        for spec in it:
            pm = _profiling.PeakMemory("cpu") if profile else contextlib.nullcontext()
            with pm:
                t0 = time.perf_counter()
                B, A = load_factors(spec)
                t_read = time.perf_counter() - t0
                res = aggregate_module(spec, B, A, plan.p, rank=rank, method=method, solver=solver,
                                       residual=residual, out_use_rslora=out_rs, clients=plan.clients,
                                       read_seconds=t_read, **layer_kwargs)
            if profile:
                res.report.info["input_bytes"] = sum(t.numel() * t.element_size() for t in list(B) + list(A))
                res.report.info["residual_bytes"] = 0 if res.residual is None else res.residual.nbytes
                _attach_profile(res.report, B[0].element_size() if len(B) else 4, pm.delta_bytes,
                                residual == "factored")
            del B, A
            if max_memory is not None:  # a kept scratch buffer is not in the next module's estimate
                _release_workspace()
            state.update(res.tensors)
            if res.residual is not None and keep_residuals:
                residuals[spec.name] = res.residual
            if on_module is not None:
                on_module(res)
            # kept once, in ``residuals``; the callback's object is never changed after the call
            results.append(dataclasses.replace(res, residual=None))
    finally:
        if bar is not None:
            bar.close()
    if plan.other_keys and plan.other_keys[0]:
        if load_other is None:
            raise ValueError(f"non-LoRA keys {list(plan.other_keys[0])[:3]}… need a loader")
        state.update(average_tensors(plan.other_keys[0], load_other, plan.p, plan.clients))
    mode = "factored" if residual == "factored" else "discarded"
    if residual == "factored" and not any(r.report.residual_rank for r in results):
        mode = "none"
    return ModelAggregation(state_dict=state, residuals=residuals, report=[r.report for r in results],
                            config=make_config(results) if make_config is not None else {},
                            method=method, residual_mode=mode,
                            seconds=time.perf_counter() - t_all, profile=profile,
                            skipped_keys=list(plan.skipped_keys))


def _attach_profile(rep: ModuleReport, itemsize: int, peak: int, residual: bool) -> None:
    """Fill ``rep.flops``/``bytes``/``peak_memory_bytes`` and ``rep.info["profile"]`` (the same
    record as ``fedmomentum profile`` writes per module)."""
    rec = _profiling.module_record(rep.name, rep.shape[0], rep.shape[1], rep.ranks, rep.rank,
                                   rep.solver, rep.seconds, rep.energy_kept, itemsize=itemsize,
                                   peak_memory_bytes=peak, residual=residual, kind=rep.kind)
    rep.flops, rep.bytes, rep.peak_memory_bytes = rec.flops, rec.bytes, rec.peak_memory_bytes
    rep.info["profile"] = rec.to_dict()


def average_tensors(keys: Iterable[str], load: TensorLoader, p: Sequence[float],
                    clients: Sequence[str]) -> dict[str, torch.Tensor]:
    """FedAvg of non-LoRA tensors: ``{key: Σ_k p_k t_k}`` (fp32 accumulation, input dtype out).
    TypeError/ValueError naming the client for a non-floating tensor or NaN/Inf entries."""
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        ts = load(key)
        for k, t in enumerate(ts):
            if not t.dtype.is_floating_point:
                raise TypeError(f"{clients[k]}: non-LoRA tensor {key!r} has dtype {t.dtype}; only "
                                "floating tensors can be averaged")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{clients[k]}: non-LoRA tensor {key!r} has NaN/Inf entries")
        acc = sum(pk * t.to(torch.float32) for pk, t in zip(p, ts))
        out[key] = acc.to(ts[0].dtype)
    return out


def check_budget(modules: Sequence[LayerSpec], max_memory, *, rank, solver: str, residual: str) -> None:
    """Raise ValueError when ``modules`` cannot run within ``max_memory`` bytes (estimates of
    :func:`fedmomentum_core.profiling.module_memory_bytes`, fp32 factors assumed: conservative)."""
    budget = _profiling.parse_memory(max_memory)
    kept = 0
    worst, worst_name = 0, ""
    for spec in modules:
        r = rank if rank is not None else max(spec.ranks)
        R = sum(spec.ranks)
        r = max(1, min(r, spec.m, spec.n))
        s = solver if solver in ("exact", "randomized", "dense") else choose_solver(spec.m, spec.n, R, r)
        need = _profiling.module_memory_bytes(spec.m, spec.n, spec.ranks, r, s, itemsize=4)
        if need > budget:
            raise ValueError(f"module {spec.name!r} ({spec.m} x {spec.n}, R={R}) alone needs about "
                             f"{_profiling._fmt_bytes(need)} to aggregate but max_memory is "
                             f"{_profiling._fmt_bytes(budget)}; raise max_memory to at least "
                             f"{_profiling._fmt_bytes(need)}")
        if need > worst:
            worst, worst_name = need, spec.name
        kept += (spec.m + spec.n) * r * 4
        if residual == "factored":
            kept += (spec.m + spec.n) * (R + r) * 4
    if worst + kept > budget:
        raise ValueError(f"max_memory {_profiling._fmt_bytes(budget)} is too small for this round: the "
                         f"outputs kept until the end (new adapter + residuals) need about "
                         f"{_profiling._fmt_bytes(kept)} and the largest module ({worst_name}) "
                         f"{_profiling._fmt_bytes(worst)} more; raise max_memory, or discard the residual")


