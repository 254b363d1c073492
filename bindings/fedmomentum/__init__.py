"""fedmomentum: exact, fast FedMomentum aggregation of federated LoRA adapters.

The public API is thin; the algorithms live in :mod:`fedmomentum_core` and the kernels in
:mod:`fedmomentum_kernels`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

import fedmomentum_kernels as _kernels
from fedmomentum_core import METHODS, SOLVERS, AggregationResult, LowRank
from .cli.alloc import reuse_freed_memory
from fedmomentum_core.methods import aggregate_layer as _aggregate_layer
from fedmomentum_core.plan import ModelAggregation, ModuleReport

__version__ = "0.1.0"

__all__ = ["aggregate_lora", "merge_residual_", "AggregationResult", "LowRank", "METHODS",
           "SOLVERS", "__version__", "aggregate", "ModelAggregation", "ModuleReport",
           "reuse_freed_memory"]


def aggregate(client_state_dicts, weights=None, *, configs=None, rank: Optional[int] = None,
              method: str = "fedmomentum", solver: str = "auto", residual: str = "factored",
              profile: bool = False, **layer_kwargs) -> ModelAggregation:
    """Aggregate K clients' PEFT LoRA state dicts (whole models, module by module).

    Args:
        client_state_dicts: K state dicts from ``get_peft_model_state_dict`` (saved keys
            ``…lora_A.weight``) or a PeftModel's ``state_dict()`` (live keys ``…lora_A.<name>.weight``);
            ``lora_embedding_A/B`` for Embedding LoRA. Other non-LoRA tensors are averaged with p_k;
            DoRA magnitudes and LoRA biases are refused (see :mod:`fedmomentum.peft.rules`).
        weights: K non-negative numbers, normalised; None = uniform.
        configs: the clients' adapter configs (LoraConfig or dict; one for all or K of them) giving
            s_k = α/r or α/√r (rsLoRA) with rank_pattern/alpha_pattern; None = s_k = 1.
        rank: output rank (default: per module, the clients' max rank).
        method, solver: as in :func:`aggregate_lora`.
        residual: ``"factored"`` keeps each module's residual, ``"none"`` drops it (reported).
        profile: add per-module read time and byte counts to the report (it is stored either way).
        **layer_kwargs: split, compute_dtype, generator, residual_energy, tau (see aggregate_lora).

    Returns:
        :class:`ModelAggregation` with ``state_dict`` (saved PEFT keys, input dtype), ``residuals``
        (module → LowRank in the base weight's orientation), ``report`` and ``config``.
    """
    from .peft.plan import aggregate_state_dicts
    return aggregate_state_dicts(client_state_dicts, weights, configs=configs, rank=rank, method=method,
                                 solver=solver, residual=residual, profile=profile, **layer_kwargs)


def aggregate_lora(B: Sequence[torch.Tensor], A: Sequence[torch.Tensor], weights=None, *,
                   rank: Optional[int] = None, scalings=1.0, out_scaling: Optional[float] = None,
                   method: str = "fedmomentum", solver: str = "auto", residual: str = "factored",
                   split: str = "balanced", compute_dtype: torch.dtype = torch.float32,
                   generator: Optional[torch.Generator] = None, residual_energy: float = 1.0,
                   tau: Optional[float] = None, name: Optional[str] = None,
                   method_options: Optional[dict] = None) -> AggregationResult:
    """Aggregate one layer's K client LoRA adapters.

    Args:
        B: K tensors, client k's lora_B (m x r_k). Ranks may differ across clients.
        A: K tensors, client k's lora_A (r_k x n).
        weights: K non-negative numbers (e.g. sample counts), normalised to sum 1; None = uniform.
        rank: output rank r (default max r_k).
        scalings: LoRA scale s_k per client (one float or K floats: α/r_k, or α/√r_k for rsLoRA).
        out_scaling: s of the returned adapter; default the common s_k (ValueError if they differ).
        method: one of ``fedmomentum.METHODS`` (fedmomentum, fedit, ffa_lora, fedsa_lora, flora,
            fedex_lora, florist, flexlora, hetlora, fedsvd, rolora, fedrot_lora, ilora).
        solver: ``auto`` (cost model in ``fedmomentum_core.cost.choose_solver``), ``exact``,
            ``randomized`` or ``dense``.
        residual: ``factored`` (the SVD tail as a :class:`LowRank`, rank ≤ R − r, orthonormal left
            factor, compute dtype), ``stacked`` (the exact remainder [B_cat | −UΣ][A_cat; Vᵀ], rank
            R + r: skips the two tail products, the fastest exact form) or ``none``.
        split: ``balanced`` (B = U√Σ/√s, A = √Σ Vᵀ/√s) or ``left`` (A = Vᵀ, B = UΣ/s).
        compute_dtype: torch.float32 (default) or torch.float64; B and A come back in the input dtype.
        generator: seeds the randomized sketch, fresh directions and re-initialisations.
        residual_energy: τ ≤ 1; keep residual components up to cumulative energy τ of ‖ΔW‖², drop
            the rest (the paper's three-way split; 1.0 = exact).
        tau: energy threshold of ``florist`` (default 0.9).
        name: the layer's name, used in error messages.
        method_options: the method's own inputs, e.g. ``{"round": 3, "reference": (B_prev, A_prev),
            "lam": 0.5}`` for fedrot_lora, ``{"round": t}`` for rolora, ``{"client_ranks": [...]}``
            for flexlora/hetlora; ``METHODS[method].options`` lists what each accepts (an unknown or
            missing option is a ValueError naming the method and what it accepts).

    Returns:
        :class:`AggregationResult` with ``out_scaling·B@A + residual.left@residual.right ==
        Σ_k p_k s_k B_k A_k`` for the exact methods. Methods with the ``per_client`` trait
        (flexlora, hetlora) also give ``result.info["per_client"]``: K ``(B_k, A_k)`` of rank r_k,
        scale ``out_scaling``, that client k loads next round.
    """
    return _aggregate_layer(B, A, weights, rank=rank, scalings=scalings, out_scaling=out_scaling,
                            method=method, solver=solver, residual=residual, split=split,
                            compute_dtype=compute_dtype, generator=generator,
                            residual_energy=residual_energy, tau=tau, name=name,
                            method_options=method_options)


def merge_residual_(W: torch.Tensor, residual: Optional[LowRank], alpha: float = 1.0) -> torch.Tensor:
    """In place ``W += alpha · residual.left @ residual.right``; returns ``W``.

    Accumulates in fp32 (fp64 for fp64 W) whatever W's dtype; uses the fused Triton kernel on
    GPU. ``residual=None`` or rank 0 leaves W as it is. Raises (leaving W untouched) when the
    shapes or devices do not match.
    """
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        raise ValueError(f"W must be a 2-D tensor, got {getattr(W, 'shape', type(W).__name__)}")
    if not W.dtype.is_floating_point:
        raise TypeError(f"W has dtype {W.dtype}; expected a floating dtype")
    if residual is None or residual.rank == 0:
        if residual is not None and residual.shape != tuple(W.shape):
            raise ValueError(f"residual shape {residual.shape} does not match W {tuple(W.shape)}")
        return W
    if residual.shape != tuple(W.shape):
        raise ValueError(f"residual is {residual.shape[0]} x {residual.shape[1]} "
                         f"(left {tuple(residual.left.shape)}, right {tuple(residual.right.shape)}) "
                         f"but W is {tuple(W.shape)}")
    left, right = residual.left, residual.right
    if left.device != W.device or right.device != W.device:
        left, right = left.to(W.device), right.to(W.device)
    return _kernels.lowrank_accumulate_(W, [left], [right], [float(alpha)])
