"""The entry points every caller runs: :func:`aggregate_layer` (one layer) and
:func:`aggregate_layers` (many; same-shaped FedMomentum layers share the batched exact solver).

One :class:`~fedmomentum_core.options.AggregateOptions` (what to compute) and one
:class:`~fedmomentum_core.options.SolverTuning` (how) flow from here down to the solvers.
The whole aggregation runs under ``torch.no_grad()``: inputs that require grad are read, never
tracked, and results never carry autograd history.
"""
from __future__ import annotations

import time
from typing import Optional

import torch

from .linalg import solve_exact_batch
from .methods import METHODS
from .methods.common import Options
from .methods.spectral import fedmomentum_result
from .options import AggregateOptions, SolverTuning
from .types import AggregationResult
from .validate import LayerInput, layer_prefix, validate_layer

__all__ = ["aggregate_layer", "aggregate_layers", "resolve_options"]

_DEFAULTS = AggregateOptions()


def resolve_options(options: Optional[AggregateOptions], pre: str = "", **kw) -> AggregateOptions:
    """The call's :class:`AggregateOptions`: ``options`` when given (then every keyword must be
    left at its default), else built from the keywords. Errors carry the layer prefix ``pre``."""
    if options is not None:
        if not isinstance(options, AggregateOptions):
            raise TypeError(f"{pre}options must be an AggregateOptions, got {type(options).__name__}")
        changed = [k for k, v in kw.items()
                   if not _same(v, None if k == "method_options" else getattr(_DEFAULTS, k))]
        if changed:
            raise TypeError(f"{pre}pass either options= or the keywords {changed}, not both")
        return options
    try:
        return AggregateOptions(**kw)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{pre}{e}") from None


def _same(a, b) -> bool:
    return a is b or (type(a) is type(b) and a == b)


def _tuning(tuning: Optional[SolverTuning], pre: str) -> SolverTuning:
    if tuning is None:
        return SolverTuning()
    if not isinstance(tuning, SolverTuning):
        raise TypeError(f"{pre}tuning must be a SolverTuning, got {type(tuning).__name__}")
    return tuning


def _layer_rank(agg: AggregateOptions, inp: LayerInput, pre: str) -> int:
    try:
        return agg.layer_rank(inp.m, inp.n, inp.ranks)
    except ValueError as e:
        raise ValueError(f"{pre}{e}") from None


def aggregate_layer(B, A, weights=None, *, rank=None, scalings=1.0, out_scaling=None,
                    method: str = "fedmomentum", solver: str = "auto", residual: str = "factored",
                    split: str = "balanced", compute_dtype: torch.dtype = torch.float32,
                    generator: Optional[torch.Generator] = None, residual_energy: float = 1.0,
                    tau: Optional[float] = None, name: Optional[str] = None,
                    options: Optional[AggregateOptions] = None,
                    tuning: Optional[SolverTuning] = None, method_options=None) -> AggregationResult:
    """Aggregate one layer's K client LoRA factors (see ``fedmomentum.aggregate_lora`` for the
    keywords; ``options`` passes them as one :class:`AggregateOptions` instead, ``tuning`` the
    solvers' :class:`SolverTuning`).

    Runs under ``torch.no_grad()``: inputs that require grad are read, not tracked; the result's
    tensors have ``requires_grad=False`` and no ``grad_fn``. Calls are independent: nothing one
    call leaves behind (a scratch buffer, a failure half-way) changes the next call's result.
    Raises ValueError naming the layer when an output (B, A, residual) is not finite after the
    cast to the input dtype.
    """
    pre = layer_prefix(name)
    agg = resolve_options(options, pre, method=method, solver=solver, residual=residual, split=split,
                          compute_dtype=compute_dtype, generator=generator,
                          residual_energy=residual_energy, tau=tau, rank=rank,
                          method_options=method_options)
    tun = _tuning(tuning, pre)
    with torch.no_grad():
        return _aggregate_one(B, A, weights, scalings, out_scaling, name, agg, tun)


def _aggregate_one(B, A, weights, scalings, out_scaling, name, agg: AggregateOptions,
                   tuning: SolverTuning) -> AggregationResult:
    pre = layer_prefix(name)
    spec = METHODS[agg.method]
    defer = spec.batchable  # the exact solver scans for NaN/Inf off its Grams (no extra pass)
    inp = validate_layer(B, A, weights, scalings=scalings, out_scaling=out_scaling, name=name,
                         check_finite=not defer)
    opt = Options(agg, _layer_rank(agg, inp, pre), pre, finite_checked=not defer, tuning=tuning)
    t0 = time.perf_counter()
    res = spec(inp, opt)
    res.info.setdefault("seconds", time.perf_counter() - t0)
    res.info.setdefault("R", inp.R)
    return res


