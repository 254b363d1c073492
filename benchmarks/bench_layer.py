"""pytest-benchmark suite: one 1024² layer, K=10, r=16 — ours vs the dense routes.

    python -m pytest benchmarks/bench_layer.py --benchmark-only
"""
from __future__ import annotations

import pytest

import fedmomentum as fm
from fedmomentum_core import SolverTuning, aggregate_layer
from fedmomentum_core.baselines import dense_full_svd, dense_svd_lowrank
from fedmomentum_core.synthetic import synthetic_round
from fedmomentum_core.validate import validate_layer


@pytest.fixture(scope="module")
def layer():
    B, A, w = synthetic_round(1024, 1024, 10, 16)
    return B, A, w, validate_layer(B, A, w)


@pytest.mark.parametrize("solver", ["exact", "randomized", "dense"])
def test_ours(benchmark, layer, solver):
    B, A, w, _ = layer
    res = benchmark(lambda: fm.aggregate_lora(B, A, w, solver=solver))
    assert res.solver == solver


@pytest.mark.parametrize("workspace", [True, False])
def test_exact_scratch_workspace(benchmark, layer, workspace):
    """The exact solver with its scratch stacks kept between calls (default) or allocated per call."""
    B, A, w, _ = layer
    tuning = SolverTuning(workspace=workspace)
    benchmark(lambda: aggregate_layer(B, A, w, solver="exact", tuning=tuning))


def test_paper_dense_svd_lowrank(benchmark, layer):
    benchmark(lambda: dense_svd_lowrank(layer[3], 16))


def test_peft_dense_full_svd(benchmark, layer):
    benchmark(lambda: dense_full_svd(layer[3], 16))
