"""The one cost model: FLOPs, main-memory bytes and working memory of aggregating one layer.

``solver="auto"`` (:func:`choose_solver`), the memory budgets of the profiler and of the model
round, the cost-balanced sharding of the torchrun path (:func:`module_cost`) and the profiler's
per-module records all read these functions; nothing else models cost.

FLOPs (2 x multiply-adds; ``k`` = R when the residual tail is formed, else r;
``ℓ = min(r + oversample, R, m, n)``):

* ``exact``: Grams ``2(m+n)R²`` (3/4 of it from the symmetric-Gram threshold on) + forming U and
  σV ``2(m+n)Rk`` + R x R work (two Cholesky, two triangular inverses, C = L_B L_Aᵀ, C Cᵀ, its
  eigh ≈ 9R³; rotations 6R²k): ≈ 15.7R³ + 6R²k.
* ``randomized``: ``2q+2`` products with ΔW or ΔWᵀ through the factors, ``2(m+n)Rℓ`` each, plus
  ``probes`` Hutchinson columns when ℓ < min(m, n, R), QRs ``≈ 4·rows·ℓ²`` each, rotations
  ``2mℓr + 4mℓ·probes``.
* ``dense`` (and the ``dense_full`` baseline): form ΔW ``2mnR`` + LAPACK SVD ≈ ``6·M·N² + 20·N³``
  (M = max(m, n), N = min(m, n), R-SVD with thin U, V; Golub & Van Loan table 8.6.1).
* ``dense_lowrank`` baseline (the paper's server): form ΔW ``2mnR`` + ``torch.svd_lowrank``
  ``(2q+2)·2mnℓ`` + the rotation ``2·max(m, n)·ℓ²`` + its QRs.

Bytes are the unavoidable main-memory traffic: every client factor read once (input dtype) and the
outputs written once (B, A in the input dtype; the residual in fp32, rank ``R − r`` for exact and
dense, ``R + r`` for randomized whose remainder is ``[B_cat | −U S]·[A_cat; Vᵀ]``); the dense
routes also write ΔW (4mn) and read it once per SVD pass.
"""
from __future__ import annotations

from typing import Optional, Sequence

__all__ = [
    "gram_flops", "solver_flops", "baseline_flops", "solver_bytes", "baseline_bytes",
    "module_memory_bytes", "baseline_memory_bytes", "solver_costs", "choose_solver", "module_cost",
    "BASELINES", "BYTE_COST", "RANDOMIZED_MARGIN", "RANDOMIZED_MIN_WORK", "SYMMETRIC_GRAM_MIN_R",
    "OVERSAMPLE", "POWER_ITERS", "PROBES",
]

#: baselines the profiler can run side by side
BASELINES = ("dense_lowrank", "dense_full")

#: FLOP-equivalents charged per input byte read in :func:`module_cost`: a machine balance of
#: about 8 FLOP/byte, so that modules whose cost is reading safetensors are not modelled as free
BYTE_COST = 8.0

#: randomized is approximate in the top r (its residual stays exact), so ``auto`` takes it only
#: when the model says it is at least this many times cheaper than exact
RANDOMIZED_MARGIN = 4.0

#: below this many FLOPs for ``exact`` ``auto`` always stays exact: the saving would be tiny
#: and the top r would become approximate
RANDOMIZED_MIN_WORK = 2e9

#: stacked rank from which the exact solver forms a Gram in two column halves (3/4 of the GEMM
#: FLOPs); below it one GEMM is faster because the halves are too thin to use the BLAS well
SYMMETRIC_GRAM_MIN_R = 64

#: the randomized solver's defaults: extra sketch columns, power iterations, Hutchinson probes
OVERSAMPLE = 10
POWER_ITERS = 2
PROBES = 16

#: R x R work of the exact solver per R³: two Cholesky (⅓ each), two triangular inverses (1 each),
#: C = L_B L_Aᵀ and C Cᵀ (2 each), eigh with vectors (≈ 9)
_SMALL_C = 2 / 3 + 2.0 + 4.0 + 9.0

_SOLVERS = ("exact", "randomized", "dense")


def gram_flops(rows: int, R: int, *, symmetric_min_r: int = SYMMETRIC_GRAM_MIN_R) -> float:
    """FLOPs of the Gram xᵀx of a rows x R stack as the exact solver forms it: the full GEMM, or,
    from ``symmetric_min_r`` on, two GEMMs using the symmetry (3/4 of it)."""
    if R < symmetric_min_r:
        return 2.0 * rows * R * R
    h = R // 2
    return 2.0 * rows * (h * h + (R - h) * R)


