"""``fedmomentum demo``: aggregate a built-in synthetic round and compare with the dense routes."""
from __future__ import annotations

import time

import torch

from fedmomentum_core.synthetic import synthetic_round  # noqa: F401  (the one generator; kept importable here)


def register(sub) -> None:
    p = sub.add_parser("demo", help="aggregate a built-in synthetic round, time every solver and "
                       "the dense baselines, print the invariant error")
    p.add_argument("--size", type=int, default=4096, help="layer is SIZE x SIZE (default 4096)")
    p.add_argument("--clients", type=int, default=10, help="number of clients K (default 10)")
    p.add_argument("--rank", type=int, default=16, help="client and output LoRA rank r (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-full-svd", action="store_true",
                   help="skip the dense + full SVD baseline (the slow one)")
    p.set_defaults(func=run)


def _time(fn, repeat: int = 3):
    fn()  # warm-up
    best = float("inf")
    out = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def run(args) -> int:
    import fedmomentum as fm
    from fedmomentum_core.baselines import dense_full_svd, dense_svd_lowrank
    from fedmomentum_core.validate import validate_layer

    m = n = args.size
    K, r = args.clients, args.rank
    B, A, w = synthetic_round(m, n, K, r, args.seed)
    s = 2.0  # alpha / r with alpha = 2r
    inp = validate_layer(B, A, w, scalings=s)
    print(f"fedmomentum demo: one {m}x{n} layer, K={K} clients, rank {r} (R = {K * r}), fp32, "
          f"{torch.get_num_threads()} threads")
    # the exact reference in fp64, from the factors (m x n in fp64: fine at demo sizes)
    ref = torch.zeros(m, n, dtype=torch.float64)
    for pk, b, a in zip(inp.p, B, A):
        ref.addmm_(b.double(), a.double(), alpha=pk * s)
    ref_norm = float(ref.norm())
    # σ reference: LAPACK on the fp64 ΔW where that is quick, else the fp32 LAPACK SVD of the
    # dense baseline below (both independent of our factored route)
    S_ref = torch.linalg.svdvals(ref)[:r] if m * n <= 2048 * 2048 else None
    S_ref_label = "fp64 LAPACK" if S_ref is not None else "fp32 LAPACK (PEFT route)"

    rows = []
    for solver in ("exact", "randomized", "dense"):
        t, res = _time(lambda: fm.aggregate_lora(B, A, w, scalings=s, solver=solver, rank=r),
                       repeat=10 if solver != "dense" else 1)  # best of 10: the fast routes take ms, a noisy machine can triple one run
        inv = float((res.delta() - ref).norm()) / ref_norm
        rows.append((f"fedmomentum solver={solver}", t, inv, res.singular_values[:r]))
    t, (U, S, V) = _time(lambda: dense_svd_lowrank(inp, r), repeat=2)
    rows.append(("dense + torch.svd_lowrank (paper)", t, float("nan"), S))
    if not args.no_full_svd:
        t, (U, S, V) = _time(lambda: dense_full_svd(inp, r), repeat=1)
        rows.append(("dense + torch.linalg.svd (PEFT)", t, float("nan"), S))
    if S_ref is None and not args.no_full_svd:
        S_ref = rows[-1][3].double()
    base = rows[0][1]
    print(f"{'route':<38} {'seconds':>10} {'vs exact':>9} {'invariant err':>14} {'top-r σ err':>12}")
    for label, t, inv, S in rows:
        serr = (float((S.double() - S_ref).abs().max() / S_ref[0]) if S_ref is not None else float("nan"))
        inv_s = f"{inv:.2e}" if inv == inv else "-"
        serr_s = f"{serr:.2e}" if serr == serr else "-"
        print(f"{label:<38} {t:>10.4f} {t / base:>8.1f}x {inv_s:>14} {serr_s:>12}")
    print("invariant err = ‖s·B·A + residual − Σ p_k s_k B_k A_k‖_F / ‖Σ p_k s_k B_k A_k‖_F (fp64 reference); "
          f"top-r σ err = max |σ_i − σ_i(ref)| / σ_1 with ref = {S_ref_label if S_ref is not None else 'none'}")
    return 0
