"""fedmomentum_core: the algorithms. Pure torch, any device.

options (AggregateOptions, SolverTuning), types, validate, linalg (stacked factors; exact,
randomized, dense solvers), cost (the one cost model), methods (registry + families), engine
(aggregate_layer / aggregate_layers), synthetic (seeded synthetic rounds), profiling.
"""
from .methods import METHODS, MethodSpec, get_method, register_method
from .engine import aggregate_layer, aggregate_layers
from .cost import choose_solver, solver_costs
from .linalg import SOLVERS
from .options import AggregateOptions, SolverTuning
from .types import AggregationResult, LowRank, SVDFactors
from .validate import LayerInput, validate_layer

__all__ = [
    "METHODS", "MethodSpec", "get_method", "SOLVERS", "aggregate_layer", "aggregate_layers", "register_method", "choose_solver", "solver_costs",
    "AggregationResult", "LowRank", "SVDFactors", "LayerInput", "validate_layer", "AggregateOptions",
    "SolverTuning",
]
