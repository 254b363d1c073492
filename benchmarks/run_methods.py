"""Issue 17's baselines, ours (factored) vs the same method in its dense form as FedLLM-Factory
computes it (form the m x n ΔW per module, then ``torch.linalg.svd`` / ``qr``), one process.

Writes benchmarks/results/methods_cpu.{md,csv}.

    python benchmarks/run_methods.py            # one Llama-7B-shaped layer: q,k,v,o 4096x4096,
                                                # gate/up 11008x4096, down 4096x11008; K=10, r=16
    python benchmarks/run_methods.py --quick    # hidden 1024, intermediate 2752 (a smoke run)

Per method, ours is ``fedmomentum.aggregate_lora(..., method=...)`` on every one of the 7 modules
(best of 3 each; summed). The dense form is timed ONCE per distinct module shape and multiplied by
the number of modules of that shape (best of 3 when a run is under 10 s, else one run), because a dense SVD of 4096 x 4096 takes minutes on 2 cores:
4096 x 4096 (q, k, v, o: x4) and 11008 x 4096 (gate, up: x2, and down, 4096 x 11008, x1: LAPACK
factors the transpose of a wide matrix at the same cost, so its time is reused). Dense forms:

* flexlora: ΔW = Σ p_k s_k B_k A_k (K GEMMs), ``torch.linalg.svd(ΔW, full_matrices=False)``, K
  truncations U_{r_k}Σ_{r_k}, V_{r_k}ᵀ.
* hetlora: the K dense products B_k A_k for the norms ‖B_k A_k‖_F (as the paper writes them), then
  the padded weighted averages.
* fedsvd: B̄ = Σ p_k B_k, ``torch.linalg.svd(B̄ @ A)`` (FedLLM-Factory's ``alg/fedsvd.py``).
* rolora: average the trained factor: no m x n step in either form (same code, ratio ~1).
* fedrot_lora: r x r Procrustes per client: no m x n step in the algorithm (no dense form).
* ilora: ΔW dense, ``torch.linalg.qr(ΔW)`` (reduced), B = Q[:, :r], A = R[:r].

``diff``: ‖ours − dense‖_F / ‖dense‖_F of the product s·B·A on a random 512 x 512 block (first
module of each shape; for flexlora also max over the clients' per-client products).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, timeit, write_csv  # noqa: E402

import fedmomentum as fm  # noqa: E402

HERE = Path(__file__).resolve().parent
METHODS = ["flexlora", "hetlora", "fedsvd", "rolora", "fedrot_lora", "ilora"]


def modules(hidden: int, inter: int):
    sq = (hidden, hidden)
    return [("q_proj", sq), ("k_proj", sq), ("v_proj", sq), ("o_proj", sq),
            ("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)), ("down_proj", (hidden, inter))]


def make(m, n, K, r, seed):
    g = torch.Generator().manual_seed(seed)
    B = [torch.randn(m, r, generator=g) * 0.01 for _ in range(K)]
    A = [torch.randn(r, n, generator=g) / n ** 0.5 for _ in range(K)]
    return B, A


def inputs(method, B, A, seed):
    """Method-valid inputs: shared A for fedsvd/rolora (round 1), a reference for fedrot_lora."""
    if method in ("fedsvd", "rolora"):
        A = [A[0]] * len(A)
    mo = None
    if method == "rolora":
        mo = {"round": 1}
    elif method == "fedrot_lora":
        Bg, Ag = make(B[0].shape[0], A[0].shape[1], 1, B[0].shape[1], seed + 1000)
        mo = {"round": 1, "reference": (Bg[0], Ag[0]), "lam": 0.5}
    return B, A, mo


def dense_form(method, B, A, p, s):
    """The method as FedLLM-Factory computes it (dense m x n). Returns s·B·A as a function of a
    block (rows, cols) and the per-client products for flexlora, or None when there is no dense form."""
    K = len(B)
    if method in ("flexlora", "ilora"):
        dW = torch.zeros(B[0].shape[0], A[0].shape[1])
        for pk, b, a in zip(p, B, A):
            dW.addmm_(b, a, alpha=pk * s)
        if method == "flexlora":
            U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
            r = B[0].shape[1]
            per = [(U[:, :r] * S[:r], Vh[:r]) for _ in range(K)]  # every client has rank r here
            return per[0]
        Q, R = torch.linalg.qr(dW, mode="reduced")
        r = B[0].shape[1]
        return Q[:, :r], R[:r]
    if method == "hetlora":
        norms = [float((s * b @ a).norm()) for b, a in zip(B, A)]  # K dense m x n products
        w = [pk * nk for pk, nk in zip(p, norms)]
        w = [x / sum(w) for x in w]
        Bbar = sum(wk * b for wk, b in zip(w, B))
        Abar = sum(wk * a for wk, a in zip(w, A))
        return s * Bbar, Abar
    if method == "fedsvd":
        Bbar = sum(pk * b for pk, b in zip(p, B))
        U, S, Vh = torch.linalg.svd(s * Bbar @ A[0], full_matrices=False)
        r = B[0].shape[1]
        return U[:, :r] * S[:r], Vh[:r]
    if method == "rolora":
        return s * sum(pk * b for pk, b in zip(p, B)), A[0]
    return None


def block_err(L1, R1, L2, R2, m, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(m, generator=g)[:512]
    cols = torch.randperm(n, generator=g)[:512]
    x = L1[rows].double() @ R1[:, cols].double()
    y = L2[rows].double() @ R2[:, cols].double()
    return float((x - y).norm() / max(y.norm(), 1e-300))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--K", type=int, default=10)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args()
    hidden, inter = (1024, 2752) if args.quick else (4096, 11008)
    K, r, s = args.K, args.r, 2.0
    w = list(range(1, K + 1))
    p = [x / sum(w) for x in w]
    mods = modules(hidden, inter)
    facts = {name: make(m, n, K, r, i) for i, (name, (m, n)) in enumerate(mods)}
    rows = []
    for method in args.methods.split(","):
        ours_total, dense_total, diffs = 0.0, 0.0, []
        dense_done = {}
        for i, (name, (m, n)) in enumerate(mods):
            B, A, mo = inputs(method, *facts[name], i)
            t, res = timeit(lambda: fm.aggregate_lora(B, A, w, method=method, scalings=s, method_options=mo),
                            repeat=3)
            ours_total += t
            key = (max(m, n), min(m, n))  # a wide module reuses the tall shape's dense time
            if key not in dense_done:
                # best of 3 when one run is short; a single run when it takes > 10 s (a dense SVD)
                td, d = timeit(lambda: dense_form(method, B, A, p, s), repeat=3, budget_s=30.0)
                dense_done[key] = td if d is not None else None
                if d is not None:
                    diffs.append(block_err(res.out_scaling * res.B, res.A, d[0], d[1], m, n))
                    if method == "flexlora":
                        for bk, ak in res.info["per_client"]:
                            diffs.append(block_err(res.out_scaling * bk, ak, d[0][:, :bk.shape[1]],
                                                   d[1][:ak.shape[0]], m, n))
                print(f"{method} {name} {m}x{n}: ours {t:.3f}s, dense {td:.2f}s", flush=True)
            if dense_done[key] is not None:
                dense_total += dense_done[key]
        has_dense = dense_total > 0
        rows.append({"method": method, "modules": len(mods), "K": K, "r": r,
                     "ours_s": round(ours_total, 4),
                     "dense_s": round(dense_total, 4) if has_dense else "",
                     "dense_over_ours": round(dense_total / ours_total, 2 if dense_total < ours_total else 1)
                     if has_dense else "",
                     "max_diff": f"{max(diffs):.1e}" if diffs else ""})
        print(rows[-1], flush=True)
    tag = "_quick" if args.quick else ""
    write_csv(str(HERE / "results" / f"methods_cpu{tag}.csv"), rows)
    lines = [
        f"# Issue 17 baselines: factored (ours) vs dense (FedLLM-Factory's form), CPU{' (quick)' if args.quick else ''}",
        "",
        f"Machine: {machine()}.",
        "",
        f"One Llama-7B-shaped layer{' (quick: hidden 1024, intermediate 2752)' if args.quick else ''}: "
        f"q, k, v, o {hidden}x{hidden}, gate/up {inter}x{hidden}, down {hidden}x{inter}; K = {K} clients, "
        f"r = {r}, fp32, s = {s}. Ours: `aggregate_lora(method=...)` on all 7 modules (best of 3 each, summed). "
        "Dense: the same method with the m x n ΔW (or B̄A) formed and `torch.linalg.svd(full_matrices=False)` / "
        "`torch.linalg.qr`, timed once per distinct shape and multiplied by its module count (the "
        f"{hidden}x{inter} module reuses the {inter}x{hidden} time: LAPACK factors the transpose). "
        "`max_diff`: relative Frobenius difference of s·B·A (and flexlora's per-client products) on a "
        "512x512 block. rolora has no m x n step in either form; fedrot_lora's algorithm has none at all "
        "(its r x r Procrustes is the same in any form): no dense column. rolora's dense form is the bare "
        "average; ours also validates the inputs (NaN/Inf scan, the frozen factor shared by every client) "
        "and checks the outputs, a few ms per module. Script: `benchmarks/run_methods.py`.",
        "",
        f"Load average when the run ended: {os.getloadavg()[0]:.1f} (other processes may have shared the "
        "cores: the small 'ours' times are the noisiest; the dense SVDs dominate every ratio).",
        "",
        "| method | ours (s) | dense (s) | dense / ours | max diff |",
        "|---|---:|---:|---:|---:|",
    ]
    for rw in rows:
        dense = rw["dense_s"]
        lines.append(f"| {rw['method']} | {rw['ours_s']:.4f} | "
                     f"{'—' if dense == '' else (f'{dense:.1f}' if dense >= 1 else f'{dense:.4f}')} | "
                     f"{(str(rw['dense_over_ours']) + 'x') if rw['dense_over_ours'] != '' else '—'} | "
                     f"{rw['max_diff'] or '—'} |")
    (HERE / "results" / f"methods_cpu{tag}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    with torch.no_grad():
        main()
