"""Result types shared by every method and solver."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

__all__ = ["LowRank", "AggregationResult", "SVDFactors"]


@dataclass(frozen=True)
class LowRank:
    """A weight-space update kept in factored form: ``left @ right`` (m x t times t x n).

    This is what the backbone still needs after an aggregation (LoRA scalings are
    already included): ``W += left @ right``.
    """

    left: torch.Tensor
    right: torch.Tensor

    def __post_init__(self) -> None:
        if self.left.dim() != 2 or self.right.dim() != 2 or self.left.shape[1] != self.right.shape[0]:
            raise ValueError(f"LowRank needs left m x t and right t x n, got "
                             f"{tuple(self.left.shape)} and {tuple(self.right.shape)}")

    @property
    def rank(self) -> int:
        """The inner dimension t (an upper bound of the true rank)."""
        return int(self.left.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.left.shape[0]), int(self.right.shape[1]))

    @property
    def nbytes(self) -> int:
        return self.left.numel() * self.left.element_size() + self.right.numel() * self.right.element_size()

    def to_dense(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The m x n matrix ``left @ right`` (allocates m x n: for tests and small layers)."""
        dtype = dtype or self.left.dtype
        return self.left.to(dtype) @ self.right.to(dtype)

    def to(self, *args, **kwargs) -> "LowRank":
        return LowRank(self.left.to(*args, **kwargs), self.right.to(*args, **kwargs))

    @staticmethod
    def zeros(m: int, n: int, *, dtype=torch.float32, device=None) -> "LowRank":
        """A rank-0 update of shape m x n."""
        return LowRank(torch.zeros(m, 0, dtype=dtype, device=device),
                       torch.zeros(0, n, dtype=dtype, device=device))


@dataclass(frozen=True)
class SVDFactors:
    """A (possibly partial) SVD ``U diag(S) Vᵀ`` in the compute dtype, S descending."""

    U: torch.Tensor  # m x k
    S: torch.Tensor  # k
    V: torch.Tensor  # n x k
    total_energy: float  # ‖ΔW‖_F² (exact or estimated, see the solver)
    solver: str
    #: the exact remainder ΔW − U S Vᵀ when the solver cannot give a full SVD (randomized):
    #: left/right factors in the compute dtype, or None when U S Vᵀ is the whole ΔW.
    remainder: Optional[LowRank] = None
    #: n x k with columns σ_i v_i (exact solver). The residual tail uses (U_i, σ_i v_i) so that it
    #: stays exact for tiny or zero σ_i, where v_i = (σ_i v_i)/σ_i is ill-defined.
    SV: Optional[torch.Tensor] = None
    info: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class AggregationResult:
    """The outcome of aggregating one layer.

    ``out_scaling · B @ A + residual.left @ residual.right == Σ_k p_k s_k B_k A_k`` holds
    (to float tolerance) whenever ``exact`` is True and ``residual`` is not None.
    """

    B: Optional[torch.Tensor]  # m x r, input dtype/device (None for fedsa_lora: clients keep theirs)
    A: torch.Tensor  # r x n
    residual: Optional[LowRank]
    singular_values: torch.Tensor  # fp32, descending, the ones computed (may be empty)
    energy_kept: float  # ‖top-r‖²_F / ‖ΔW‖²_F (1.0 when ΔW == 0)
    method: str
    solver: str
    out_scaling: float
    #: fraction of ‖ΔW‖²_F thrown away (residual_energy < 1, florist, inexact methods: nan if unknown)
    energy_dropped: float = 0.0
    #: True when out_scaling·B·A + residual equals the exact sum (see the method table)
    exact: bool = True
    info: dict = field(default_factory=dict, compare=False)

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Dense ``out_scaling·B@A (+ residual)``: the weight update this result applies (tests)."""
        if self.B is None:
            raise ValueError(f"method {self.method!r} returns no B (clients keep their own)")
        d = self.out_scaling * (self.B.to(dtype) @ self.A.to(dtype))
        if self.residual is not None and self.residual.rank:
            d = d + self.residual.to_dense(dtype)
        return d
