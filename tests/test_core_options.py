"""AggregateOptions and SolverTuning: validation, and every tuning knob changes speed or memory
only (results equal the default's to float rounding)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from fedmomentum_core import AggregateOptions, SolverTuning, aggregate_layer, aggregate_layers


def clients(m, n, ranks, seed):
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(m, r, generator=g) * 0.1 for r in ranks],
            [torch.randn(r, n, generator=g) / n ** 0.5 for r in ranks])


def dense(res, s=1.0):
    out = s * res.B.double() @ res.A.double()
    if res.residual is not None:
        out = out + res.residual.to_dense().double()
    return out


@pytest.mark.parametrize("tuning", [
    SolverTuning(fast_core=False), SolverTuning(workspace=False), SolverTuning(workspace_max_bytes=0),
    SolverTuning(symmetric_gram_min_r=1), SolverTuning(symmetric_gram_min_r=10 ** 6),
    SolverTuning(batch_bytes=1), SolverTuning(gram_tol=0.5),
])
def test_tuning_changes_no_result(tuning):
    layers = [clients(80, 72, [8, 8, 8, 8, 8, 8, 8, 8], 30 + i) for i in range(3)]  # R = 64
    ref = aggregate_layers(layers, [1, 2, 3, 4, 5, 6, 7, 8], rank=8, solver="exact")
    got = aggregate_layers(layers, [1, 2, 3, 4, 5, 6, 7, 8], rank=8, solver="exact", tuning=tuning)
    for a, b in zip(ref, got):
        assert torch.allclose(dense(a), dense(b), rtol=0, atol=1e-5 * float(dense(a).abs().max()))
        assert torch.allclose(a.singular_values, b.singular_values, rtol=1e-4, atol=1e-6)
    if tuning.batch_bytes == 1:
        assert all(r.info["batched"] == 1 for r in got)
    else:
        assert all(r.info["batched"] == 3 for r in got)


def test_randomized_tuning_and_auto_margin():
    B, A = clients(300, 260, [4] * 40, 5)  # R = 160
    base = aggregate_layer(B, A, rank=4, solver="randomized")
    more = aggregate_layer(B, A, rank=4, solver="randomized",
                           tuning=SolverTuning(oversample=30, power_iters=4, probes=0))
    assert more.solver == base.solver == "randomized"
    # the residual keeps either exact
    ref = sum(b.double() @ a.double() for b, a in zip(B, A)) / len(B)
    for r in (base, more):
        assert float((dense(r) - ref).norm() / ref.norm()) < 1e-5
    # auto takes randomized only past the margin and the minimum work
    t = SolverTuning(randomized_min_work=0, randomized_margin=1.0)
    assert t.choose_solver(300, 260, 160, 4) == "randomized"
    assert SolverTuning().choose_solver(300, 260, 160, 4) == "exact"  # exact is cheap here
    assert aggregate_layer(B, A, rank=4, tuning=t).solver == "randomized"
    assert aggregate_layer(B, A, rank=4).solver == "exact"


@pytest.mark.parametrize("bad, match", [
    (dict(batch_bytes=-1), "batch_bytes"), (dict(oversample=1.5), "oversample"),
    (dict(gram_tol=2.0), "gram_tol"), (dict(randomized_margin=0), "randomized_margin"),
])
def test_tuning_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        SolverTuning(**bad)


@pytest.mark.parametrize("bad, err, match", [
    (dict(method="nope"), ValueError, "unknown method 'nope'"),
    (dict(solver="nope"), ValueError, "unknown solver 'nope'"),
    (dict(residual="x"), ValueError, "residual must be one of"),
    (dict(split="x"), ValueError, "split must be one of"),
    (dict(compute_dtype=torch.float16), TypeError, "compute_dtype must be torch.float32 or torch.float64"),
    (dict(residual_energy=0.0), ValueError, r"residual_energy must be in \(0, 1\]"),
    (dict(tau=1.5), ValueError, r"tau must be in \(0, 1\]"),
    (dict(generator=3), TypeError, "generator must be a torch.Generator"),
    (dict(rank=2.0), TypeError, "rank must be an int"),
    (dict(rank=0), ValueError, "rank must be >= 1"),
])
def test_options_validation_messages(bad, err, match):
    with pytest.raises(err, match=match):
        AggregateOptions(**bad)
    B, A = clients(20, 16, [2, 2], 1)
    with pytest.raises(err, match="layer 'q': " + match):  # the keyword route names the layer
        aggregate_layer(B, A, name="q", **bad)


def test_options_are_frozen_and_rank_is_checked_per_layer():
    o = AggregateOptions(rank=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.rank = 4
    B, A = clients(20, 6, [2, 2], 1)
    with pytest.raises(ValueError, match=r"layer 'q': rank 8 exceeds min\(m, n\) = 6"):
        aggregate_layer(B, A, name="q", options=o)
