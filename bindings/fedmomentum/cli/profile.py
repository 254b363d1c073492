"""``fedmomentum profile``: what one aggregation round of a model costs, measured for real.

    fedmomentum profile --model NAME|CONFIG.json --clients K --rank R [--dtype bf16|fp16|fp32]
        [--layers N] [--solver NAME] [--device cpu|cuda] [--compare dense_lowrank,dense_full]
        [--json OUT.json] [--plot OUT.png]

Synthetic client factors are generated seeded, layer by layer (never the whole round at once),
aggregated with FedMomentum, and reported per module (name, m, n, R, seconds, FLOPs, bytes,
peak memory, energy kept) and per round (measured for ``--layers N``, extrapolated to the full
depth and marked as such), with the ``--compare`` baselines run on the first layer.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Optional


def register(sub) -> None:
    """Add the ``profile`` subcommand to ``sub`` (an argparse subparsers object)."""
    from fedmomentum_core.shapes import builtin_names

    p = sub.add_parser("profile", help="measure the cost of one aggregation round of a model "
                       "(synthetic clients, per module and per round)",
                       description="Aggregate a synthetic round of MODEL for real and report the cost "
                       "per module and per round.")
    p.add_argument("--model", required=True, metavar="NAME|CONFIG.json",
                   help=f"a built-in ({', '.join(builtin_names())}) or a transformers config.json "
                        "(file or folder)")
    p.add_argument("--clients", type=int, required=True, metavar="K", help="number of clients K")
    p.add_argument("--rank", type=int, required=True, metavar="R", help="LoRA rank r of every client")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                   help="dtype of the client factors (default bf16)")
    p.add_argument("--layers", type=int, default=None, metavar="N",
                   help="measure the first N layers and extrapolate to the full depth (default: all)")
    p.add_argument("--solver", default="auto", choices=["auto", "exact", "randomized", "dense"],
                   help="FedMomentum solver (default auto: the cost model picks)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to aggregate")
    p.add_argument("--compare", default="", metavar="dense_lowrank,dense_full",
                   help="comma-separated dense baselines to time on the first layer")
    p.add_argument("--json", default=None, metavar="OUT.json", help="write the full report as JSON")
    p.add_argument("--plot", default=None, metavar="OUT.png",
                   help="plot time per module type, ours vs the baselines (needs matplotlib)")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory budget for the modules held at once, e.g. 2GB (default: one layer)")
    p.add_argument("--residual", default="factored", choices=["factored", "stacked", "none"],
                   help="residual form: factored (SVD tail, default), stacked (exact remainder, no "
                        "tail products: about half the work) or none")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic clients (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _fmt_s(x: float) -> str:
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def _fmt_b(b: float) -> str:
    from fedmomentum_core.memory import format_bytes
    return format_bytes(b, digits=1)


def format_report(rep: dict[str, Any], max_rows: int = 14) -> str:
    """Human-readable summary of a :func:`fedmomentum_core.profiling.profile_round` report."""
    lines = [f"fedmomentum profile: {rep['model']}, K={rep['clients']} clients, rank {rep['rank']} "
             f"(R = {rep['clients'] * rep['rank']}), {rep['dtype']} on {rep['device']}, "
             f"{rep['threads']} threads"]
    lines.append(f"{'module':<40} {'m':>6} {'n':>6} {'R':>5} {'solver':>10} {'time':>10} "
                 f"{'GFLOP':>8} {'MiB moved':>10} {'peak mem':>10} {'energy':>7}")
    mods = rep["modules"]
    shown = mods if len(mods) <= max_rows else mods[:max_rows]
    for r in shown:
        e = r["energy_kept"]
        lines.append(f"{r['name'][-40:]:<40} {r['m']:>6} {r['n']:>6} {r['R']:>5} {r['solver']:>10} "
                     f"{_fmt_s(r['seconds']):>10} {r['flops'] / 1e9:>8.2f} {r['bytes'] / 2 ** 20:>10.1f} "
                     f"{_fmt_b(r['peak_memory_bytes']):>10} {(e if e is not None else float('nan')):>7.3f}")
    if len(mods) > len(shown):
        lines.append(f"... {len(mods) - len(shown)} more modules (see --json)")
    t = rep["totals"]
    lines.append(f"measured: {rep['layers_measured']} of {rep['num_layers']} layers in "
                 f"{_fmt_s(rep['round_seconds'])}; {t['flops'] / 1e9:.1f} GFLOP, "
                 f"{t['bytes'] / 2 ** 30:.2f} GiB moved, peak process memory "
                 f"{_fmt_b(t['peak_process_memory_bytes'])}; solvers {', '.join(t['solvers'])}")
    tag = " (extrapolated)" if rep["extrapolated"] else " (measured)"
    lines.append(f"round ({rep['num_layers']} layers): {_fmt_s(rep['round_seconds_extrapolated'])}{tag}")
    for name, b in rep.get("baselines", {}).items():
        ratio = b.get("ratio_to_fedmomentum")
        rs = f"{ratio:.1f}x fedmomentum" if ratio else "-"
        lines.append(f"baseline {name}: {_fmt_s(b['seconds'])} for {b['layers']} layer(s) ({rs}); "
                     f"round {_fmt_s(b['round_seconds_extrapolated'])} (extrapolated)")
    return "\n".join(lines)


def plot_report(rep: dict[str, Any], path: str) -> None:
    """Bar chart of seconds per module type (summed over the baseline layers), ours vs baselines."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'fedmomentum[plot]'") from None
    base_layers = {b["layers"] for b in rep.get("baselines", {}).values()} or {rep["layers_measured"]}
    nl = min(base_layers)
    kinds: list[str] = []
    for r in rep["modules"]:
        k = r.get("kind") or r["name"].rsplit(".", 1)[-1]
        if k not in kinds:
            kinds.append(k)

    def kind_of(name: str) -> str:
        tail = name.rsplit(".", 1)[-1]
        return tail[:-5] if tail.endswith("_proj") else tail

    prefix_layers = {f"model.layers.{i}." for i in range(nl)}
    series = {"fedmomentum": {k: 0.0 for k in kinds}}
    for r in rep["modules"]:
        if any(r["name"].startswith(p) for p in prefix_layers):
            series["fedmomentum"][r.get("kind") or kind_of(r["name"])] += r["seconds"]
    for name, b in rep.get("baselines", {}).items():
        series[name] = {k: 0.0 for k in kinds}
        for r in b["modules"]:
            series[name][kind_of(r["name"])] += r["seconds"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(series)
    for j, (label, vals) in enumerate(series.items()):
        xs = [i + j * width for i in range(len(kinds))]
        ax.bar(xs, [vals[k] for k in kinds], width=width, label=label)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(kinds))])
    ax.set_xticklabels(kinds)
    ax.set_ylabel(f"seconds ({nl} layer{'s' if nl > 1 else ''})")
    if len(series) > 1:
        ax.set_yscale("log")
    ax.set_title(f"{rep['model']}: K={rep['clients']}, r={rep['rank']}, {rep['dtype']}, {rep['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def run(args) -> int:
    from fedmomentum_core.profiling import profile_round

    compare = [c for c in (args.compare or "").split(",") if c.strip()]
    for path in (args.json, args.plot):
        if path:
            d = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(d):
                raise ValueError(f"cannot write {path}: folder {d} does not exist")
    rep = profile_round(args.model, args.clients, args.rank, dtype=args.dtype, layers=args.layers,
                        solver=args.solver, device=args.device, compare=compare, seed=args.seed,
                        max_memory=args.max_memory, residual=args.residual, progress=not args.no_progress)
    print(format_report(rep))
    if args.json:
        _atomic_write(args.json, json.dumps(rep, indent=1))
        print(f"wrote {args.json}")
    if args.plot:
        plot_report(rep, args.plot)
        print(f"wrote {args.plot}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:  # pragma: no cover - convenience
    from . import main as cli_main
    return cli_main(["profile", *(argv or sys.argv[1:])])
