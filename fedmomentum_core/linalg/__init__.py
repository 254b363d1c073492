"""Stacked-factor linear algebra: the SVD of ΔW = Σ_k c_k B_k A_k = B_cat · A_cat.

Every solver returns :class:`~fedmomentum_core.types.SVDFactors` in the compute dtype:
``U`` (m x k, orthonormal columns), ``S`` (k, descending), ``V`` (n x k), the total energy
‖ΔW‖²_F and, when the factors do not hold all of ΔW, the exact remainder.

* :mod:`.stacked`: :class:`Stacked`, one side's stacked factors for a batch of same-shaped layers.
* :mod:`.exact`: Cholesky-QR of the stacks' Grams + an R x R core, O((m+n)R² + R³), never m x n.
* :mod:`.randomized`: sketch ΔW·Ω through the factors, top r plus the exact remainder.
* :mod:`.dense`: form ΔW, LAPACK SVD.
* :mod:`.workspace`: scratch memory kept between calls, safe by construction.
"""
from .dense import solve_dense
from .exact import solve_exact, solve_exact_batch
from .randomized import solve_randomized
from .stacked import Stacked, column_coeffs, gram_into, stack_dense
from .workspace import Workspace, release_workspace, thread_workspace

#: solver name -> ``fn(LayerInput, rank, *, dtype, need_tail, generator, tuning, ...) -> SVDFactors``
SOLVERS = {"exact": solve_exact, "randomized": solve_randomized, "dense": solve_dense}

__all__ = ["SOLVERS", "Stacked", "column_coeffs", "gram_into", "stack_dense", "solve_exact",
           "solve_exact_batch", "solve_randomized", "solve_dense", "Workspace", "thread_workspace",
           "release_workspace"]
