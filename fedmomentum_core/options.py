"""What a caller asks for (:class:`AggregateOptions`) and how the solvers get there
(:class:`SolverTuning`): two frozen dataclasses, the one object of each that flows from the entry
points down to the solvers. Tests and benchmarks change behaviour by passing a different
``SolverTuning``, never by assigning module attributes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch

from . import cost as _cost

__all__ = ["AggregateOptions", "SolverTuning", "SOLVER_NAMES", "RESIDUAL_MODES", "SPLITS", "COMPUTE_DTYPES"]

SOLVER_NAMES = ("auto", "exact", "randomized", "dense")
RESIDUAL_MODES = ("factored", "stacked", "none")
SPLITS = ("balanced", "left")
COMPUTE_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class SolverTuning:
    """How the solvers run. Every field changes speed or memory only, never the result beyond
    float rounding (``oversample``/``power_iters``/``probes`` change the randomized solver's
    approximation of the top r; its residual stays exact)."""

    #: exact solver: try the one-pass R x R stage (both sides' equilibration, Cholesky and the
    #: core in one batched pass) before the general per-side path. False forces the general path,
    #: which handles every case (zero columns, ill-conditioned sides); the fast one is a shortcut
    #: for the common well-conditioned case.
    fast_core: bool = True
    #: exact solver on CPU: write the scratch stacks (never viewed by a result) into a buffer kept
    #: per thread between calls instead of fresh memory, which the OS hands out one page fault per
    #: page. The buffer is allocated outside autograd and inference mode and keyed by dtype and
    #: device, and every entry read is written by the same call first, so it cannot change the
    #: next call's result or validity.
    workspace: bool = True
    #: the largest scratch buffer kept between calls, per side and thread (bytes); larger requests
    #: allocate per call, so a huge layer does not pin its stacks' memory for the process's life
    workspace_max_bytes: int = 64 * 2 ** 20
    #: batched exact engine: the stacked-factor bytes one batched call may hold; a group of
    #: same-shaped layers is split into chunks under it, so batching never multiplies peak memory
    batch_bytes: int = 256 * 2 ** 20
    #: stacked rank from which a Gram is formed in two column halves (3/4 of the GEMM FLOPs, the
    #: top-right block copied from the bottom-left); below it the halves are too thin for the BLAS
    symmetric_gram_min_r: int = _cost.SYMMETRIC_GRAM_MIN_R
    #: exact solver: Cholesky-QR is used while the equilibrated Gram's estimated 1/κ exceeds this
    #: (its loss of orthogonality is ~eps·κ); below it that side falls back to Householder QR.
    #: None: 1e-9 in float64, 1e-3 in float32.
    gram_tol: Optional[float] = None
    #: randomized solver: extra sketch columns beyond r (Halko et al.: 5-10 suffice for a decaying
    #: spectrum)
    oversample: int = _cost.OVERSAMPLE
    #: randomized solver: power iterations (each sharpens a slowly decaying spectrum)
    power_iters: int = _cost.POWER_ITERS
    #: randomized solver: Gaussian probes of the Hutchinson estimate of the energy outside the sketch
    probes: int = _cost.PROBES
    #: ``auto`` takes randomized (approximate top r) only when the cost model says it is at least
    #: this many times cheaper than exact
    randomized_margin: float = _cost.RANDOMIZED_MARGIN
    #: ``auto`` stays exact below this many FLOPs of exact work: the saving would be small
    randomized_min_work: float = _cost.RANDOMIZED_MIN_WORK

    def __post_init__(self):
        for f in ("workspace_max_bytes", "batch_bytes", "symmetric_gram_min_r", "oversample",
                  "power_iters", "probes"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"SolverTuning.{f} must be an int >= 0, got {v!r}")
        if self.gram_tol is not None and not (0.0 <= float(self.gram_tol) < 1.0):
            raise ValueError(f"SolverTuning.gram_tol must be in [0, 1) or None, got {self.gram_tol!r}")
        if not float(self.randomized_margin) > 0:
            raise ValueError(f"SolverTuning.randomized_margin must be > 0, got {self.randomized_margin!r}")

    def choose_solver(self, m: int, n: int, R: int, r: int, *, need_tail: bool = True,
                      full_spectrum: bool = False) -> str:
        """``auto``'s choice (:func:`fedmomentum_core.cost.choose_solver`) under this tuning."""
        return _cost.choose_solver(m, n, R, r, need_tail=need_tail, full_spectrum=full_spectrum,
                                   margin=self.randomized_margin, min_work=self.randomized_min_work,
                                   oversample=self.oversample, power_iters=self.power_iters,
                                   probes=self.probes, symmetric_min_r=self.symmetric_gram_min_r)


@dataclass(frozen=True)
class AggregateOptions:
    """What to compute, the same for every layer of a call (see ``fedmomentum.aggregate_lora``).

    ``rank`` None means each layer's largest client rank; it is checked against each layer's
    min(m, n) by :meth:`layer_rank`.

    ``method_options``: the method's own inputs (e.g. ``{"round": 3, "reference": (B, A)}``),
    checked against the registry's :attr:`MethodSpec.options` and stored resolved (a new dict with
    the defaults filled in). Not compared or hashed (it may hold tensors).
    """

    method: str = "fedmomentum"
    solver: str = "auto"
    residual: str = "factored"
    split: str = "balanced"
    compute_dtype: torch.dtype = torch.float32
    generator: Optional[torch.Generator] = None
    residual_energy: float = 1.0
    tau: Optional[float] = None
    rank: Optional[int] = None
    method_options: Optional[Mapping[str, Any]] = field(default=None, compare=False, hash=False)

    def __post_init__(self):
        from .methods.registry import METHODS  # the registry is filled when the package loads
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {sorted(METHODS)}")
        object.__setattr__(self, "method_options", METHODS[self.method].resolve_options(self.method_options))
        if self.solver not in SOLVER_NAMES:
            raise ValueError(f"unknown solver {self.solver!r}; choose one of {list(SOLVER_NAMES)}")
        if self.residual not in RESIDUAL_MODES:
            raise ValueError(f"residual must be one of {list(RESIDUAL_MODES)}, got {self.residual!r}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {self.split!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise TypeError(f"compute_dtype must be torch.float32 or torch.float64, got {self.compute_dtype}")
        if not (0.0 < float(self.residual_energy) <= 1.0):
            raise ValueError(f"residual_energy must be in (0, 1], got {self.residual_energy}")
        object.__setattr__(self, "residual_energy", float(self.residual_energy))
        if self.tau is not None and not (0.0 < float(self.tau) <= 1.0):
            raise ValueError(f"tau must be in (0, 1], got {self.tau}")
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(self.generator).__name__}")
        if self.rank is not None:
            if isinstance(self.rank, bool) or not isinstance(self.rank, int):
                raise TypeError(f"rank must be an int, got {type(self.rank).__name__}")
            if self.rank < 1:
                raise ValueError(f"rank must be >= 1, got {self.rank}")

    def layer_rank(self, m: int, n: int, ranks) -> int:
        """The output rank for one m x n layer whose clients have ``ranks``."""
        r = max(ranks) if self.rank is None else self.rank
        if r > min(m, n):
            raise ValueError(f"rank {r} exceeds min(m, n) = {min(m, n)} for a {m} x {n} layer")
        return r
