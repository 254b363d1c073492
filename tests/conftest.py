"""Shared fixtures: seeded client factors and the independent float64 dense reference."""
from __future__ import annotations

import os

import torch
import pytest

# CLI calls in this process keep the C library's allocator policy (the RSS-based tests measure
# memory growth); tests/test_alloc.py checks the CLI's reuse policy in subprocesses.
os.environ.setdefault("FEDMOMENTUM_MALLOC", "system")


def make_clients(m, n, ranks, *, seed=0, dtype=torch.float32, shared_A=None, decay=None):
    """K clients with LoRA factors B_k (m x r_k), A_k (r_k x n).

    ``shared_A``: None (independent A's), "exact" (one A for all), or a float (A_0 + eps·noise).
    ``decay``: if given, B's columns are scaled by decay**j to give a decaying spectrum."""
    g = torch.Generator().manual_seed(seed)
    B, A = [], []
    A0 = torch.randn(max(ranks), n, generator=g, dtype=torch.float64)
    for r in ranks:
        b = torch.randn(m, r, generator=g, dtype=torch.float64)
        if decay is not None:
            b = b * (decay ** torch.arange(r, dtype=torch.float64))[None, :]
        if shared_A is None:
            a = torch.randn(r, n, generator=g, dtype=torch.float64)
        elif shared_A == "exact":
            a = A0[:r].clone()
        else:
            a = A0[:r] + float(shared_A) * torch.randn(r, n, generator=g, dtype=torch.float64)
        B.append(b.to(dtype))
        A.append(a.to(dtype))
    return B, A


def reference_delta(B, A, weights=None, scalings=1.0):
    """Σ_k p_k s_k B_k A_k in float64, written independently of the library."""
    K = len(B)
    w = [1.0] * K if weights is None else [float(x) for x in weights]
    tot = sum(w)
    s = [float(scalings)] * K if isinstance(scalings, (int, float)) else [float(x) for x in scalings]
    out = torch.zeros(B[0].shape[0], A[0].shape[1], dtype=torch.float64)
    for wk, sk, b, a in zip(w, s, B, A):
        out += (wk / tot) * sk * (b.double() @ a.double())
    return out


def rel_err(x, ref):
    return float((x.double() - ref).norm() / max(float(ref.norm()), 1e-300))


@pytest.fixture
def clients():
    return make_clients
