"""What one aggregation round costs: FLOPs and bytes models, peak-memory measurement, per-module
records, memory budgets, and :func:`profile_round` (the engine of ``fedmomentum profile``).

The cost model (FLOPs, bytes, memory estimates) is :mod:`fedmomentum_core.cost`; its names are
re-exported here.

The peak-memory meter and budgets are :mod:`fedmomentum_core.memory`, the synthetic clients
:mod:`fedmomentum_core.synthetic`; their names are re-exported here. Records report the peak
memory growth over the resident memory at the start of the measurement.
"""
from __future__ import annotations

import math
import os
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch

from .cost import (BASELINES, baseline_bytes, baseline_flops, choose_solver, gram_flops,  # noqa: F401
                   module_memory_bytes, solver_bytes, solver_flops)
from .cost import baseline_memory_bytes as _baseline_memory_bytes  # noqa: F401
from .shapes import ModelShapes, ModuleShape, model_shapes
from .synthetic import client_weights, synthetic_module  # noqa: F401  (re-exported)
from .linalg import release_workspace as _release_workspace
from .memory import PeakMemory, current_rss_bytes, parse_memory, plan_chunks  # noqa: F401  (re-exported)
from .memory import _proc_status_kib, _reset_peak_rss  # noqa: F401
from .memory import format_bytes as _fmt_bytes

__all__ = [
    "solver_flops", "solver_bytes", "baseline_flops", "baseline_bytes", "module_memory_bytes",
    "PeakMemory", "current_rss_bytes", "ModuleProfile", "module_record", "parse_memory",
    "plan_chunks", "synthetic_module", "client_weights", "profile_round", "DTYPES", "BASELINES",
]

#: accepted dtype names
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
          "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# ----------------------------------------------------------------------------- records

@dataclass
class ModuleProfile:
    """The cost of aggregating one module, as written to the profile JSON (``to_dict``).

    ``seconds`` is the module's share of its batch's wall time (batches hold same-shaped modules
    aggregated together; the share is proportional to the modelled FLOPs), ``peak_memory_bytes``
    the peak memory growth while its batch was held (client factors + work, shared by the batch).
    """

    name: str
    m: int
    n: int
    R: int
    seconds: float
    flops: float
    bytes: int
    peak_memory_bytes: int
    energy_kept: float
    rank: int = 0
    solver: str = ""
    kind: str = ""
    bytes_read: int = 0
    bytes_written: int = 0
    batch_size: int = 1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("energy_kept", "seconds", "flops"):
            v = d[key]
            d[key] = None if (isinstance(v, float) and not math.isfinite(v)) else v
        return d


def module_record(name: str, m: int, n: int, ranks: Sequence[int], rank: int, solver: str,
                  seconds: float, energy_kept: float, *, itemsize: int, peak_memory_bytes: int = 0,
                  residual: bool = True, kind: str = "", batch_size: int = 1) -> ModuleProfile:
    """A :class:`ModuleProfile` for one aggregated module, FLOPs and bytes from the cost models
    of the solver that actually ran (``solver`` as reported by the result; ``none`` for the
    averaging methods, whose FLOPs are the weighted sums ``2(m+n)R`` and bytes read+written)."""
    R = int(sum(ranks))
    if solver in ("exact", "randomized", "dense"):
        fl = solver_flops(m, n, R, rank, solver, need_tail=residual)["total"]
        by = solver_bytes(m, n, ranks, rank, solver, itemsize=itemsize, residual=residual)
    else:
        fl = 2.0 * (m + n) * R
        rd = (m + n) * R * itemsize
        by = {"read": rd, "written": (m + n) * rank * itemsize, "total": rd + (m + n) * rank * itemsize}
    return ModuleProfile(name=name, m=int(m), n=int(n), R=R, seconds=float(seconds), flops=float(fl),
                         bytes=int(by["total"]), peak_memory_bytes=int(peak_memory_bytes),
                         energy_kept=float(energy_kept), rank=int(rank), solver=solver, kind=kind,
                         bytes_read=int(by["read"]), bytes_written=int(by["written"]),
                         batch_size=int(batch_size))


# ----------------------------------------------------------------------------- profile_round

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _aggregate_many(pairs, weights, names, *, batched: bool = True, **kw):
    """Batched-by-shape aggregation (``aggregate_layers``), or a loop of ``aggregate_layer``."""
    from .engine import aggregate_layer, aggregate_layers
    if batched:
        return list(aggregate_layers(pairs, weights, names=names, **kw))
    return [aggregate_layer(B, A, weights, name=nm, **kw) for (B, A), nm in zip(pairs, names)]


