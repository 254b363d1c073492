"""Shared helpers for the benchmark scripts: timing, machine description, sampled errors."""
from __future__ import annotations

import csv
import os
import platform
import time
from typing import Callable, Iterable

import torch


def cpu_name() -> str:
    """The CPU model (Linux ``/proc/cpuinfo``; elsewhere what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """A short description of the CPU (and GPU when present) this ran on."""
    cpu = cpu_name()
    desc = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        desc += f", {torch.cuda.get_device_name(0)}"
    return desc


def timeit(fn: Callable, *, repeat: int = 3, warmup: bool = True, budget_s: float = 20.0):
    """Best-of-``repeat`` wall time (seconds) and the last result. One run only when a single run
    takes longer than budget_s / repeat."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    if warmup:
        t0 = time.perf_counter()
        out = fn()
        sync()
        first = time.perf_counter() - t0
        if first * repeat > budget_s:
            return first, out
    best = float("inf")
    out = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best, out


def timeit_interleaved(fns: dict, *, repeat: int = 30, budget_s: float = 30.0) -> dict:
    """Best wall time of several routes timed in alternating rounds (route 1, route 2, ..., then
    again), so that a slow spell of a noisy machine hits every route alike and their ratios are
    measured side by side. Each route's last result stays alive until its next call (as in
    :func:`timeit`: a result is never freed inside a timed region). After one warm-up run each,
    as many rounds as fit in ``budget_s`` (at least 1, at most ``repeat``). Returns
    ``{name: (seconds, last result, rounds)}``."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    best, outs = {}, {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        outs[name] = fn()
        sync()
        best[name] = time.perf_counter() - t0
    rounds = max(1, min(repeat, int(budget_s / max(sum(best.values()), 1e-9))))
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            outs[name] = fn()
            sync()
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: (best[name], outs[name], rounds) for name in fns}


def sampled_rel_err(get_block: Callable, ref_block: Callable, m: int, n: int, k: int = 512, seed: int = 0):
    """‖X − ΔW‖_F / ‖ΔW‖_F estimated on a random k x k block of rows/cols (unbiased for the ratio of
    squared norms). ``get_block(rows, cols)`` and ``ref_block(rows, cols)`` return fp64 blocks."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(m, generator=g)[:min(k, m)]
    cols = torch.randperm(n, generator=g)[:min(k, n)]
    ref = ref_block(rows, cols)
    return float((get_block(rows, cols) - ref).norm() / ref.norm())


def write_csv(path: str, rows: Iterable[dict]) -> None:
    rows = list(rows)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    keys: list = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
