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
from .methods import BATCH_BYTES, aggregate_layer, aggregate_layers, get_method
from .validate import all_finite
from . import cost as _cost
from .linalg import release_workspace as _release_workspace
from .types import LowRank

__all__ = [
    "LayerSpec", "ModuleReport", "ModuleResult", "ModelAggregation", "format_report",
    "module_out_scaling", "aggregate_module", "aggregate_modules", "plan_batches", "run_plan", "check_budget", "average_tensors",
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
    #: methods with the ``per_client`` trait (flexlora, hetlora): K dicts, client k's own-rank
    #: factors under the same keys as ``tensors``; None otherwise
    per_client: Optional[list] = None


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
    #: methods with the ``per_client`` trait (flexlora, hetlora): K state dicts (LoRA keys only),
    #: client k's adapter of its own rank r_k per module for the next round, scale = the module's
    #: ``report.out_scaling`` (so its lora_alpha is out_scaling·r_k); empty for other methods
    per_client: list = field(default_factory=list)

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
        raise _with_client_names(e, clients) from None
    return _module_result(spec, res, out_s, method=method, residual=residual,
                          out_use_rslora=out_use_rslora, read_seconds=read_seconds)


def _with_client_names(e: Exception, clients: Optional[Sequence[str]]) -> Exception:
    """``e`` with "client k" expanded to "client k (<name>)"."""
    msg = str(e)
    if clients is not None:
        for k in sorted(range(len(clients)), reverse=True):  # "client 10" before "client 1"
            msg = msg.replace(f"client {k}", f"client {k} ({clients[k]})")
    return type(e)(msg)


def _module_result(spec: LayerSpec, res, out_s: float, *, method: str, residual: str,
                   out_use_rslora: bool, read_seconds: float) -> ModuleResult:
    """One layer's :class:`~fedmomentum_core.types.AggregationResult` as a :class:`ModuleResult`."""
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
                       info={k: v for k, v in res.info.items() if k not in _NOT_REPORTED})
    per = None
    if res.info.get("per_client") is not None:
        per = [{a_key: ak, b_key: bk} for bk, ak in res.info["per_client"]]
    return ModuleResult(tensors, resid, rep, alpha, out_use_rslora, per_client=per)


#: result.info entries that hold tensors: kept out of the (JSON) report
_NOT_REPORTED = ("seconds", "per_client", "rotations")


def aggregate_modules(specs: Sequence[LayerSpec], factors: Sequence[tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]],
                      p: Sequence[float], *, rank: Optional[int] = None, method: str = "fedmomentum",
                      solver: str = "auto", residual: str = "factored", out_use_rslora: bool = False,
                      clients: Optional[Sequence[str]] = None,
                      read_seconds: Optional[Sequence[float]] = None, **layer_kwargs) -> list[ModuleResult]:
    """Aggregate same-shaped modules in one batch with :func:`fedmomentum_core.aggregate_layers`
    (the batched by-shape engine that ``benchmarks/run_round.py`` times).

    Every spec must share ``m``, ``n``, client ranks and scalings (so one ``scalings`` /
    ``out_scaling`` applies to all); ``factors[i]`` is ``(B_list, A_list)`` of ``specs[i]``.
    Results equal :func:`aggregate_module`'s per module up to float rounding; each report's
    ``seconds`` is the batch's time divided by its size and ``info["batched"]`` the batch size.
    """
    specs = list(specs)
    if not specs:
        return []
    s0 = specs[0]
    for sp in specs[1:]:
        if (sp.m, sp.n, tuple(sp.ranks), tuple(sp.scalings)) != (s0.m, s0.n, tuple(s0.ranks), tuple(s0.scalings)):
            raise ValueError(f"aggregate_modules: module {sp.name!r} ({sp.m} x {sp.n}, ranks {sp.ranks}) "
                             f"cannot share a batch with {s0.name!r} ({s0.m} x {s0.n}, ranks {s0.ranks})")
    out_s = module_out_scaling(s0, p)
    r = rank if rank is not None else max(s0.ranks)
    try:
        layer_results = aggregate_layers([(list(B), list(A)) for B, A in factors], list(p),
                                         names=[sp.name for sp in specs], rank=r,
                                         scalings=list(s0.scalings), out_scaling=out_s, method=method,
                                         solver=solver, residual=residual, **layer_kwargs)
    except (ValueError, TypeError) as e:
        raise _with_client_names(e, clients) from None
    reads = list(read_seconds) if read_seconds is not None else [0.0] * len(specs)
    return [_module_result(sp, res, out_s, method=method, residual=residual, out_use_rslora=out_use_rslora,
                           read_seconds=t) for sp, res, t in zip(specs, layer_results, reads)]


# ----------------------------------------------------------------------------- the loop

FactorLoader = Callable[[LayerSpec], tuple[list[torch.Tensor], list[torch.Tensor]]]
TensorLoader = Callable[[str], list[torch.Tensor]]


