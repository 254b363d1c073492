"""Pointer/stride tables and launch settings shared by the Triton launchers (pure torch).

The kernels never see a concatenated ``B_cat``/``A_cat``: they read each client's factor
through a small int64 table of ``(data_ptr, row stride, column stride, width)`` rows, one
row per (layer, client), copied to the device once per launch. This module builds those
tables and holds the launch heuristics; it does not import Triton, so it can be imported
(and unit-tested) anywhere.

*Tall view.* Every stacked kernel reads a factor as a *tall* ``rows x t`` matrix:
``side="left"`` factors (``m x t``) as they are, ``side="right"`` factors (``t x n``)
transposed, which is only a swap of the two strides. With that view ``B_catᵀB_cat`` and
``A_cat A_catᵀ`` are the same computation, and so are the four stacked products.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["interpret_mode", "input_precision", "needs_f32_dot", "factor_dtype", "common_dtype", "tall_table",
           "chunk_table", "pair_table", "client_offsets", "KernelConfig", "config_for"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def input_precision(device: torch.device) -> str:
    """``tl.dot`` precision for fp32 operands: TF32 exactly when torch would use it for a matmul
    on this device (``torch.backends.cuda.matmul.allow_tf32``), else IEEE fp32."""
    if device.type == "cuda" and not interpret_mode() and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def needs_f32_dot(dtype: torch.dtype) -> bool:
    """True when tiles of ``dtype`` must be upcast to fp32 before ``tl.dot``.

    Only in the interpreter for bfloat16: Triton 3.x's interpreter multiplies the raw uint16
    bits of bf16 tiles in ``tl.dot``. Upcasting is numerically the same (a bf16 x bf16 product is
    exact in fp32 and the accumulation is fp32 either way); on GPU bf16 stays on the tensor cores.
    """
    return dtype == torch.bfloat16 and interpret_mode()


def factor_dtype(tensors: Sequence[torch.Tensor], what: str) -> torch.dtype:
    """The one dtype of ``tensors`` (fp32/fp16/bf16), fp32 when they are mixed; TypeError otherwise."""
    dtypes = set()
    for i, t in enumerate(tensors):
        if t.dtype not in _FLOATS:
            raise TypeError(f"{what} {i} has dtype {t.dtype}; the Triton kernels take "
                            f"float32, float16 or bfloat16")
        dtypes.add(t.dtype)
    if len(dtypes) == 1:
        return dtypes.pop()
    return torch.float32


def common_dtype(tensors: Sequence[torch.Tensor], what: str) -> tuple[list[torch.Tensor], torch.dtype]:
    """``tensors`` in one dtype (the factors are small; mixed lists are upcast to fp32)."""
    dt = factor_dtype(tensors, what)
    return [t if t.dtype == dt else t.to(dt) for t in tensors], dt


def tall_table(layers: Sequence[Sequence[torch.Tensor]], side: str, device: torch.device) -> torch.Tensor:
    """int64 ``[L*K, 4]`` table of ``(data_ptr, stride_row, stride_col, t)`` of each factor's tall view.

    ``layers[l][k]`` is client k's factor in layer l (``m x t`` for left, ``t x n`` for right)."""
    rows = []
    for fs in layers:
        for f in fs:
            if side == "left":
                rows.append((f.data_ptr(), f.stride(0), f.stride(1), f.shape[1]))
            else:
                rows.append((f.data_ptr(), f.stride(1), f.stride(0), f.shape[0]))
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 4).to(device)


def client_offsets(widths: Sequence[int], device: torch.device) -> torch.Tensor:
    """int64 ``[K]``: client k's first column in the stacked index space (exclusive prefix sum)."""
    offs, o = [], 0
    for w in widths:
        offs.append(o)
        o += int(w)
    return torch.tensor(offs, dtype=torch.int64).to(device)


def chunk_table(widths: Sequence[int], block_t: int, device: torch.device) -> torch.Tensor:
    """int64 ``[C, 4]``: ``(client, first column in the client, width <= block_t, stacked offset)``.

    Clients of width 0 contribute no chunk; a client wider than ``block_t`` gives several."""
    rows, o = [], 0
    for k, w in enumerate(widths):
        for s in range(0, int(w), block_t):
            rows.append((k, s, min(block_t, int(w) - s), o + s))
        o += int(w)
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 4).to(device)


def pair_table(num_chunks: int, device: torch.device) -> torch.Tensor:
    """int64 ``[P, 2]``: the chunk pairs ``a <= b`` (each symmetric Gram block computed once)."""
    rows = [(a, b) for a in range(num_chunks) for b in range(a, num_chunks)]
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 2).to(device)


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch settings (GPU or interpreter)."""

    block_m: int
    block_n: int
    block_t: int
    block_r: int
    block_l: int
    num_warps: int
    num_stages: int
    target_programs: int  # split long reductions until about this many programs run


def config_for(device: torch.device) -> KernelConfig:
    """Small tiles in the interpreter (so tests cross tile edges on tiny shapes), big on GPU."""
    if device.type != "cuda" or interpret_mode():
        return KernelConfig(block_m=32, block_n=32, block_t=16, block_r=32, block_l=16,
                            num_warps=4, num_stages=1, target_programs=8)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return KernelConfig(block_m=128, block_n=128, block_t=32, block_r=128, block_l=64,
                        num_warps=8, num_stages=3, target_programs=4 * sms)
