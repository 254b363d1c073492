"""Aggregation methods: one registry, one signature.

Every method takes a validated :class:`~fedmomentum_core.validate.LayerInput` and the layer's
:class:`Options` and returns an :class:`~fedmomentum_core.types.AggregationResult`. Use
:func:`fedmomentum_core.engine.aggregate_layer` (re-exported here and as
``fedmomentum.aggregate_lora``) rather than calling them directly.

| name        | what the server does                                              | exact? |
|-------------|-------------------------------------------------------------------|--------|
| fedmomentum | exact ΔW, SVD, top-r → B, A; tail → residual                       | yes    |
| fedit       | average B and A separately                                          | no     |
| ffa_lora    | A frozen and shared; average B                                      | yes    |
| fedsa_lora  | average A only; B stays per client (B=None)                         | —      |
| flora       | the whole ΔW → residual (merged into the backbone); fresh adapter   | yes    |
| fedex_lora  | average B and A; the error ΔW − s·B̄Ā → residual                    | yes    |
| florist     | SVD of the stacked factors, keep energy ≥ tau, discard the tail     | no     |

Modules: :mod:`.registry` (MethodSpec, METHODS), :mod:`.common` (Options and shared helpers),
one module per family: :mod:`.spectral`, :mod:`.averaging`, :mod:`.restart`.
"""
from .registry import METHODS, RESIDUAL_KINDS, MethodSpec, get_method, register_method
from .common import Options
from . import averaging, restart, spectral  # noqa: F401  (fill the registry)
from ..options import SolverTuning

#: kept for callers of the old module: the default batched-engine chunk; pass
#: ``tuning=SolverTuning(batch_bytes=...)`` to change it
BATCH_BYTES = SolverTuning().batch_bytes

__all__ = ["METHODS", "MethodSpec", "RESIDUAL_KINDS", "get_method", "register_method", "aggregate_layer",
           "aggregate_layers", "Options", "BATCH_BYTES"]


def __getattr__(name):  # the engine imports this package: resolve its entry points lazily
    if name in ("aggregate_layer", "aggregate_layers"):
        from .. import engine
        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