def check_method_residual(method: str, residual: str) -> None:
    """ValueError for an unknown method or a residual mode other than "factored"/"none"."""
    get_method(method)
    if residual not in ("factored", "none"):
        raise ValueError(f"residual must be 'factored' or 'none', got {residual!r}")


#: how many modules ahead :func:`run_plan` looks for same-shaped modules to batch with the first
#: unfinished one (results finished early wait, in memory, until their turn in module order);
#: 64 spans ~9 decoder layers of 7 adapted modules, so every q/k/v/o/gate/up/down shape of those
#: layers forms one batch
LOOKAHEAD = 64


def _batch_solver(spec: LayerSpec, r: int, solver: str, residual: str) -> str:
    R = sum(spec.ranks)
    r = max(1, min(r, spec.m, spec.n, R))
    return solver if solver != "auto" else _cost.choose_solver(spec.m, spec.n, R, r,
                                                                need_tail=residual == "factored")


def plan_batches(modules: Sequence[LayerSpec], *, rank: Optional[int] = None, method: str = "fedmomentum",
                 solver: str = "auto", residual: str = "factored", residual_energy: float = 1.0,
                 budget: Optional[int] = None, lookahead: int = LOOKAHEAD) -> list[list[int]]:
    """Group module indices into the batches :func:`run_plan` solves together.

    A batch starts at the first module not yet planned and takes the same-shaped modules (same
    ``m``, ``n``, client ranks, scalings) among the next ``lookahead`` ones, when the method is
    batchable (:attr:`~fedmomentum_core.methods.MethodSpec.batchable`), keeps the whole residual
    (``residual_energy`` 1) and its solver resolves to ``exact``; everything else is a batch of one.
    A batch holds at most :data:`fedmomentum_core.methods.BATCH_BYTES` of fp32 stacked factors
    and, with ``budget`` (bytes), at most ``budget`` of
    :func:`fedmomentum_core.cost.module_memory_bytes` estimates. Batches come in the order of
    their first module, so results can be handed on in module order.
    """
    traits = get_method(method)
    specs = list(modules)
    done = [False] * len(specs)
    out: list[list[int]] = []
    for i, spec in enumerate(specs):
        if done[i]:
            continue
        done[i] = True
        batch = [i]
        r = rank if rank is not None else max(spec.ranks)
        if traits.batchable and residual_energy >= 1.0 and _batch_solver(spec, r, solver, residual) == "exact":
            R = sum(spec.ranks)
            stacked = (spec.m + spec.n) * R * 4
            need = _cost.module_memory_bytes(spec.m, spec.n, spec.ranks, max(1, min(r, spec.m, spec.n, R)),
                                             "exact", itemsize=4)
            cap = max(1, BATCH_BYTES // max(1, stacked))
            if budget is not None:
                cap = min(cap, max(1, budget // max(1, need)))
            key = (spec.m, spec.n, tuple(spec.ranks), tuple(spec.scalings))
            for j in range(i + 1, min(len(specs), i + 1 + lookahead)):
                if len(batch) >= cap:
                    break
                o = specs[j]
                if not done[j] and (o.m, o.n, tuple(o.ranks), tuple(o.scalings)) == key:
                    done[j] = True
                    batch.append(j)
        out.append(batch)
    return out


def run_plan(plan: Any, load_factors: FactorLoader, load_other: Optional[TensorLoader] = None, *,
             rank: Optional[int] = None, method: str = "fedmomentum", solver: str = "auto",
             residual: str = "factored", progress: bool = False, profile: bool = False,
             on_module: Optional[Callable[[ModuleResult], None]] = None, keep_residuals: bool = True,
             max_memory: Union[str, int, None] = None, out_use_rslora: bool = False,
             make_config: Optional[Callable[[Sequence[ModuleResult]], dict]] = None,
             lookahead: int = LOOKAHEAD, **layer_kwargs) -> ModelAggregation:
    """Aggregate every module of ``plan``, same-shaped modules in batches, loading factors lazily.

    ``plan`` has ``modules`` (:class:`LayerSpec` s), ``p`` (normalised weights), ``clients``
    (names for errors), ``other_keys`` (per client, the non-LoRA keys to average) and
    ``skipped_keys``. ``make_config(results)`` builds the result's ``config`` from the module
    results (residuals already dropped; empty dict when not given): the binding that knows the
    adapter format supplies it. ``out_use_rslora``: output alpha = s·√r instead of s·r.

    Modules run in the batches of :func:`plan_batches` (``lookahead``): a batch's factors are
    loaded (``load_factors(spec)`` returns ``(B_list, A_list)``, lora_B and lora_A per client) and
    solved together by :func:`aggregate_modules` (:func:`fedmomentum_core.aggregate_layers`, the
    batched engine the benchmarks time); a batch of one by :func:`aggregate_module`.
    ``on_module`` sees each :class:`ModuleResult` in module order, once (e.g. to stream or merge its
    residual at once; the object is never changed afterwards); ``keep_residuals=False`` then keeps
    no residual (memory: one batch plus results waiting for their turn). ``load_other(key)`` gives
    the K tensors of a non-LoRA key (averaged with p_k). With ``progress`` a tqdm bar runs over the
    modules; ``profile`` adds per-module read time and byte counts to :class:`ModuleReport.info`
    (the report is stored either way) and fills the report's ``flops``, ``bytes`` and
    ``peak_memory_bytes`` (the peak growth while the module's batch was read and aggregated).
    ``max_memory`` (e.g. ``"2GB"``) is a budget for the memory this call holds on top of its
    inputs' storage: the outputs kept until the end plus one batch's factors and work, batches
    sized to fit; it is checked from the shapes before anything is read (ValueError naming the
    module that cannot fit, or saying that the kept outputs alone exceed it).
    """
    check_method_residual(method, residual)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
        raise TypeError(f"rank must be an int or None, got {type(rank).__name__}")
    specs = list(plan.modules)
    room = None
    if max_memory is not None:
        budget, kept = check_budget(specs, max_memory, rank=rank, solver=solver, residual=residual)
        room = budget - kept
    batches = plan_batches(specs, rank=rank, method=method, solver=solver, residual=residual,
                           residual_energy=float(layer_kwargs.get("residual_energy", 1.0)), budget=room,
                           lookahead=lookahead)
    out_rs = bool(out_use_rslora)
    t_all = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(specs), desc=f"aggregate ({method})", unit="module")
    results: list[ModuleResult] = []
    state: dict[str, torch.Tensor] = {}
    residuals: dict[str, LowRank] = {}
    per_client: list[dict] = []
    ready: dict[int, ModuleResult] = {}
    common = dict(rank=rank, method=method, solver=solver, residual=residual, out_use_rslora=out_rs,
                  clients=plan.clients)
    try:
        for batch in batches:
            pm = _profiling.PeakMemory("cpu") if profile else contextlib.nullcontext()
            with pm:
                factors, reads = [], []
                for i in batch:
                    t0 = time.perf_counter()
                    factors.append(load_factors(specs[i]))
                    reads.append(time.perf_counter() - t0)
                if len(batch) == 1:
                    (B, A), = factors
                    done = [aggregate_module(specs[batch[0]], B, A, plan.p, read_seconds=reads[0],
                                             **common, **layer_kwargs)]
                else:
                    done = aggregate_modules([specs[i] for i in batch], factors, plan.p, read_seconds=reads,
                                             **common, **layer_kwargs)
            for (B, A), res in zip(factors, done):
                if profile:
                    res.report.info["input_bytes"] = sum(t.numel() * t.element_size() for t in list(B) + list(A))
                    res.report.info["residual_bytes"] = 0 if res.residual is None else res.residual.nbytes
                    _attach_profile(res.report, B[0].element_size() if len(B) else 4, pm.delta_bytes,
                                    residual == "factored")
            del factors
            B = A = None  # noqa: F841 - drop the last module's factors before the next batch
            if max_memory is not None:  # a kept scratch buffer is not in the next batch's estimate
                _release_workspace()
            ready.update(zip(batch, done))
            del done
            while len(results) in ready:  # hand results on in module order
                res = ready.pop(len(results))
                state.update(res.tensors)
                if res.per_client is not None:
                    per_client = per_client or [{} for _ in res.per_client]
                    for d, t in zip(per_client, res.per_client):
                        d.update(t)
                if res.residual is not None and keep_residuals:
                    residuals[res.report.name] = res.residual
                if on_module is not None:
                    on_module(res)
                # kept once, in ``residuals``; the callback's object is never changed after the call
                results.append(dataclasses.replace(res, residual=None, per_client=None))
                if bar is not None:
                    bar.update(1)
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
                            skipped_keys=list(plan.skipped_keys), per_client=per_client)


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
            if not all_finite(t):
                raise ValueError(f"{clients[k]}: non-LoRA tensor {key!r} has NaN/Inf entries")
        acc = sum(pk * t.to(torch.float32) for pk, t in zip(p, ts))
        out[key] = acc.to(ts[0].dtype)
    return out


def check_budget(modules: Sequence[LayerSpec], max_memory, *, rank, solver: str, residual: str
                 ) -> tuple[int, int]:
    """Raise ValueError when ``modules`` cannot run within ``max_memory`` bytes (estimates of
    :func:`fedmomentum_core.cost.module_memory_bytes`, fp32 factors assumed: conservative).
    Returns ``(budget, kept)``: the budget in bytes and the outputs kept until the end."""
    budget = _profiling.parse_memory(max_memory)
    kept = 0
    worst, worst_name = 0, ""
    for spec in modules:
        r = rank if rank is not None else max(spec.ranks)
        R = sum(spec.ranks)
        r = max(1, min(r, spec.m, spec.n))
        s = solver if solver in ("exact", "randomized", "dense") else _cost.choose_solver(spec.m, spec.n, R, r)
        need = _cost.module_memory_bytes(spec.m, spec.n, spec.ranks, r, s, itemsize=4)
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
    return budget, kept