def _solver_flops(m: int, n: int, R: int, r: int, solver: str, need_tail: bool, oversample: int,
                  power_iters: int, probes: int, symmetric_min_r: int) -> dict[str, float]:
    if solver == "exact":
        k = R if need_tail else min(r, R)
        out = {"gram": gram_flops(m + n, R, symmetric_min_r=symmetric_min_r),
               "form_uv": 2.0 * (m + n) * R * k,
               "small": _SMALL_C * R ** 3 + 6.0 * R * R * k}
    elif solver == "randomized":
        ell = max(1, min(r + oversample, R, m, n))
        passes = 2 * power_iters + 2
        k = min(r, ell)
        pr = probes if ell < min(m, n, R) else 0  # the Hutchinson tail estimate runs only then
        out = {"products": 2.0 * (m + n) * R * (passes * ell + pr),
               "rotate": 2.0 * m * ell * k + 4.0 * m * ell * pr,
               "qr": 4.0 * (m * (power_iters + 1) + n * power_iters) * ell * ell,
               "small": 4.0 * n * ell * ell + 22.0 * ell ** 3}
    elif solver == "dense":
        return _dense_full_flops(m, n, R)
    else:
        raise ValueError(f"unknown solver {solver!r}; choose exact, randomized, dense or auto")
    out["total"] = sum(out.values())
    return out


def solver_flops(m: int, n: int, R: int, r: int, solver: str, *, need_tail: bool = True,
                 oversample: int = OVERSAMPLE, power_iters: int = POWER_ITERS, probes: int = PROBES,
                 symmetric_min_r: int = SYMMETRIC_GRAM_MIN_R) -> dict[str, float]:
    """FLOPs of one layer's aggregation by ``solver`` (exact, randomized, dense; ``auto`` resolved
    by :func:`choose_solver`), broken down by phase; ``total`` is their sum."""
    if solver == "auto":
        solver = choose_solver(m, n, R, r, need_tail=need_tail, oversample=oversample,
                               power_iters=power_iters, probes=probes, symmetric_min_r=symmetric_min_r)
    return _solver_flops(m, n, R, r, solver, need_tail, oversample, power_iters, probes, symmetric_min_r)


def solver_costs(m: int, n: int, R: int, r: int, *, need_tail: bool = True,
                 oversample: int = OVERSAMPLE, power_iters: int = POWER_ITERS, probes: int = PROBES,
                 symmetric_min_r: int = SYMMETRIC_GRAM_MIN_R) -> dict[str, float]:
    """Total FLOPs of each solver for one m x n layer with stacked rank R, output rank r:
    ``{"exact": …, "randomized": …, "dense": …}``, the ``total`` of :func:`solver_flops`."""
    return {s: _solver_flops(m, n, R, r, s, need_tail, oversample, power_iters, probes,
                             symmetric_min_r)["total"] for s in _SOLVERS}


def choose_solver(m: int, n: int, R: int, r: int, *, need_tail: bool = True,
                  full_spectrum: bool = False, margin: float = RANDOMIZED_MARGIN,
                  min_work: float = RANDOMIZED_MIN_WORK, oversample: int = OVERSAMPLE,
                  power_iters: int = POWER_ITERS, probes: int = PROBES,
                  symmetric_min_r: int = SYMMETRIC_GRAM_MIN_R) -> str:
    """Pick a solver from the FLOP counts of :func:`solver_flops` (the same numbers the profiler
    reports).

    1. ``dense`` when R ≥ min(m, n): the stacked factors are no smaller than ΔW itself.
    2. ``randomized`` when the full spectrum is not needed (no energy truncation), it is at least
       ``margin`` times cheaper than ``exact`` (large R = Σ r_k, e.g. 100 clients), and ``exact``
       is not cheap anyway (≥ ``min_work`` FLOPs; small layers stay exact: the saving would be
       small and the top r would become approximate).
    3. ``exact`` otherwise.
    """
    if R >= min(m, n):
        return "dense"
    if full_spectrum:
        return "exact"
    c = solver_costs(m, n, R, r, need_tail=need_tail, oversample=oversample,
                     power_iters=power_iters, probes=probes, symmetric_min_r=symmetric_min_r)
    if c["exact"] >= min_work and c["randomized"] * margin <= c["exact"]:
        return "randomized"
    return "exact"


def _dense_full_flops(m: int, n: int, R: int) -> dict[str, float]:
    big, small = max(m, n), min(m, n)
    out = {"form": 2.0 * m * n * R, "svd": 6.0 * big * small * small + 20.0 * small ** 3}
    out["total"] = out["form"] + out["svd"]
    return out


def baseline_flops(m: int, n: int, R: int, r: int, baseline: str, *, oversample: int = OVERSAMPLE,
                   niter: int = POWER_ITERS) -> dict[str, float]:
    """FLOPs of a dense baseline: ``dense_full`` (PEFT: ΔW + full SVD) or ``dense_lowrank``
    (the paper: ΔW + ``torch.svd_lowrank(q=r+10, niter=2)``)."""
    if baseline == "dense_full":
        return _dense_full_flops(m, n, R)
    if baseline == "dense_lowrank":
        q = min(r + oversample, m, n)
        out = {"form": 2.0 * m * n * R, "products": (2 * niter + 2) * 2.0 * m * n * q,
               "rotate": 2.0 * max(m, n) * q * q,
               "qr": 4.0 * (niter + 1) * (m + n) * q * q + 22.0 * q ** 3}
        out["total"] = sum(out.values())
        return out
    raise ValueError(f"unknown baseline {baseline!r}; choose from {list(BASELINES)}")


