"""fedmomentum_core: the algorithms (solvers, methods, planner). Pure torch, any device."""
from .methods import METHODS, MethodSpec, aggregate_layer, aggregate_layers, get_method, register_method
from .cost import choose_solver, solver_costs
from .solvers import SOLVERS
from .types import AggregationResult, LowRank, SVDFactors
from .validate import LayerInput, validate_layer

__all__ = [
    "METHODS", "MethodSpec", "get_method", "SOLVERS", "aggregate_layer", "aggregate_layers", "register_method", "choose_solver", "solver_costs",
    "AggregationResult", "LowRank", "SVDFactors", "LayerInput", "validate_layer",
]
