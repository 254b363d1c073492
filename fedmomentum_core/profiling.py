"""What one aggregation round costs: FLOPs and bytes models, peak-memory measurement, per-module
records, memory budgets, and :func:`profile_round` (the engine of ``fedmomentum profile``).

The cost model (FLOPs, bytes, memory estimates) is :mod:`fedmomentum_core.cost`; its names are
re-exported here.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (reset per measurement); on CPU the
process's peak resident set (``VmHWM`` in ``/proc/self/status``, reset through
``/proc/self/clear_refs``), or a sampling thread where the reset is refused. Records report the
growth over the resident memory at the start of the measurement.
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
from .linalg import release_workspace as _release_workspace

__all__ = [
    "solver_flops", "solver_bytes", "baseline_flops", "baseline_bytes", "module_memory_bytes",
    "PeakMemory", "current_rss_bytes", "ModuleProfile", "module_record", "parse_memory",
    "plan_chunks", "synthetic_module", "client_weights", "profile_round", "DTYPES", "BASELINES",
]

#: accepted dtype names
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
          "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# ----------------------------------------------------------------------------- memory

_UNITS = {"": 1, "b": 1, "k": 10 ** 3, "kb": 10 ** 3, "m": 10 ** 6, "mb": 10 ** 6, "g": 10 ** 9,
          "gb": 10 ** 9, "t": 10 ** 12, "tb": 10 ** 12, "kib": 2 ** 10, "mib": 2 ** 20,
          "gib": 2 ** 30, "tib": 2 ** 40}


def parse_memory(value: Union[str, int, float, None]) -> Optional[int]:
    """Bytes from ``"2GB"`` (10⁹), ``"2GiB"`` (2³⁰), ``"512MB"``, ``"1.5G"`` or a number of bytes;
    None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"max_memory must be a size like '2GB' or a number of bytes, got {value!r}")
    if isinstance(value, (int, float)):
        b = float(value)
    elif isinstance(value, str):
        mt = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if not mt or mt.group(2).lower() not in _UNITS:
            raise ValueError(f"cannot read memory size {value!r}; use e.g. '2GB', '1.5GiB', '512MB'")
        b = float(mt.group(1)) * _UNITS[mt.group(2).lower()]
    else:
        raise TypeError(f"max_memory must be a size like '2GB' or a number of bytes, got "
                        f"{type(value).__name__}")
    if not math.isfinite(b) or b <= 0:
        raise ValueError(f"max_memory must be positive, got {value!r}")
    return int(b)


def _proc_status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def current_rss_bytes() -> int:
    """Resident set size of this process in bytes (``/proc``; ``ru_maxrss`` where there is none)."""
    kib = _proc_status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import resource  # pragma: no cover - non-Linux
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return _proc_status_kib("VmHWM") is not None
    except OSError:
        return False