def _residual_rank(m: int, n: int, R: int, r: int, solver: str) -> int:
    if solver == "randomized":
        return R + min(r, R)
    return max(0, min(R, m, n) - min(r, R))


def solver_bytes(m: int, n: int, ranks: Sequence[int], r: int, solver: str, *, itemsize: int = 2,
                 residual: bool = True) -> dict[str, int]:
    """Main-memory bytes of one layer's aggregation: ``read`` (client factors, input dtype),
    ``written`` (B, A in the input dtype, residual in fp32) and ``total``."""
    R = int(sum(ranks))
    if solver == "auto":
        solver = choose_solver(m, n, R, r, need_tail=residual)
    read = (m + n) * R * itemsize
    written = (m + n) * r * itemsize
    if residual:
        written += (m + n) * _residual_rank(m, n, R, r, solver) * 4
    if solver == "dense":
        written += 4 * m * n
        read += 4 * m * n
    return {"read": int(read), "written": int(written), "total": int(read + written)}


def baseline_bytes(m: int, n: int, ranks: Sequence[int], r: int, baseline: str, *, itemsize: int = 2,
                   oversample: int = OVERSAMPLE, niter: int = POWER_ITERS) -> dict[str, int]:
    """Main-memory bytes of a dense baseline: factors read, ΔW written once and read once per pass
    (``2·niter + 2`` passes for ``dense_lowrank``, one for ``dense_full``), top-r factors written."""
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; choose from {list(BASELINES)}")
    R = int(sum(ranks))
    passes = (2 * niter + 2) if baseline == "dense_lowrank" else 1
    read = (m + n) * R * itemsize + passes * 4 * m * n
    written = 4 * m * n + (m + n) * r * itemsize
    return {"read": int(read), "written": int(written), "total": int(read + written)}


def module_memory_bytes(m: int, n: int, ranks: Sequence[int], r: int, solver: str = "auto", *,
                        itemsize: int = 2, oversample: int = OVERSAMPLE, probes: int = PROBES) -> int:
    """Upper estimate of the memory one module needs while it is aggregated: its client factors
    (input dtype) plus the solver's working set (fp32 stacks, bases, outputs, residual)."""
    R = int(sum(ranks))
    if solver == "auto":
        solver = choose_solver(m, n, R, r)
    inputs = (m + n) * R * itemsize
    outs = (m + n) * r * (itemsize + 4)
    if solver == "exact":
        work = 4 * (m + n) * (3 * R + 2 * r) + 8 * 16 * R * R
    elif solver == "randomized":
        ell = max(1, min(r + oversample, R, m, n))
        work = 4 * (m + n) * (3 * R + 2 * r + 6 * ell + probes)
    elif solver == "dense":
        small = min(m, n)
        work = 4 * (3 * m * n + (m + n) * small + (m + n) * R)
    else:
        raise ValueError(f"unknown solver {solver!r}")
    return int(inputs + outs + work)


def baseline_memory_bytes(m: int, n: int, ranks: Sequence[int], r: int, baseline: str,
                          itemsize: int = 2) -> int:
    """Upper estimate of the memory a dense baseline needs for one module (ΔW and its SVD)."""
    R = int(sum(ranks))
    base = (m + n) * R * itemsize + 4 * m * n
    if baseline == "dense_full":
        return int(base + 4 * (2 * m * n + (m + n) * min(m, n)))
    return int(base + 4 * (m * n + 8 * (m + n) * (r + 10)))


def module_cost(m: int, n: int, ranks: Sequence[int], r: Optional[int] = None, solver: str = "auto",
                *, need_tail: bool = True, itemsize: int = 2) -> float:
    """Estimated cost of aggregating one module, in FLOP-equivalents: the solver's FLOPs
    (:func:`solver_flops`, ``auto`` resolved by :func:`choose_solver`) plus :data:`BYTE_COST` per
    byte of the K client factors read (``itemsize`` bytes per element). ``r`` defaults to the
    largest client rank and is clamped to [1, min(m, n, R)]."""
    ranks = [int(x) for x in ranks]
    R = sum(ranks)
    r = r if r is not None else max(ranks)
    r = max(1, min(r, m, n, R))
    s = solver if solver in _SOLVERS else choose_solver(m, n, R, r, need_tail=need_tail)
    flops = solver_flops(m, n, R, r, s, need_tail=need_tail)["total"]
    read = (m + n) * R * itemsize
    return float(flops) + BYTE_COST * float(read)
