"""Experiment reports: convergence plots, per-method summary, markdown table, config as JSON."""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np

from .federation import ExperimentConfig


def _curves(rows: Sequence[dict], key: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """method → (rounds, values[seed, round])."""
    out = {}
    for m in dict.fromkeys(r["method"] for r in rows):
        mr = [r for r in rows if r["method"] == m]
        rounds = np.array(sorted({int(r["round"]) for r in mr}))
        seeds = sorted({int(r["seed"]) for r in mr})
        vals = np.full((len(seeds), len(rounds)), np.nan)
        for r in mr:
            vals[seeds.index(int(r["seed"])), int(np.searchsorted(rounds, int(r["round"])))] = float(r[key])
        out[m] = (rounds, vals)
    return out


def plot_convergence(rows: Sequence[dict], path, title: str = "") -> Path:
    """Accuracy and loss vs round, one line per method (mean over seeds, band = ± one std)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, axes = plt.subplots(1, 2, figsize=(13.5, 4.8))
    first = rows[0]["method"] if rows else None  # the method under test is listed first: drawn thicker
    # one distinct look per method, up to 20 methods x 4 line styles: tab20's dark shades first,
    # then its light ones; the line style changes every 10 methods so no two lines look alike
    palette = plt.get_cmap("tab20").colors
    colors = palette[0::2] + palette[1::2]
    styles = ("-", "--", ":", "-.")
    methods = list(dict.fromkeys(r["method"] for r in rows))
    band = 0.15 if len(methods) <= 6 else 0.06
    for ax, key, label in ((axes[0], "eval_accuracy", "held-out accuracy"), (axes[1], "eval_loss", "held-out loss")):
        for m, (rounds, vals) in _curves(rows, key).items():
            i = methods.index(m)
            mean, std = np.nanmean(vals, 0), np.nanstd(vals, 0)
            line, = ax.plot(rounds, mean, marker="o", ms=3, label=f"{m} (n={vals.shape[0]})",
                            color=colors[i % len(colors)], ls=styles[(i // 10) % len(styles)],
                            lw=2.4 if m == first else 1.4)
            ax.fill_between(rounds, mean - std, mean + std, color=line.get_color(), alpha=band)
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def summarize(rows: Sequence[dict], target_accuracy: float) -> list[dict]:
    """Per method: final accuracy/loss (mean, std over seeds), best accuracy, rounds to target
    (first round whose seed-mean accuracy ≥ target; per seed too), mean aggregation seconds."""
    acc = _curves(rows, "eval_accuracy")
    loss = _curves(rows, "eval_loss")
    agg = _curves(rows, "aggregation_seconds")
    out = []
    for m, (rounds, vals) in acc.items():
        mean = np.nanmean(vals, 0)
        hit = np.flatnonzero(mean >= target_accuracy)
        per_seed = []
        for s in range(vals.shape[0]):
            h = np.flatnonzero(vals[s] >= target_accuracy)
            per_seed.append(int(rounds[h[0]]) if h.size else None)
        out.append(dict(method=m, seeds=vals.shape[0], final_accuracy=float(mean[-1]),
                        final_accuracy_std=float(np.nanstd(vals[:, -1])),
                        final_loss=float(np.nanmean(loss[m][1][:, -1])), best_accuracy=float(mean.max()),
                        rounds_to_target=int(rounds[hit[0]]) if hit.size else None,
                        rounds_to_target_per_seed=per_seed,
                        aggregation_seconds=float(np.nanmean(agg[m][1][:, 1:])) if vals.shape[1] > 1 else 0.0))
    return out


def summary_markdown(summary: Sequence[dict], target_accuracy: float, rounds: int) -> str:
    """A markdown table of :func:`summarize`'s output."""
    lines = [f"| method | final accuracy (mean ± std) | final loss | best mean accuracy | rounds to "
             f"{target_accuracy:.0%} (seed mean curve) | per seed | aggregation s/round |",
             "|---|---|---|---|---|---|---|"]
    for s in summary:
        rt = s["rounds_to_target"]
        lines.append(f"| {s['method']} | {s['final_accuracy']:.4f} ± {s['final_accuracy_std']:.4f} | "
                     f"{s['final_loss']:.4f} | {s['best_accuracy']:.4f} | "
                     f"{rt if rt is not None else f'not within {rounds}'} | "
                     f"{', '.join('-' if x is None else str(x) for x in s['rounds_to_target_per_seed'])} | "
                     f"{s['aggregation_seconds']:.4f} |")
    return "\n".join(lines) + "\n"


def config_dict(config: ExperimentConfig) -> dict:
    """The config as plain JSON-able values."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}