def _gram_floor(B: list[torch.Tensor], A: list[torch.Tensor], device: torch.device) -> float:
    """Seconds of the two fp32 Gram GEMMs ``B_catᵀB_cat`` and ``A_cat A_catᵀ`` (stacks formed
    outside the timing): the cost floor of any exact factored method."""
    Bc = torch.cat([b.to(torch.float32) for b in B], 1)
    Ac = torch.cat([a.to(torch.float32) for a in A], 0)
    _sync(device)
    t0 = time.perf_counter()
    gb = Bc.T @ Bc
    ga = Ac @ Ac.T
    _sync(device)
    dt = time.perf_counter() - t0
    del gb, ga, Bc, Ac
    return dt


def _run_baseline(baseline: str, B, A, w, rank: int, device: torch.device) -> float:
    from .baselines import dense_full_svd, dense_svd_lowrank
    from .validate import validate_layer
    inp = validate_layer(B, A, w)
    _sync(device)
    t0 = time.perf_counter()
    if baseline == "dense_full":
        dense_full_svd(inp, rank)
    else:
        dense_svd_lowrank(inp, rank)
    _sync(device)
    return time.perf_counter() - t0


def profile_round(model: Union[str, os.PathLike, dict, ModelShapes], clients: int, rank: int, *,
                  dtype: Union[str, torch.dtype] = "bf16", layers: Optional[int] = None,
                  solver: str = "auto", device: Union[str, torch.device] = "cpu",
                  compare: Iterable[str] = (), baseline_layers: int = 1, seed: int = 0,
                  max_memory: Union[str, int, None] = None, layers_at_once: Optional[int] = None,
                  batched: bool = True, gram_floor: bool = False, targets: Optional[Sequence[str]] = None,
                  residual: str = "factored", progress: bool = True) -> dict[str, Any]:
    """Aggregate a synthetic round of ``model`` for real and report what it cost.

    Client factors (``clients`` x rank ``rank``, ``dtype``) are generated seeded, chunk by chunk
    (never the whole round at once), aggregated with FedMomentum (``solver``), and dropped.
    Chunks hold the modules of ``layers_at_once`` layers (default 1), or as many modules as
    ``max_memory`` allows (estimates of :func:`module_memory_bytes`; ValueError when one module
    alone cannot fit). Same-shaped modules of a chunk are aggregated together (``batched``).

    ``residual`` is passed to the aggregation: ``"factored"`` (default, the SVD tail, rank ≤ R − r),
    ``"stacked"`` (the exact remainder [X_B | −UΣ], [X_Aᵀ; Vᵀ]: no tail products, about half the
    work) or ``"none"``.

    Returns the profile dict (the JSON of ``fedmomentum profile``): ``model``, ``clients``,
    ``rank``, ``dtype``, ``device``, ``modules`` (:meth:`ModuleProfile.to_dict` each),
    ``round_seconds`` (measured over ``layers_measured`` layers), ``round_seconds_extrapolated``
    (per-layer mean x ``num_layers``; ``extrapolated`` says whether it is), ``totals``,
    ``baselines`` (per name: the modules of ``baseline_layers`` layers run for real, their
    per-layer time extrapolated to the round, and the ratio to ours), and with ``gram_floor`` the
    summed time of the two Gram GEMMs per module (``gram_floor_seconds``).
    """
    shapes = model if isinstance(model, ModelShapes) else model_shapes(model, targets=targets)
    tdtype, dname = _profile_dtype(dtype)
    for what, v in (("clients", clients), ("rank", rank)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{what} must be a positive int, got {v!r}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    n_layers = shapes.num_layers if layers is None else int(layers)
    if n_layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    if n_layers > shapes.num_layers:
        raise ValueError(f"model {shapes.model!r} has {shapes.num_layers} layers; --layers {n_layers} "
                         "is too many")
    compare = [c.strip() for c in compare if c and c.strip()]
    for c in compare:
        if c not in BASELINES:
            raise ValueError(f"unknown baseline {c!r}; choose from {list(BASELINES)}")
    if residual not in ("factored", "stacked", "none"):
        raise ValueError(f"residual must be 'factored', 'stacked' or 'none', got {residual!r}")
    budget = parse_memory(max_memory)
    rnd = _Round(shapes=shapes, clients=clients, rank=rank, dtype=tdtype, device=dev, seed=seed,
                 solver=solver, residual=residual, n_layers=n_layers)
    chunks = _chunks(rnd, budget, layers_at_once)
    run = _aggregate_chunks(rnd, chunks, batched=batched, gram_floor=gram_floor,
                            release=budget is not None, progress=progress)
    baselines = {c: _baseline(rnd, c, run.records, baseline_layers, progress) for c in compare}
    records = run.records
    per_layer = run.seconds / n_layers
    report: dict[str, Any] = {
        "model": shapes.model, "clients": clients, "rank": rank, "dtype": dname, "device": str(dev),
        "modules": [rec.to_dict() for rec in records],
        "round_seconds": run.seconds,
        "round_seconds_extrapolated": per_layer * shapes.num_layers,
        "extrapolated": n_layers < shapes.num_layers,
        "layers_measured": n_layers, "num_layers": shapes.num_layers,
        "solver": solver, "residual": residual, "batched": batched, "max_memory_bytes": budget,
        "chunks": len(chunks),
        "totals": {"seconds": run.seconds, "flops": sum(r_.flops for r_ in records),
                   "bytes": sum(r_.bytes for r_ in records),
                   "peak_memory_bytes": max((r_.peak_memory_bytes for r_ in records), default=0),
                   "peak_process_memory_bytes": run.peak,
                   "solvers": sorted({r_.solver for r_ in records})},
        "baselines": baselines,
        "threads": torch.get_num_threads(),
    }
    if gram_floor:
        report["gram_floor_seconds"] = run.gram_seconds
        report["ratio_to_gram_floor"] = run.seconds / run.gram_seconds if run.gram_seconds > 0 else None
    return report


def _profile_dtype(dtype) -> tuple[torch.dtype, str]:
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPES:
            raise ValueError(f"dtype must be one of bf16, fp16, fp32, got {dtype!r}")
        tdtype = DTYPES[dtype.lower()]
    elif dtype in (torch.bfloat16, torch.float16, torch.float32):
        tdtype = dtype
    else:
        raise TypeError(f"dtype must be bf16, fp16 or fp32, got {dtype!r}")
    return tdtype, {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[tdtype]


@dataclass
class _Round:
    """The synthetic round :func:`profile_round` aggregates."""

    shapes: ModelShapes
    clients: int
    rank: int
    dtype: torch.dtype
    device: torch.device
    seed: int
    solver: str
    residual: str
    n_layers: int

    def __post_init__(self):
        self.ranks = [self.rank] * self.clients
        self.R = self.rank * self.clients
        self.out_rank = min(self.rank, min(min(t.m, t.n) for t in self.shapes.layer_modules(0)))
        self.mods = list(self.shapes.modules(self.n_layers))
        self.index = {t.name: i for i, t in enumerate(self.mods)}

    def module(self, t: ModuleShape):
        """Module t's client factors and weights (seeded by its index)."""
        return synthetic_module(t.m, t.n, self.clients, self.rank, dtype=self.dtype, seed=self.seed,
                                index=self.index[t.name], device=self.device)


def _chunks(rnd: _Round, budget: Optional[int], layers_at_once: Optional[int]) -> list:
    """The modules in chunks: ``layers_at_once`` layers each, or as many as ``budget`` allows."""
    def need(t: ModuleShape) -> int:
        s = rnd.solver if rnd.solver != "auto" else choose_solver(t.m, t.n, rnd.R, rnd.out_rank)
        return module_memory_bytes(t.m, t.n, rnd.ranks, rnd.out_rank, s, itemsize=rnd.dtype.itemsize)

    if budget is not None:
        return plan_chunks(rnd.mods, need, budget, label=lambda t: f"{t.name} ({t.m} x {t.n}, R={rnd.R})")
    per = rnd.shapes.modules_per_layer * max(1, int(layers_at_once or 1))
    return plan_chunks(rnd.mods, need, None, max_items=per)


@dataclass
class _RunResult:
    records: list
    seconds: float
    gram_seconds: float
    peak: int


def _aggregate_chunks(rnd: _Round, chunks: list, *, batched: bool, gram_floor: bool, release: bool,
                      progress: bool) -> _RunResult:
    """Aggregate every chunk for real (same-shaped modules together when ``batched``), one
    :class:`ModuleProfile` per module; each batch's wall time is shared by modelled FLOPs."""
    records: list[ModuleProfile] = []
    gram_total = agg_total = 0.0
    peak_round = 0
    dev = rnd.device
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(rnd.mods), desc=f"profile {rnd.shapes.model}", unit="module", leave=False)
    kw = dict(rank=rnd.out_rank, solver=rnd.solver, residual=rnd.residual)
    try:
        for chunk in chunks:
            with PeakMemory(dev) as pm:
                pairs, w = [], None
                for t in chunk:
                    B, A, w = rnd.module(t)
                    pairs.append((B, A))
                if gram_floor:
                    for B, A in pairs:
                        gram_total += _gram_floor(B, A, dev)
                names = [t.name for t in chunk]
                groups = _shape_groups(chunk) if batched else [[i] for i in range(len(chunk))]
                results: list = [None] * len(chunk)
                seconds = [0.0] * len(chunk)
                for g in groups:
                    _sync(dev)
                    t0 = time.perf_counter()
                    res = _aggregate_many([pairs[i] for i in g], w, [names[i] for i in g],
                                          batched=batched, **kw)
                    _sync(dev)
                    dt = time.perf_counter() - t0
                    agg_total += dt
                    fl = [solver_flops(chunk[i].m, chunk[i].n, rnd.R, rnd.out_rank, r_.solver)["total"]
                          if r_.solver in ("exact", "randomized", "dense") else 1.0
                          for i, r_ in zip(g, res)]
                    tot = sum(fl) or 1.0
                    for i, r_, f in zip(g, res, fl):
                        results[i] = r_
                        seconds[i] = dt * f / tot
                    del res
                    if bar is not None:
                        bar.update(len(g))
                del pairs
                if release:  # a kept scratch buffer is not in the next chunk's estimate
                    _release_workspace()
            peak_round = max(peak_round, pm.peak_bytes)
            for i, t in enumerate(chunk):
                r_ = results[i]
                gsize = next(len(g) for g in groups if i in g)
                records.append(module_record(t.name, t.m, t.n, rnd.ranks, rnd.out_rank, r_.solver, seconds[i],
                                             r_.energy_kept, itemsize=rnd.dtype.itemsize,
                                             peak_memory_bytes=pm.delta_bytes, kind=t.kind,
                                             batch_size=gsize))
            del results
    finally:
        if bar is not None:
            bar.close()
    return _RunResult(records=records, seconds=agg_total, gram_seconds=gram_total, peak=peak_round)


def _baseline(rnd: _Round, c: str, records: list, baseline_layers: int, progress: bool) -> dict[str, Any]:
    """Run baseline ``c`` on the modules of ``baseline_layers`` layers (one run per shape),
    extrapolate to the round and compare with our time on the same modules."""
    b_mods = list(rnd.shapes.modules(min(baseline_layers, rnd.n_layers)))
    names = {t.name for t in b_mods}
    ours_layer = sum(rec.seconds for rec in records if rec.name in names)
    rows = []
    cache: dict[tuple[int, int], tuple[float, int]] = {}
    it = b_mods
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(b_mods, desc=f"baseline {c}", unit="module", leave=False)
    for t in it:
        key = (t.m, t.n)
        reused = key in cache
        if not reused:
            B, A, w = rnd.module(t)
            with PeakMemory(rnd.device) as pm:
                secs = _run_baseline(c, B, A, w, rnd.out_rank, rnd.device)
            del B, A
            cache[key] = (secs, pm.delta_bytes)
        secs, peak = cache[key]
        fl = baseline_flops(t.m, t.n, rnd.R, rnd.out_rank, c)["total"]
        by = baseline_bytes(t.m, t.n, rnd.ranks, rnd.out_rank, c, itemsize=rnd.dtype.itemsize)["total"]
        rows.append({"name": t.name, "m": t.m, "n": t.n, "R": rnd.R, "seconds": secs,
                     "flops": fl, "bytes": by, "peak_memory_bytes": peak,
                     "reused_same_shape": reused})
    secs = sum(r_["seconds"] for r_ in rows)
    nl = min(baseline_layers, rnd.n_layers)
    return {"layers": nl, "modules": rows, "seconds": secs,
            "round_seconds_extrapolated": secs / nl * rnd.shapes.num_layers,
            "ratio_to_fedmomentum": secs / ours_layer if ours_layer > 0 else None}


def _shape_groups(chunk: Sequence[ModuleShape]) -> list[list[int]]:
    """Indices of ``chunk`` grouped by (m, n), in order of first appearance."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, t in enumerate(chunk):
        groups.setdefault((t.m, t.n), []).append(i)
    return list(groups.values())
