"""fedmomentum_kernels: Triton kernels with torch fallbacks.

Importing this package never fails: Triton is imported lazily, only when the
``triton`` backend is actually selected. The public functions here dispatch by
device through :func:`select_backend` (overridable with the environment variable
``FEDMOMENTUM_BACKEND=torch|triton``):

* CUDA tensors use Triton when it is importable, else torch.
* CPU tensors use torch, unless ``FEDMOMENTUM_BACKEND=triton`` *and*
  ``TRITON_INTERPRET=1`` (that is how the kernels are tested without a GPU).
"""
from __future__ import annotations

import functools
import os
from typing import Sequence

import torch

from . import reference

__all__ = [
    "select_backend",
    "triton_available",
    "lowrank_accumulate_",
    "stacked_gram",
    "stacked_matmul",
    "stacked_matmul_t",
    "batched_stacked_gram",
    "batched_stacked_matmul",
    "batched_stacked_matmul_t",
    "reference",
]

_BACKENDS = ("torch", "triton")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when ``import triton`` works (it may still have no GPU backend)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the machine
        return False
    return True


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def select_backend(device: torch.device | str | None = None) -> str:
    """The one dispatch rule: ``"torch"`` or ``"triton"`` for tensors on ``device``.

    ``FEDMOMENTUM_BACKEND`` (``torch`` or ``triton``) overrides the choice; forcing
    ``triton`` for CPU tensors requires ``TRITON_INTERPRET=1`` (else ValueError, since
    compiled Triton kernels cannot read host memory).
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    forced = os.environ.get("FEDMOMENTUM_BACKEND", "").strip().lower()
    if forced and forced not in _BACKENDS:
        raise ValueError(f"FEDMOMENTUM_BACKEND must be one of {_BACKENDS}, got {forced!r}")
    if forced == "torch":
        return "torch"
    if forced == "triton":
        if not triton_available():
            raise ValueError("FEDMOMENTUM_BACKEND=triton but triton cannot be imported")
        if dev.type != "cuda" and not _interpret():
            raise ValueError(
                f"FEDMOMENTUM_BACKEND=triton with tensors on {dev}: set TRITON_INTERPRET=1 "
                "to run the kernels in the interpreter, or use CUDA tensors")
        return "triton"
    if dev.type == "cuda" and triton_available():
        return "triton"
    return "torch"


def _impl(name: str, device: torch.device):
    if select_backend(device) == "triton":
        from . import _triton_dispatch  # imported lazily: needs triton
        return getattr(_triton_dispatch, name)
    return getattr(reference, name)


def lowrank_accumulate_(out: torch.Tensor, lefts: Sequence[torch.Tensor],
                        rights: Sequence[torch.Tensor], coeffs: Sequence[float]) -> torch.Tensor:
    """In place ``out += Σ_i coeffs[i] · lefts[i] @ rights[i]`` (fp32 accumulation); returns ``out``.

    ``lefts[i]`` is m x t_i, ``rights[i]`` is t_i x n; t_i may differ (0 allowed)."""
    _check_accumulate(out, lefts, rights, coeffs)
    return _impl("lowrank_accumulate_", out.device)(out, lefts, rights, coeffs)


def stacked_gram(factors: Sequence[torch.Tensor], coeffs: Sequence[float], side: str,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """T x T Gram of the stacked, coefficient-weighted factors (see :mod:`.reference`)."""
    return _impl("stacked_gram", factors[0].device)(factors, coeffs, side, dtype)


def stacked_matmul(factors: Sequence[torch.Tensor], coeffs: Sequence[float], side: str,
                   mat: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``X_cat @ mat`` without concatenating the factors (on the Triton path)."""
    return _impl("stacked_matmul", factors[0].device)(factors, coeffs, side, mat, dtype)


def stacked_matmul_t(factors: Sequence[torch.Tensor], coeffs: Sequence[float], side: str,
                     mat: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``X_catᵀ @ mat`` without concatenating the factors (on the Triton path)."""
    return _impl("stacked_matmul_t", factors[0].device)(factors, coeffs, side, mat, dtype)


def batched_stacked_gram(factors, coeffs, side: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """L x T x T Grams of L same-shaped layers (``factors[l]`` is layer l's per-client list)."""
    return _impl("batched_stacked_gram", factors[0][0].device)(factors, coeffs, side, dtype)


def batched_stacked_matmul(factors, coeffs, side: str, mats: torch.Tensor,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``X_cat[l] @ mats[l]`` for the L layers of a batch."""
    return _impl("batched_stacked_matmul", factors[0][0].device)(factors, coeffs, side, mats, dtype)


def batched_stacked_matmul_t(factors, coeffs, side: str, mats: torch.Tensor,
                             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``X_cat[l]ᵀ @ mats[l]`` for the L layers of a batch."""
    return _impl("batched_stacked_matmul_t", factors[0][0].device)(factors, coeffs, side, mats, dtype)


def _check_accumulate(out, lefts, rights, coeffs) -> None:
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ValueError(f"out must be a 2-D tensor, got {getattr(out, 'shape', type(out))}")
    if not (len(lefts) == len(rights) == len(coeffs)):
        raise ValueError(f"lefts, rights and coeffs must have the same length, got "
                         f"{len(lefts)}, {len(rights)}, {len(coeffs)}")
    m, n = out.shape
    for i, (left, right) in enumerate(zip(lefts, rights)):
        if left.dim() != 2 or right.dim() != 2:
            raise ValueError(f"factor {i}: lefts/rights must be 2-D, got {tuple(left.shape)} "
                             f"and {tuple(right.shape)}")
        if left.shape[0] != m or right.shape[1] != n or left.shape[1] != right.shape[0]:
            raise ValueError(f"factor {i}: expected left {m}x t and right t x {n}, got "
                             f"{tuple(left.shape)} and {tuple(right.shape)}")
        if left.device != out.device or right.device != out.device:
            raise ValueError(f"factor {i}: on {left.device}/{right.device}, out on {out.device}")
        for name, t in (("left", left), ("right", right)):
            if not t.dtype.is_floating_point:
                raise TypeError(f"factor {i}: {name} has non-floating dtype {t.dtype}")
