"""A full federated round at 70B scale on this machine, for real: time, Gram-GEMM floor, peak RSS.

    python benchmarks/run_round.py [--model llama-70b] [--clients 10] [--rank 16] [--layers N]
        [--layers-at-once 4] [--threads T] [--k100-layers N] [--batch-layers 4] [--out DIR]
        [--malloc reuse|system] [--skip-system-malloc]

1. The round (every layer unless ``--layers``): seeded bf16 client factors generated chunk by
   chunk (``--layers-at-once`` layers held at a time, never the whole round), aggregated with
   FedMomentum (``solver=auto``, same-shaped modules batched), and in the same run the two fp32
   Gram GEMMs ``B_catᵀB_cat``, ``A_cat A_catᵀ`` of every module timed on their own: the floor of
   any exact factored method. Reported: round seconds, floor seconds, their ratio, peak RSS.
   With ``--malloc reuse`` (default) the round runs first under the C library's default allocator
   policy, then under :func:`fedmomentum.reuse_freed_memory` (what the CLI applies), which recycles
   the round's freed buffers instead of zero-filling fresh pages; every later scenario uses it.
2. Batched-by-shape vs a per-module loop on ``--batch-layers`` layers (same factors).
3. Where the time goes in one layer (torch.profiler, self CPU time by phase).
4. The same round with K=100 clients (``--k100-layers`` layers; extrapolated when fewer than all).

Writes ``round_cpu.csv``, ``round_cpu.md`` and ``round_cpu.json`` under ``--out``
(default ``benchmarks/results``). Other processes sharing the CPU distort timings: the load
average is recorded before and after every scenario.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from typing import Any

import torch

from fedmomentum_core.profiling import profile_round
from fedmomentum_core.synthetic import synthetic_module

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_name  # noqa: E402
from fedmomentum_core.shapes import model_shapes


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover
        return float("nan")


def _phase(name: str, shapes: list) -> str:
    """Classify one aten op (name, input shapes) of the exact solver into a phase."""
    dims = [d for s in shapes if isinstance(s, (list, tuple)) for d in s if isinstance(d, int)]
    big = any(d >= 1000 for d in dims)
    if name in ("aten::mm", "aten::bmm", "aten::matmul", "aten::addmm"):
        if not big:
            return "RxR work"
        # Gram: (R x big) @ (big x R); forming U/σV: (big x R) @ (R x k)
        s0, s1 = (shapes[0], shapes[1]) if len(shapes) > 1 else (shapes[0], shapes[0])
        if len(s0) == 2 and len(s1) == 2 and s0[1] >= 1000 and s1[0] >= 1000:
            return "Gram GEMMs"
        return "forming U, V"
    if name.startswith("aten::linalg") or name.startswith("aten::_linalg") or "cholesky" in name \
            or "eigh" in name or "triangular" in name:
        return "RxR work"
    if name in ("aten::copy_", "aten::cat", "aten::_to_copy", "aten::to", "aten::stack"):
        return "cast/cat + outputs" if big else "RxR work"
    if name in ("aten::sum", "aten::isfinite", "aten::all", "aten::abs", "aten::max"):
        return "validation (finite checks)" if big else "RxR work"
    if big:
        return "elementwise on factors (scale, residual, outputs)"
    return "RxR work"


def breakdown(model: str, clients: int, rank: int, residual: str = "factored") -> dict[str, float]:
    """Self CPU seconds by phase for one layer (7 modules, batched by shape)."""
    from torch.profiler import ProfilerActivity, profile

    from fedmomentum_core import aggregate_layers
    shapes = model_shapes(model)
    mods = shapes.layer_modules(0)
    pairs, w = [], None
    for i, t in enumerate(mods):
        B, A, w = synthetic_module(t.m, t.n, clients, rank, seed=0, index=i)
        pairs.append((B, A))
    groups: dict = {}
    for i, t in enumerate(mods):
        groups.setdefault((t.m, t.n), []).append(i)
    for g in groups.values():  # warm-up
        aggregate_layers([pairs[i] for i in g], w, rank=rank, residual=residual)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        for g in groups.values():
            aggregate_layers([pairs[i] for i in g], w, rank=rank, residual=residual)
        wall = time.perf_counter() - t0
    out: dict[str, float] = {}
    for ev in prof.key_averages(group_by_input_shape=True):
        if not ev.key.startswith("aten::"):
            continue
        try:
            shp = json.loads(str(ev.input_shapes).replace("'", '"')) if ev.input_shapes else []
        except (ValueError, TypeError):
            shp = list(ev.input_shapes) if ev.input_shapes else []
        ph = _phase(ev.key, shp)
        out[ph] = out.get(ph, 0.0) + ev.self_cpu_time_total / 1e6
    out = dict(sorted(out.items(), key=lambda kv: -kv[1]))
    out["wall (profiled)"] = wall
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-70b")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--layers", type=int, default=None, help="layers of the main round (default all)")
    ap.add_argument("--layers-at-once", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default torch's)")
    ap.add_argument("--k100-layers", type=int, default=None, help="layers of the K=100 round (default all)")
    ap.add_argument("--skip-k100", action="store_true")
    ap.add_argument("--residual", default="stacked", choices=["factored", "stacked", "none"],
                    help="residual form of the main round (default stacked: exact, no tail products)")
    ap.add_argument("--skip-factored", action="store_true",
                    help="skip the second round with residual='factored' (the SVD tail)")
    ap.add_argument("--batch-layers", type=int, default=4)
    ap.add_argument("--malloc", default="reuse", choices=["reuse", "system"],
                    help="allocator policy of the measured rounds: 'reuse' (what the fedmomentum CLI "
                         "runs, fedmomentum.reuse_freed_memory) or the C library's default")
    ap.add_argument("--skip-system-malloc", action="store_true",
                    help="with --malloc reuse, skip the first round run under the default policy")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "python": platform.python_version()}
    print(f"machine: {machine}", flush=True)
    rows: list[dict[str, Any]] = []
    reports: dict[str, Any] = {"machine": machine}

    def scenario(label, **kw):
        l0 = _load()
        t0 = time.perf_counter()
        rep = profile_round(args.model, kw.pop("clients", args.clients), args.rank, dtype="bf16", **kw)
        wall = time.perf_counter() - t0
        l1 = _load()
        floor = rep.get("gram_floor_seconds")
        row = {"scenario": label, "model": rep["model"], "clients": rep["clients"], "rank": rep["rank"],
               "dtype": rep["dtype"], "layers_measured": rep["layers_measured"],
               "num_layers": rep["num_layers"], "batched": rep["batched"],
               "round_seconds": round(rep["round_seconds"], 3),
               "round_seconds_extrapolated": round(rep["round_seconds_extrapolated"], 3),
               "extrapolated": rep["extrapolated"],
               "gram_floor_seconds": round(floor, 3) if floor else "",
               "ratio_to_gram_floor": round(rep["round_seconds"] / floor, 2) if floor else "",
               "peak_rss_gib": round(rep["totals"]["peak_process_memory_bytes"] / 2 ** 30, 3),
               "solvers": "+".join(rep["totals"]["solvers"]), "tflop": round(rep["totals"]["flops"] / 1e12, 3),
               "wall_seconds_incl_generation": round(wall, 1), "threads": torch.get_num_threads(),
               "load_avg_before": round(l0, 2), "load_avg_after": round(l1, 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        return rep

    if args.malloc == "reuse" and not args.skip_system_malloc:
        # the same round under glibc's default policy first (the policy cannot be undone in-process)
        s_rep = scenario(f"round (residual={args.residual}, default malloc)", layers=args.layers,
                         gram_floor=True, layers_at_once=args.layers_at_once, residual=args.residual,
                         progress=True)
        reports["round_default_malloc"] = {kk: v for kk, v in s_rep.items() if kk != "modules"}
    if args.malloc == "reuse":
        from fedmomentum.cli.alloc import allocator_policy, reuse_freed_memory
        reuse_freed_memory()
        machine["malloc"] = allocator_policy()
        print(f"allocator: {machine['malloc']}", flush=True)
    main_rep = scenario(f"round (residual={args.residual})", layers=args.layers, gram_floor=True,
                        layers_at_once=args.layers_at_once, residual=args.residual, progress=True)
    reports["round"] = {kk: v for kk, v in main_rep.items() if kk != "modules"}
    if not args.skip_factored and args.residual != "factored":
        f_rep = scenario("round (residual=factored)", layers=args.layers, gram_floor=True,
                         layers_at_once=args.layers_at_once, residual="factored", progress=True)
        reports["round_factored"] = {kk: v for kk, v in f_rep.items() if kk != "modules"}
    nb = min(args.batch_layers, model_shapes(args.model).num_layers)
    b = scenario("batched", layers=nb, layers_at_once=nb, batched=True, residual=args.residual, progress=False)
    u = scenario("per-module loop", layers=nb, layers_at_once=nb, batched=False, residual=args.residual, progress=False)
    reports["batched_speedup"] = u["round_seconds"] / b["round_seconds"]
    print(f"batched speedup over the per-module loop: {reports['batched_speedup']:.2f}x", flush=True)
    reports["breakdown_one_layer"] = breakdown(args.model, args.clients, args.rank, args.residual)
    print(f"breakdown (one layer): {reports['breakdown_one_layer']}", flush=True)
    if not args.skip_k100:
        k = scenario(f"round K=100 (residual={args.residual})", clients=100, layers=args.k100_layers,
                     gram_floor=False, layers_at_once=1, residual=args.residual, progress=True)
        reports["round_k100"] = {kk: v for kk, v in k.items() if kk != "modules"}
        reports["round_k100"]["solver_by_kind"] = {m["kind"]: m["solver"] for m in k["modules"]}

    csv_path = os.path.join(args.out, "round_cpu.csv")
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    with open(os.path.join(args.out, "round_cpu.json"), "w", encoding="utf-8") as f:
        json.dump(reports, f, indent=1)
    md = [f"# {args.model} round on CPU (`benchmarks/run_round.py`)", "",
          f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, "
          f"{machine['threads']} threads; allocator policy after the first row: "
          f"{machine.get('malloc') or 'C library default'}. Load average before/after each scenario is in the CSV "
          "(other jobs shared the CPU: > cores means contention).", "",
          "| scenario | K | layers | seconds | extrapolated round | Gram floor | ratio | peak RSS GiB | solvers |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['scenario']} | {r['clients']} | {r['layers_measured']}/{r['num_layers']} | "
                  f"{r['round_seconds']} | {r['round_seconds_extrapolated']}"
                  f"{' (extrap.)' if r['extrapolated'] else ''} | {r['gram_floor_seconds']} | "
                  f"{r['ratio_to_gram_floor']} | {r['peak_rss_gib']} | {r['solvers']} |")
    md += ["", f"Batched by shape vs per-module loop ({nb} layers): "
               f"{reports['batched_speedup']:.2f}x.", "", "Where one layer's time goes (self CPU s):", ""]
    md += [f"- {k}: {v:.3f}" for k, v in reports["breakdown_one_layer"].items()]
    if "round_k100" in reports:
        md += ["", f"K=100 solver per module kind: {reports['round_k100']['solver_by_kind']}"]
    with open(os.path.join(args.out, "round_cpu.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")
    print(f"wrote {csv_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
