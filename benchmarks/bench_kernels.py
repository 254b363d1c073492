"""pytest-benchmark suite for the kernel entry points' torch paths (CPU), side by side.

    python -m pytest benchmarks/bench_kernels.py --benchmark-only --benchmark-columns=min,median

On a CPU the public functions run their torch references (the Triton kernels need a GPU;
``benchmarks/run_kernels_gpu.py`` measures them there). What this compares, per group:

* ``merge``: ``lowrank_accumulate_`` (one fp32 pass over W, addmm per client) vs the naive
  ``W += Σ c_k L_k @ R_k`` that materialises each m x n product (what FedEx-LoRA / FLoRA do).
* ``gram``: ``stacked_gram`` (reference: weighted concat + one GEMM) vs ``torch.cat`` + GEMM on the
  unweighted stack (the cost floor of any exact factored method).
"""
from __future__ import annotations

import pytest
import torch

import fedmomentum_kernels as K

M = N = 2048
KC, R = 10, 16


@pytest.fixture(scope="module")
def factors():
    g = torch.Generator().manual_seed(0)
    L = [torch.randn(M, R, generator=g) * 0.02 for _ in range(KC)]
    Rt = [torch.randn(R, N, generator=g) * 0.02 for _ in range(KC)]
    return L, Rt, [1.0 / KC] * KC


@pytest.mark.benchmark(group="merge 2048x2048 fp32, K=10, r=16")
def test_lowrank_accumulate(benchmark, factors):
    L, Rt, cs = factors
    W = torch.zeros(M, N)
    benchmark(lambda: K.lowrank_accumulate_(W, L, Rt, cs))


@pytest.mark.benchmark(group="merge 2048x2048 fp32, K=10, r=16")
def test_naive_dense_products(benchmark, factors):
    L, Rt, cs = factors
    W = torch.zeros(M, N)

    def naive():
        for c, a, b in zip(cs, L, Rt):
            W.add_(c * (a @ b))
    benchmark(naive)


@pytest.mark.benchmark(group="merge bf16 W 2048x2048, K=10, r=16")
def test_lowrank_accumulate_bf16(benchmark, factors):
    L, Rt, cs = factors
    W = torch.zeros(M, N, dtype=torch.bfloat16)
    Lb, Rb = [x.bfloat16() for x in L], [x.bfloat16() for x in Rt]
    benchmark(lambda: K.lowrank_accumulate_(W, Lb, Rb, cs))


@pytest.mark.benchmark(group="gram 2048 x 160 fp32")
def test_stacked_gram(benchmark, factors):
    L, _, cs = factors
    benchmark(lambda: K.stacked_gram(L, cs, "left"))


@pytest.mark.benchmark(group="gram 2048 x 160 fp32")
def test_cat_then_gemm(benchmark, factors):
    L, _, _ = factors

    def floor():
        x = torch.cat(L, 1)
        return x.T @ x
    benchmark(floor)