def aggregate_layers(layers, weights=None, *, names=None, rank=None, scalings=1.0, out_scaling=None,
                     method: str = "fedmomentum", solver: str = "auto", residual: str = "factored",
                     split: str = "balanced", compute_dtype: torch.dtype = torch.float32,
                     generator: Optional[torch.Generator] = None, residual_energy: float = 1.0,
                     tau: Optional[float] = None, options: Optional[AggregateOptions] = None,
                     tuning: Optional[SolverTuning] = None, method_options=None) -> list[AggregationResult]:
    """Aggregate several layers at once; same-shaped layers share batched work.

    ``layers`` is a sequence of ``(B_list, A_list)`` pairs; ``weights``, ``scalings`` and
    ``out_scaling`` apply to every layer (for per-layer scalings call :func:`aggregate_layer`
    per layer, or group layers that share them).
    FedMomentum layers whose solver resolves to ``exact`` are grouped by (m, n, client ranks,
    dtype, device) and solved with :func:`~fedmomentum_core.linalg.solve_exact_batch` in chunks of
    at most ``tuning.batch_bytes`` of stacked factors (one GEMM per layer per step, the R x R
    factorisations batched in torch.linalg). Everything else runs layer by layer. Results are in
    input order and equal the per-layer results up to float rounding. Runs under
    ``torch.no_grad()`` like :func:`aggregate_layer`.
    """
    layers = list(layers)
    names = list(names) if names is not None else [None] * len(layers)
    if len(names) != len(layers):
        raise ValueError(f"{len(names)} names for {len(layers)} layers")
    agg = resolve_options(options, "", method=method, solver=solver, residual=residual, split=split,
                          compute_dtype=compute_dtype, generator=generator,
                          residual_energy=residual_energy, tau=tau, rank=rank,
                          method_options=method_options)
    tun = _tuning(tuning, "")
    with torch.no_grad():
        return _aggregate_many(layers, weights, names, scalings, out_scaling, agg, tun)


def _aggregate_many(layers, weights, names, scalings, out_scaling, agg: AggregateOptions,
                    tuning: SolverTuning) -> list[AggregationResult]:
    results: list[Optional[AggregationResult]] = [None] * len(layers)
    groups: dict = {}
    prepared = []
    batchable_method = METHODS[agg.method].batchable and agg.residual_energy >= 1.0
    for i, ((B, A), nm) in enumerate(zip(layers, names)):
        pre = layer_prefix(nm)
        # the NaN/Inf check is read off the Grams in the batched exact path (no extra pass);
        # layers that go through _aggregate_one are validated in full there
        inp = validate_layer(B, A, weights, scalings=scalings, out_scaling=out_scaling, name=nm,
                             check_finite=False)
        r = _layer_rank(agg, inp, pre)
        prepared.append((inp, r))
        chosen = agg.solver
        if batchable_method and chosen == "auto":
            chosen = tuning.choose_solver(inp.m, inp.n, inp.R, r, need_tail=agg.residual == "factored")
        if batchable_method and chosen == "exact":
            key = (inp.m, inp.n, tuple(inp.ranks), inp.dtype, str(inp.device), r)
            groups.setdefault(key, []).append(i)
        else:
            results[i] = _aggregate_one(B, A, weights, scalings, out_scaling, nm, agg, tuning)
    dt_bytes = torch.finfo(agg.compute_dtype).bits // 8
    for key, idxs in groups.items():
        m, n, ranks, _, _, r = key
        per_layer = (m + n) * sum(ranks) * dt_bytes
        chunk = max(1, tuning.batch_bytes // max(1, per_layer))
        for c0 in range(0, len(idxs), chunk):
            part = idxs[c0:c0 + chunk]
            t0 = time.perf_counter()
            inps = [prepared[i][0] for i in part]
            svds = solve_exact_batch(inps, r, dtype=agg.compute_dtype, need_tail=agg.residual == "factored",
                                     stacked_remainder=agg.residual == "stacked", check_finite=True,
                                     tuning=tuning)
            for i, svd in zip(part, svds):
                inp = prepared[i][0]
                opt = Options(agg, r, layer_prefix(inp.name), tuning=tuning, solver="exact")
                res = fedmomentum_result(inp, opt, svd)
                res.info["R"] = inp.R
                results[i] = res
            dt = (time.perf_counter() - t0) / len(part)
            for i in part:
                results[i].info["seconds"] = dt
                results[i].info["batched"] = len(part)
    return results  # type: ignore[return-value]
