"""Before/after: the same measurements on two source trees of this project, side by side.

    python benchmarks/compare_trees.py --old REV [--new WORKTREE] [--rounds 3] [--skip-round]

``--old`` is a git revision (checked out into a temporary worktree) and ``--new`` defaults to this
checkout. Each measurement runs in a fresh subprocess whose ``sys.path`` holds one tree's three
import packages; the subprocesses alternate old, new, old, new, ... so that a slow spell of a
noisy machine hits both trees alike. Reported per tree: the best over the rounds, and the ratio
new / old (below 1: the new tree is faster).

Measurements (the issue "One home for every rule" asks for these):

* ``layer``: one 4096 x 4096 layer, K = 10 clients of rank 16, fp32: ``aggregate_lora(solver=
  "exact")`` beside its floor (the two Gram GEMMs of the stacked factors) and the paper's dense
  route (dense ΔW + ``torch.svd_lowrank(q=r+10, niter=2)``), all in the same process.
* ``round``: the Llama-70B-shaped round (80 x 7 modules, K=10, r=16, bf16 factors,
  ``residual="stacked"``) by ``profile_round``, beside its Gram floor.
* ``peft``: ``benchmarks/run_peft.py``'s first case (``aggregate_adapters`` from folders vs PEFT's
  ``add_weighted_adapter(..., "svd")``).

Writes ``benchmarks/results/compare_trees.{csv,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

WORKER = r'''
import json, sys, time, functools
import torch
what = sys.argv[1]
def best(fn, n):
    fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return min(ts)
if what == "layer":
    import fedmomentum as fm
    m = n = 4096; K = 10; r = 16; s = 2.0
    g = torch.Generator().manual_seed(0)
    B = [torch.randn(m, r, generator=g) for _ in range(K)]
    A = [torch.randn(r, n, generator=g) * 0.01 for _ in range(K)]
    w = [float(k + 1) for k in range(K)]
    p = [x / sum(w) for x in w]
    Bc = torch.cat([pk * s * b for pk, b in zip(p, B)], 1); Ac = torch.cat(A, 0)
    ours = functools.partial(fm.aggregate_lora, B, A, w, scalings=s, rank=r, solver="exact")
    floor = lambda: (Bc.T @ Bc, Ac @ Ac.T)
    def paper():
        dW = Bc @ Ac
        return torch.svd_lowrank(dW, q=r + 10, niter=2)
    out = {"exact": [], "floor": [], "svd_lowrank": []}
    for i in range(15):  # alternating inside the process too
        out["floor"].append(best(floor, 1)); out["exact"].append(best(ours, 1))
        if i < 3:
            out["svd_lowrank"].append(best(paper, 1))
    print(json.dumps({k: min(v) for k, v in out.items()}))
elif what == "round":
    from fedmomentum_core.profiling import profile_round
    rep = profile_round("llama-70b", 10, 16, dtype="bf16", gram_floor=True, layers_at_once=4,
                        residual="stacked", progress=False)
    print(json.dumps({"round": rep["round_seconds"], "floor": rep["gram_floor_seconds"]}))
elif what == "peft":
    sys.path.insert(0, sys.argv[2])
    import run_peft
    row = run_peft.run_case(1024, 2816, 1, 3, 16, run_peft.TARGETS)
    print(json.dumps({"ours_exact": row["ours_exact_s"], "peft_svd": row["peft_svd_s"]}))
'''


def _pkgs_dir(tree: Path, tmp: Path, label: str) -> Path:
    """A folder holding the tree's three import packages under their import names (symlinks), so
    that old layouts (folders mapped by package-dir) and new ones (packages inside folders) both
    import the same way."""
    d = tmp / f"pkgs_{label}"
    d.mkdir()
    for name, cands in {"fedmomentum": ["bindings/fedmomentum", "bindings"],
                        "fedmomentum_kernels": ["kernels/fedmomentum_kernels", "kernels"],
                        "fedmomentum_core": ["fedmomentum_core"]}.items():
        for c in cands:
            if (tree / c / "__init__.py").exists():
                (d / name).symlink_to(tree / c)
                break
        else:
            raise SystemExit(f"{tree}: no package folder for {name}")
    return d


def _run(pkgs: Path, what: str, bench_dir: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(pkgs), FEDMOMENTUM_MALLOC="system")
    out = subprocess.run([sys.executable, "-c", WORKER, what, str(bench_dir)], env=env, cwd=tempfile.gettempdir(),
                         capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"{what} on {pkgs} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", required=True, help="git revision of the 'before' tree")
    ap.add_argument("--new", default=str(ROOT), help="the 'after' tree (default: this checkout)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-round", action="store_true")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from common import machine
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        old_tree = tmp / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(old_tree), args.old],
                       check=True)
        try:
            trees = {"old": old_tree, "new": Path(args.new).resolve()}
            pkgs = {k: _pkgs_dir(v, tmp, k) for k, v in trees.items()}
            whats = ["layer"] + ([] if args.skip_round else ["round"]) + ([] if args.skip_peft else ["peft"])
            res: dict = {w: {"old": [], "new": []} for w in whats}
            for i in range(args.rounds):
                for w in whats:
                    for label in (("old", "new") if i % 2 == 0 else ("new", "old")):
                        r = _run(pkgs[label], w, trees["new"] / "benchmarks")
                        res[w][label].append(r)
                        print(f"round {i} {w} {label}: {r}", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_tree)], check=False)
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.old], capture_output=True,
                         text=True).stdout.strip()
    rows = []
    for w, per in res.items():
        keys = per["old"][0].keys()
        for k in keys:
            o = min(x[k] for x in per["old"])
            n = min(x[k] for x in per["new"])
            rows.append({"measurement": w, "quantity": k, "old_s": round(o, 4), "new_s": round(n, 4),
                         "new_over_old": round(n / o, 3)})
    # the ratios that matter: ours over the floor / the peer, within each tree
    ratio_rows = []
    for label in ("old", "new"):
        lay = {k: min(x[k] for x in res["layer"][label]) for k in res["layer"][label][0]}
        rr = {"tree": label, "exact_over_floor": round(lay["exact"] / lay["floor"], 2),
              "svd_lowrank_over_exact": round(lay["svd_lowrank"] / lay["exact"], 1)}
        if "round" in res:
            rnd = min(res["round"][label], key=lambda x: x["round"])
            rr["round_over_floor"] = round(rnd["round"] / rnd["floor"], 2)
        if "peft" in res:
            pf = {k: min(x[k] for x in res["peft"][label]) for k in res["peft"][label][0]}
            rr["peft_over_ours"] = round(pf["peft_svd"] / pf["ours_exact"], 1)
        ratio_rows.append(rr)
    os.makedirs(args.out, exist_ok=True)
    import csv
    with open(os.path.join(args.out, "compare_trees.csv"), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    md = ["# Before/after: the same measurements on two trees (`benchmarks/compare_trees.py`)\n",
          f"Machine: {machine()}. Old tree: `{rev}`; new tree: the checkout. {args.rounds} alternating "
          f"rounds, fresh subprocess each, best per tree; date {time.strftime('%Y-%m-%d')}.\n",
          "| measurement | quantity | old s | new s | new/old |", "|---|---|---|---|---|"]
    md += [f"| {r['measurement']} | {r['quantity']} | {r['old_s']} | {r['new_s']} | {r['new_over_old']} |" for r in rows]
    md += ["", "Ratios within each tree (lower is better for ours/floor, higher for peer/ours):", "",
           "| tree | " + " | ".join(k for k in ratio_rows[0] if k != "tree") + " |",
           "|---|" + "---|" * (len(ratio_rows[0]) - 1)]
    md += ["| " + " | ".join(str(v) for v in rr.values()) + " |" for rr in ratio_rows]
    Path(args.out, "compare_trees.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
