"""Deprecated alias of :mod:`fedmomentum_core.linalg` (the stacked-factor solvers), kept for
callers of the old module path."""
from .linalg import (SOLVERS, Stacked, release_workspace, solve_dense, solve_exact,  # noqa: F401
                     solve_exact_batch, solve_randomized)

__all__ = ["SOLVERS", "Stacked", "solve_exact", "solve_exact_batch", "solve_randomized", "solve_dense",
           "release_workspace"]
