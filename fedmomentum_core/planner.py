"""``solver="auto"``: the cost model that picks exact, randomized or dense."""
from __future__ import annotations

__all__ = ["solver_costs", "choose_solver", "RANDOMIZED_MARGIN", "RANDOMIZED_MIN_WORK"]

#: randomized is approximate in the top r (its residual stays exact), so auto takes it only
#: when the model says it is at least this many times cheaper than exact.
RANDOMIZED_MARGIN = 4.0

#: below this many multiply-adds for ``exact`` (a few ms on a CPU core) auto always stays exact:
#: the saving would be tiny and the top r would become approximate
RANDOMIZED_MIN_WORK = 1e9


def solver_costs(m: int, n: int, R: int, r: int, *, need_tail: bool = True,
                 oversample: int = 10, power_iters: int = 2) -> dict[str, float]:
    """Multiply-add counts of each solver for one m x n layer with stacked rank R, output rank r.

    * exact:      (m+n)·R²  (the two R x R Grams)
                + (m+n)·R·k (forming U and V; k = R with the residual tail, r without)
                + 30·R³     (two eigh + one SVD of R x R, a generous constant)
    * randomized: ℓ = min(r + oversample, R); each of the 2q+2 passes over B_cat and A_cat
                  costs (m+n)·R·ℓ, plus the (q+1)·2 thin QRs of m x ℓ / n x ℓ ≈ 2(m+n)ℓ² each
    * dense:      m·n·R (form ΔW) + 4·m·n·min(m, n) (LAPACK SVD of m x n)
    """
    k = R if need_tail else min(r, R)
    exact = (m + n) * R * R + (m + n) * R * k + 30.0 * R ** 3
    ell = max(1, min(r + oversample, R))
    randomized = (2 * power_iters + 2) * (m + n) * R * ell + 2 * (power_iters + 1) * 2 * (m + n) * ell * ell
    dense = m * n * R + 4.0 * m * n * min(m, n)
    return {"exact": float(exact), "randomized": float(randomized), "dense": float(dense)}


def choose_solver(m: int, n: int, R: int, r: int, *, need_tail: bool = True,
                  full_spectrum: bool = False) -> str:
    """Pick a solver by the cost model of :func:`solver_costs`.

    1. ``dense`` when R ≥ min(m, n): the stacked factors are no smaller than ΔW itself.
    2. ``randomized`` when the full spectrum is not needed (no energy truncation) and it is
       at least :data:`RANDOMIZED_MARGIN` times cheaper than ``exact`` (large R = Σ r_k,
       e.g. 100 clients), and ``exact`` is not cheap anyway (≥ :data:`RANDOMIZED_MIN_WORK`
       multiply-adds; small layers stay exact).
    3. ``exact`` otherwise.
    """
    if R >= min(m, n):
        return "dense"
    c = solver_costs(m, n, R, r, need_tail=need_tail)
    if (not full_spectrum and c["exact"] >= RANDOMIZED_MIN_WORK
            and c["randomized"] * RANDOMIZED_MARGIN <= c["exact"]):
        return "randomized"
    return "exact"
