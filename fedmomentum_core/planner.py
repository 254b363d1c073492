"""Deprecated alias: ``solver="auto"`` lives in :mod:`fedmomentum_core.cost` (the one cost model)."""
from .cost import RANDOMIZED_MARGIN, RANDOMIZED_MIN_WORK, choose_solver, solver_costs

__all__ = ["solver_costs", "choose_solver", "RANDOMIZED_MARGIN", "RANDOMIZED_MIN_WORK"]