class PeakMemory:
    """Context manager measuring peak memory on ``device`` while its block runs.

    After the block: ``start_bytes`` (memory at entry), ``peak_bytes`` (absolute peak) and
    ``delta_bytes = peak_bytes − start_bytes`` (growth; what the block itself held at most).
    CPU: peak RSS through ``VmHWM`` (reset at entry), else a 1 ms sampling thread; CUDA:
    ``torch.cuda.max_memory_allocated`` (peak stats reset at entry).
    """

    def __init__(self, device: Union[str, torch.device] = "cpu"):
        self.device = torch.device(device)
        self.start_bytes = 0
        self.peak_bytes = 0
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._sampled = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
            return self
        self.start_bytes = current_rss_bytes()
        self._hwm = _reset_peak_rss()
        if not self._hwm:
            self._sampled = self.start_bytes
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._sampled = max(self._sampled, current_rss_bytes())

    def read(self) -> int:
        """The peak so far (absolute bytes)."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self._thread is not None:
            return max(self._sampled, current_rss_bytes())
        return max((_proc_status_kib("VmHWM") or 0) * 1024, current_rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.peak_bytes = self.read()
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    @property
    def delta_bytes(self) -> int:
        return max(0, self.peak_bytes - self.start_bytes)


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


# ----------------------------------------------------------------------------- planning

def plan_chunks(items: Sequence[Any], need: Callable[[Any], int], budget: Optional[int], *,
                label: Callable[[Any], str] = str, max_items: Optional[int] = None) -> list[list[Any]]:
    """Split ``items`` (in order) into consecutive chunks whose summed ``need(item)`` stays within
    ``budget`` bytes (None = one chunk of at most ``max_items``). ValueError naming the item when
    one alone needs more than the budget."""
    chunks: list[list[Any]] = []
    cur: list[Any] = []
    used = 0
    for it in items:
        b = int(need(it))
        if budget is not None and b > budget:
            raise ValueError(f"module {label(it)} alone needs about {_fmt_bytes(b)} to aggregate but "
                             f"the memory budget is {_fmt_bytes(budget)}; raise max_memory to at least "
                             f"{_fmt_bytes(b)}")
        full = (budget is not None and used + b > budget) or (max_items is not None and len(cur) >= max_items)
        if cur and full:
            chunks.append(cur)
            cur, used = [], 0
        cur.append(it)
        used += b
    if cur:
        chunks.append(cur)
    return chunks


def _fmt_bytes(b: float, digits: int = 2) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(b) < 1024 or unit == "TiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.{digits}f} {unit}"
        b /= 1024
    return f"{b:.{digits}f} TiB"  # pragma: no cover


# ----------------------------------------------------------------------------- synthetic rounds

def synthetic_module(m: int, n: int, clients: int, rank: int, *, dtype: torch.dtype = torch.bfloat16,
                     seed: int = 0, index: int = 0, device: Union[str, torch.device] = "cpu"
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
    """Seeded synthetic client factors of one module, like trained LoRA: A uniform(±1/√n)
    (kaiming-like), B uniform(±0.02·√3), the round's per-client sample counts (:func:`client_weights`) as weights.
    ``(seed, index)`` fixes the draw, so module ``index`` is the same however modules are batched."""
    dev = torch.device(device)
    g = torch.Generator(device=dev)
    g.manual_seed((int(seed) * 1_000_003 + int(index) * 7_919) % (2 ** 63))
    sb, sa = 0.02 * math.sqrt(3.0), 1.0 / math.sqrt(n)
    B, A = [], []
    for _ in range(clients):
        B.append(torch.rand(m, rank, generator=g, device=dev).mul_(2 * sb).sub_(sb).to(dtype))
        A.append(torch.rand(rank, n, generator=g, device=dev).mul_(2 * sa).sub_(sa).to(dtype))
    return B, A, client_weights(clients, seed)


def client_weights(clients: int, seed: int = 0) -> list[int]:
    """Seeded per-client sample counts in [50, 500): the weights of every module of a round."""
    g = torch.Generator().manual_seed(int(seed) + 12345)
    return torch.randint(50, 500, (clients,), generator=g).tolist()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _aggregate_many(pairs, weights, names, *, batched: bool = True, **kw):
    """Batched-by-shape aggregation when the core has it (``aggregate_layers``), else a loop."""
    from . import methods
    fn = getattr(methods, "aggregate_layers", None)
    if batched and fn is not None:
        return list(fn(pairs, weights, names=names, **kw))
    return [methods.aggregate_layer(B, A, weights, name=nm, **kw) for (B, A), nm in zip(pairs, names)]


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
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPES:
            raise ValueError(f"dtype must be one of bf16, fp16, fp32, got {dtype!r}")
        tdtype = DTYPES[dtype.lower()]
    elif dtype in (torch.bfloat16, torch.float16, torch.float32):
        tdtype = dtype
    else:
        raise TypeError(f"dtype must be bf16, fp16 or fp32, got {dtype!r}")
    dname = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[tdtype]
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
    budget = parse_memory(max_memory)
    itemsize = tdtype.itemsize
    ranks = [rank] * clients
    R = rank * clients
    out_rank = min(rank, min(min(t.m, t.n) for t in shapes.layer_modules(0)))

    mods = list(shapes.modules(n_layers))
    index = {t.name: i for i, t in enumerate(mods)}
    for t in mods:
        if out_rank > min(t.m, t.n):  # pragma: no cover - guarded above
            raise ValueError(f"module {t.name}: rank {out_rank} exceeds min(m, n)")

    def need(t: ModuleShape) -> int:
        s = solver if solver != "auto" else choose_solver(t.m, t.n, R, out_rank)
        return module_memory_bytes(t.m, t.n, ranks, out_rank, s, itemsize=itemsize)

    if budget is not None:
        chunks = plan_chunks(mods, need, budget, label=lambda t: f"{t.name} ({t.m} x {t.n}, R={R})")
    else:
        per = shapes.modules_per_layer * max(1, int(layers_at_once or 1))
        chunks = plan_chunks(mods, need, None, max_items=per)

    records: list[ModuleProfile] = []
    gram_total = 0.0
    agg_total = 0.0
    peak_round = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(mods), desc=f"profile {shapes.model}", unit="module", leave=False)
    if residual not in ("factored", "stacked", "none"):
        raise ValueError(f"residual must be 'factored', 'stacked' or 'none', got {residual!r}")
    kw = dict(rank=out_rank, solver=solver, residual=residual)
    try:
        for chunk in chunks:
            with PeakMemory(dev) as pm:
                pairs = []
                for t in chunk:
                    B, A, w = synthetic_module(t.m, t.n, clients, rank, dtype=tdtype, seed=seed,
                                               index=index[t.name], device=dev)
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
                    fl = [solver_flops(chunk[i].m, chunk[i].n, R, out_rank, r_.solver)["total"]
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
                if budget is not None:  # a kept scratch buffer is not in the next chunk's estimate
                    _release_workspace()
            peak_round = max(peak_round, pm.peak_bytes)
            for i, t in enumerate(chunk):
                r_ = results[i]
                gsize = next(len(g) for g in groups if i in g)
                records.append(module_record(t.name, t.m, t.n, ranks, out_rank, r_.solver, seconds[i],
                                             r_.energy_kept, itemsize=itemsize,
                                             peak_memory_bytes=pm.delta_bytes, kind=t.kind,
                                             batch_size=gsize))
            del results
    finally:
        if bar is not None:
            bar.close()

    baselines: dict[str, Any] = {}
    if compare:
        b_mods = list(shapes.modules(min(baseline_layers, n_layers)))
        ours_layer = sum(rec.seconds for rec in records if rec.name in {t.name for t in b_mods})
        for c in compare:
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
                    B, A, w = synthetic_module(t.m, t.n, clients, rank, dtype=tdtype, seed=seed,
                                               index=index[t.name], device=dev)
                    with PeakMemory(dev) as pm:
                        secs = _run_baseline(c, B, A, w, out_rank, dev)
                    del B, A
                    cache[key] = (secs, pm.delta_bytes)
                secs, peak = cache[key]
                fl = baseline_flops(t.m, t.n, R, out_rank, c)["total"]
                by = baseline_bytes(t.m, t.n, ranks, out_rank, c, itemsize=itemsize)["total"]
                rows.append({"name": t.name, "m": t.m, "n": t.n, "R": R, "seconds": secs,
                             "flops": fl, "bytes": by, "peak_memory_bytes": peak,
                             "reused_same_shape": reused})
            secs = sum(r_["seconds"] for r_ in rows)
            nl = min(baseline_layers, n_layers)
            baselines[c] = {"layers": nl, "modules": rows, "seconds": secs,
                            "round_seconds_extrapolated": secs / nl * shapes.num_layers,
                            "ratio_to_fedmomentum": secs / ours_layer if ours_layer > 0 else None}

    per_layer = agg_total / n_layers
    report: dict[str, Any] = {
        "model": shapes.model, "clients": clients, "rank": rank, "dtype": dname, "device": str(dev),
        "modules": [rec.to_dict() for rec in records],
        "round_seconds": agg_total,
        "round_seconds_extrapolated": per_layer * shapes.num_layers,
        "extrapolated": n_layers < shapes.num_layers,
        "layers_measured": n_layers, "num_layers": shapes.num_layers,
        "solver": solver, "residual": residual, "batched": batched, "max_memory_bytes": budget,
        "chunks": len(chunks),
        "totals": {"seconds": agg_total, "flops": sum(r_.flops for r_ in records),
                   "bytes": sum(r_.bytes for r_ in records),
                   "peak_memory_bytes": max((r_.peak_memory_bytes for r_ in records), default=0),
                   "peak_process_memory_bytes": peak_round,
                   "solvers": sorted({r_.solver for r_ in records})},
        "baselines": baselines,
        "threads": torch.get_num_threads(),
    }
    if gram_floor:
        report["gram_floor_seconds"] = gram_total
        report["ratio_to_gram_floor"] = agg_total / gram_total if gram_total > 0 else None
    return report


def _shape_groups(chunk: Sequence[ModuleShape]) -> list[list[int]]:
    """Indices of ``chunk`` grouped by (m, n), in order of first appearance."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, t in enumerate(chunk):
        groups.setdefault((t.m, t.n), []).append(i)
    return list(groups.values())
