"""Each baseline's documented behaviour, against the float64 reference."""
from __future__ import annotations

import math

import pytest
import torch

import fedmomentum_core as fm_core

import fedmomentum as fm
from conftest import make_clients, reference_delta, rel_err

W = [1, 2, 3]


def test_registry_has_all_methods():
    assert set(fm.METHODS) == {"fedmomentum", "fedit", "ffa_lora", "fedsa_lora", "flora",
                               "fedex_lora", "florist", "flexlora", "hetlora", "fedsvd", "rolora",
                               "fedrot_lora", "ilora"}
    for name, spec in fm.METHODS.items():
        assert spec.name == name
        assert spec.fn.__doc__ and "20" in spec.paper  # cites its paper (year)


@pytest.mark.parametrize("name", ["fedmomentum", "fedit", "ffa_lora", "flora", "fedex_lora", "florist"])
def test_exact_trait_matches_the_invariant(name):
    """A method's `exact` trait holds iff s·B·A + residual reproduces ΔW (checked in float64)."""
    B, A = make_clients(40, 30, [3, 3, 3], seed=5, shared_A="exact")
    B = [b + 0.1 * torch.randn_like(b) for b in B]
    A2 = [a + (0.0 if name == "ffa_lora" else 0.3) * torch.randn_like(a) for a in A]
    spec = fm.METHODS[name]
    res = fm.aggregate_lora(B, A2, W, method=name, scalings=2.0, rank=3)
    ref = reference_delta(B, A2, W, 2.0)
    got = res.delta(torch.float64)
    assert (rel_err(got, ref) < 1e-5) == spec.exact, (name, rel_err(got, ref))
    assert spec.has_residual == (spec.residual in ("tail", "error", "whole"))


def test_get_method_names_the_choices():
    with pytest.raises(ValueError, match="unknown method 'fedavg'.*fedmomentum"):
        fm_core.get_method("fedavg")


def test_fedit_is_separate_averaging_and_inexact():
    B, A = make_clients(50, 40, [4, 4, 4], seed=1)
    res = fm.aggregate_lora(B, A, W, method="fedit", scalings=2.0)
    p = [w / 6 for w in W]
    Bbar = sum(pk * b.double() for pk, b in zip(p, B))
    Abar = sum(pk * a.double() for pk, a in zip(p, A))
    assert torch.allclose(res.B.double(), Bbar, atol=1e-6) and torch.allclose(res.A.double(), Abar, atol=1e-6)
    assert res.residual is None and not res.exact
    ref = reference_delta(B, A, W, 2.0)
    assert rel_err(2.0 * res.B.double() @ res.A.double(), ref) > 0.1  # Σp·B·Σp·A ≠ Σp·B·A


def test_fedit_pads_heterogeneous_ranks_and_refuses_rank_change():
    B, A = make_clients(30, 20, [2, 4], seed=2)
    res = fm.aggregate_lora(B, A, method="fedit")
    assert res.B.shape == (30, 4)
    assert torch.allclose(res.B[:, 2:].double(), 0.5 * B[1][:, 2:].double(), atol=1e-6)
    with pytest.raises(ValueError, match="cannot change the rank"):
        fm.aggregate_lora(B, A, method="fedit", rank=2)


def test_ffa_lora_exact_with_shared_A_and_raises_otherwise():
    B, A = make_clients(50, 40, [4, 4, 4], seed=3, shared_A="exact")
    res = fm.aggregate_lora(B, A, W, method="ffa_lora")
    assert torch.equal(res.A, A[0])
    assert rel_err(res.delta(), reference_delta(B, A, W)) < 1e-6
    B2, A2 = make_clients(50, 40, [4, 4, 4], seed=3)
    with pytest.raises(ValueError, match="client 1's A"):
        fm.aggregate_lora(B2, A2, method="ffa_lora")


def test_fedsa_lora_averages_A_only():
    B, A = make_clients(50, 40, [4, 4, 4], seed=4)
    res = fm.aggregate_lora(B, A, W, method="fedsa_lora")
    assert res.B is None and res.residual is None
    Abar = sum(w / 6 * a.double() for w, a in zip(W, A))
    assert torch.allclose(res.A.double(), Abar, atol=1e-6)
    with pytest.raises(ValueError, match="one rank"):
        fm.aggregate_lora(*make_clients(50, 40, [2, 4], seed=4), method="fedsa_lora")


def test_flora_merges_everything_and_reinitialises():
    B, A = make_clients(50, 40, [4, 6, 8], seed=5)
    res = fm.aggregate_lora(B, A, W, method="flora", rank=8, generator=torch.Generator().manual_seed(0))
    assert torch.count_nonzero(res.B) == 0  # PEFT init: B zero
    assert float(res.A.abs().max()) <= 1 / math.sqrt(40) + 1e-7  # kaiming-uniform(a=√5) bound
    assert float(res.A.std()) > 0.5 / math.sqrt(40) / math.sqrt(3)
    assert res.residual.rank == 18 and res.exact
    assert rel_err(res.residual.to_dense(torch.float64), reference_delta(B, A, W)) < 1e-6
    assert rel_err(res.delta(), reference_delta(B, A, W)) < 1e-6


def test_fedex_lora_average_plus_exact_error():
    B, A = make_clients(50, 40, [4, 4, 4], seed=6)
    res = fm.aggregate_lora(B, A, W, method="fedex_lora", scalings=0.5)
    fedit = fm.aggregate_lora(B, A, W, method="fedit", scalings=0.5)
    assert torch.allclose(res.B, fedit.B) and torch.allclose(res.A, fedit.A)
    assert res.exact
    assert rel_err(res.delta(), reference_delta(B, A, W, 0.5)) < 1e-6


def test_florist_keeps_smallest_rank_reaching_tau_and_discards_tail():
    B, A = make_clients(80, 60, [6, 6, 6], seed=7, decay=0.5)
    ref = reference_delta(B, A)
    S = torch.linalg.svdvals(ref)
    e = torch.cumsum(S ** 2, 0) / (S ** 2).sum()
    for tau in (0.5, 0.9, 0.99):
        res = fm.aggregate_lora(B, A, method="florist", tau=tau)
        k = int((e < tau).sum()) + 1
        assert res.A.shape[0] == min(k, 6)
        assert res.residual is None and not res.exact
        assert res.energy_kept == pytest.approx(float(e[res.A.shape[0] - 1]), rel=1e-4)
        assert res.energy_dropped == pytest.approx(1 - res.energy_kept, abs=1e-9)
        U, S_, Vh = torch.linalg.svd(ref)
        kk = res.A.shape[0]
        assert rel_err(res.B.double() @ res.A.double(), U[:, :kk] @ torch.diag(S_[:kk]) @ Vh[:kk]) < 1e-4


def test_fedmomentum_beats_fedit_on_exactness():
    B, A = make_clients(60, 50, [4, 4, 4, 4], seed=8)
    ref = reference_delta(B, A)
    fmm = fm.aggregate_lora(B, A)
    fit = fm.aggregate_lora(B, A, method="fedit")
    assert rel_err(fmm.delta(), ref) < 2e-6 < rel_err(fit.B.double() @ fit.A.double(), ref)
