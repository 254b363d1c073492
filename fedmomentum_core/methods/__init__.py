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
| flexlora    | exact ΔW, one SVD, each client gets the top r_k (info["per_client"])  | top-r_k |
| hetlora     | zero-pad, sparsity-weighted average (‖B_kA_k‖_F), truncate per client | no     |
| fedsvd      | shared A; average B, SVD of B̄A → A = V_rᵀ, B = U_rΣ_r (factored)     | yes    |
| rolora      | alternate rounds: average the trained factor (B odd, A even)       | yes    |
| fedrot_lora | soft Procrustes rotation towards the previous global adapter, average | no   |
| ilora       | concatenated QR: B = Q[:, :r], A = R[:r] of QR(ΔW) from the factors | no     |

Method-specific inputs go in ``method_options`` (declared per method in ``MethodSpec.options``:
``round``, ``reference``, ``lam``, ``client_ranks``); per-client outputs (flexlora, hetlora) in
``result.info["per_client"]``.

Modules: :mod:`.registry` (MethodSpec, METHODS), :mod:`.common` (Options and shared helpers),
one module per family: :mod:`.spectral`, :mod:`.averaging`, :mod:`.restart`,
:mod:`.heterogeneous` (flexlora, hetlora), :mod:`.reparam` (fedsvd, ilora, ilora_init),
:mod:`.alternating` (rolora, fedrot_lora); :mod:`.factored` holds their shared helpers.
"""
from .registry import METHODS, REQUIRED, RESIDUAL_KINDS, MethodOption, MethodSpec, get_method, register_method
from .common import Options
from . import averaging, restart, spectral  # noqa: F401  (fill the registry)
from . import alternating, heterogeneous, reparam  # noqa: F401  (issue 17's baselines)
from .reparam import ilora_init
from ..options import SolverTuning

#: kept for callers of the old module: the default batched-engine chunk; pass
#: ``tuning=SolverTuning(batch_bytes=...)`` to change it
BATCH_BYTES = SolverTuning().batch_bytes

__all__ = ["METHODS", "MethodSpec", "MethodOption", "REQUIRED", "RESIDUAL_KINDS", "get_method",
           "register_method", "aggregate_layer", "aggregate_layers", "Options", "BATCH_BYTES", "ilora_init"]


def __getattr__(name):  # the engine imports this package: resolve its entry points lazily
    if name in ("aggregate_layer", "aggregate_layers"):
        from .. import engine
        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
