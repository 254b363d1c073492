"""aggregate_lora against the independent float64 dense reference."""
from __future__ import annotations

import math

import pytest
import torch

import fedmomentum as fm
from method_cases import method_case
from conftest import make_clients, reference_delta, rel_err

SOLVERS = ["exact", "randomized", "dense"]


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("shape,ranks", [((96, 80), [8, 8, 8]), ((63, 37), [8]), ((120, 70), [4, 8, 16, 2])])
def test_invariant_every_solver(solver, shape, ranks):
    m, n = shape
    B, A = make_clients(m, n, ranks, seed=1)
    w = list(range(1, len(ranks) + 1))
    ref = reference_delta(B, A, w, 0.5)
    res = fm.aggregate_lora(B, A, w, scalings=0.5, solver=solver)
    assert res.solver == solver
    assert res.B.shape == (m, max(ranks)) and res.A.shape == (max(ranks), n)
    assert res.exact
    assert rel_err(res.delta(), ref) < 2e-6
    # the residual alone is the exact remainder
    top = res.out_scaling * (res.B.double() @ res.A.double())
    gap = res.residual.to_dense(torch.float64) - (ref - top)
    assert float(gap.norm()) < 2e-6 * float(ref.norm())


@pytest.mark.parametrize("solver", ["exact", "dense"])
def test_singular_values_and_top_r(solver):
    m, n, r = 150, 110, 6
    B, A = make_clients(m, n, [6, 6, 6, 6], seed=2)
    w = [3, 1, 1, 2]
    ref = reference_delta(B, A, w, 2.0)
    U, S, Vh = torch.linalg.svd(ref)
    res = fm.aggregate_lora(B, A, w, scalings=2.0, solver=solver, rank=r)
    k = len(res.singular_values)
    assert k >= 24 or solver == "dense"
    assert torch.allclose(res.singular_values[:24].double(), S[:24], rtol=0, atol=1e-5 * float(S[0]))
    assert float(S[r - 1] / S[r]) > 1.1  # well-separated: the top-r subspace is unique
    top_ref = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
    top = 2.0 * res.B.double() @ res.A.double()
    assert rel_err(top, top_ref) < 1e-5
    energy = float((S[:r] ** 2).sum() / (S ** 2).sum())
    assert res.energy_kept == pytest.approx(energy, rel=1e-5)


def test_balanced_and_left_split():
    B, A = make_clients(80, 60, [5, 5, 5], seed=3)
    s = 4.0
    bal = fm.aggregate_lora(B, A, scalings=s, split="balanced", solver="exact")
    left = fm.aggregate_lora(B, A, scalings=s, split="left", solver="exact")
    sv = bal.singular_values[:5].double()
    # balanced: B = U√Σ/√s, A = √Σ Vᵀ/√s -> column norms of B equal row norms of A = √(σ/s)
    assert torch.allclose(bal.B.double().norm(dim=0), (sv / s).sqrt(), rtol=1e-4)
    assert torch.allclose(bal.A.double().norm(dim=1), (sv / s).sqrt(), rtol=1e-4)
    # left: A has orthonormal rows, B = UΣ/s
    AAt = left.A.double() @ left.A.double().T
    assert torch.allclose(AAt, torch.eye(5, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(left.B.double().norm(dim=0), sv / s, rtol=1e-4)
    assert rel_err(s * left.B.double() @ left.A.double(), s * bal.B.double() @ bal.A.double()) < 1e-5


def test_heterogeneous_ranks_and_scalings():
    ranks = [2, 4, 8, 16]
    B, A = make_clients(70, 90, ranks, seed=4)
    scal = [16 / r for r in ranks]  # alpha / r_k with alpha = 16
    ref = reference_delta(B, A, [1, 1, 2, 2], scal)
    with pytest.raises(ValueError, match="different LoRA scalings"):
        fm.aggregate_lora(B, A, [1, 1, 2, 2], scalings=scal)
    res = fm.aggregate_lora(B, A, [1, 1, 2, 2], scalings=scal, out_scaling=1.0, rank=8)
    assert res.B.shape == (70, 8) and res.out_scaling == 1.0
    assert rel_err(res.delta(), ref) < 2e-6


@pytest.mark.parametrize("shared", ["exact", 1e-6, 1e-3])
def test_clients_sharing_A(shared):
    """Shared A init makes A_cat (nearly) rank-deficient: the Gram route must fall back."""
    B, A = make_clients(200, 150, [8, 8, 8, 8, 8], seed=5, shared_A=shared)
    ref = reference_delta(B, A)
    res = fm.aggregate_lora(B, A, solver="exact")
    assert rel_err(res.delta(), ref) < 2e-6
    S = torch.linalg.svdvals(ref)
    assert torch.allclose(res.singular_values[:8].double(), S[:8], atol=1e-5 * float(S[0]), rtol=0)
    if shared == "exact":  # ΔW = (Σ p B_k) A_0 has rank 8: everything fits in the adapter
        assert res.energy_kept == pytest.approx(1.0, abs=1e-6)
        assert res.residual.rank == 0 or float(res.residual.to_dense().norm()) < 1e-5 * float(ref.norm())


def test_stack_wider_than_layer():
    """R >= min(m, n): auto picks dense; exact (forced) still gives the exact answer."""
    B, A = make_clients(40, 30, [8] * 6, seed=6)
    ref = reference_delta(B, A)
    auto = fm.aggregate_lora(B, A)
    assert auto.solver == "dense"
    for res in (auto, fm.aggregate_lora(B, A, solver="exact")):
        assert rel_err(res.delta(), ref) < 2e-6
        assert res.residual.rank <= 30 - 8


def test_bf16_inputs_return_bf16():
    B, A = make_clients(128, 64, [8, 8, 8], seed=7, dtype=torch.bfloat16)
    ref = reference_delta(B, A)
    res = fm.aggregate_lora(B, A, solver="exact")
    assert res.B.dtype == torch.bfloat16 and res.A.dtype == torch.bfloat16
    assert res.residual.left.dtype == torch.float32  # residual stays in the compute dtype
    # the only loss is rounding B and A to bf16 (relative ~2^-8)
    assert rel_err(res.delta(), ref) < 1e-2
    exact32 = fm.aggregate_lora([b.float() for b in B], [a.float() for a in A], solver="exact")
    assert rel_err(res.B.double() @ res.A.double(), exact32.B.double() @ exact32.A.double()) < 1e-2


def test_fp64_compute():
    B, A = make_clients(90, 70, [6, 6, 6], seed=8, dtype=torch.float64)
    ref = reference_delta(B, A)
    res = fm.aggregate_lora(B, A, compute_dtype=torch.float64, solver="exact")
    assert res.B.dtype == torch.float64
    assert rel_err(res.delta(), ref) < 1e-12


def test_rank_deficient_delta_gives_live_directions():
    """ΔW of rank < r: no dead all-zero rows in both B and A."""
    m, n = 60, 50
    B, A = make_clients(m, n, [2], seed=9)
    res = fm.aggregate_lora(B, A, rank=5, solver="exact")
    assert res.B.shape == (m, 5)
    assert torch.count_nonzero(res.B[:, 2:]) == 0  # B columns of the dead directions are zero
    AAt = res.A[2:].double() @ res.A[2:].double().T
    assert torch.allclose(AAt, torch.eye(3, dtype=torch.float64), atol=1e-5)  # orthonormal rows
    assert float((res.A[:2].double() @ res.A[2:].double().T).abs().max()) < 1e-5  # orthogonal to kept
    assert rel_err(res.delta(), reference_delta(B, A)) < 2e-6
    # all-zero update (e.g. clients that did not train): B zero, A orthonormal, energy 1 by convention
    Bz = [torch.zeros(m, 4), torch.zeros(m, 4)]
    Az = [torch.randn(4, n), torch.randn(4, n)]
    res0 = fm.aggregate_lora(Bz, Az, solver="exact")
    assert torch.count_nonzero(res0.B) == 0
    assert torch.allclose(res0.A.double() @ res0.A.double().T, torch.eye(4, dtype=torch.float64), atol=1e-5)
    assert res0.energy_kept == 1.0


def test_zero_weight_client_is_ignored():
    B, A = make_clients(50, 40, [4, 4, 4], seed=10)
    Bbad = list(B)
    Bbad[1] = torch.full_like(B[1], 1e3)
    ref = reference_delta(B, A, [1, 0, 2])
    res = fm.aggregate_lora(Bbad, A, [1, 0, 2], solver="exact")
    assert rel_err(res.delta(), ref) < 2e-6


def test_residual_energy_truncation_reports_dropped():
    B, A = make_clients(100, 80, [6, 6, 6, 6], seed=11, decay=0.6)
    ref = reference_delta(B, A)
    S = torch.linalg.svdvals(ref)
    res = fm.aggregate_lora(B, A, residual_energy=0.99, solver="exact")
    assert not res.exact and res.energy_dropped > 0
    err2 = float(((res.delta() - ref) ** 2).sum() / (ref ** 2).sum())
    assert err2 == pytest.approx(res.energy_dropped, rel=1e-3, abs=1e-9)
    assert res.energy_dropped <= 0.01 + 1e-9
    full = fm.aggregate_lora(B, A, residual_energy=1.0, solver="exact")
    assert res.residual.rank < full.residual.rank
    with pytest.raises(ValueError, match="randomized"):
        fm.aggregate_lora(B, A, residual_energy=0.99, solver="randomized")
    assert float((S ** 2).sum()) > 0


def test_randomized_matches_exact_on_decaying_spectrum_and_is_seeded():
    B, A = make_clients(300, 200, [8] * 10, seed=12, decay=0.5)
    B = [b * 0.3 ** k for k, b in enumerate(B)]  # a clear spectral gap after each singular value
    ex = fm.aggregate_lora(B, A, solver="exact", rank=4)
    g1 = torch.Generator().manual_seed(7)
    g2 = torch.Generator().manual_seed(7)
    r1 = fm.aggregate_lora(B, A, solver="randomized", rank=4, generator=g1)
    r2 = fm.aggregate_lora(B, A, solver="randomized", rank=4, generator=g2)
    assert torch.equal(r1.B, r2.B) and torch.equal(r1.A, r2.A)
    assert rel_err(r1.B.double() @ r1.A.double(), ex.B.double() @ ex.A.double()) < 1e-3
    assert r1.energy_kept == pytest.approx(ex.energy_kept, rel=1e-2)
    assert rel_err(r1.delta(), reference_delta(B, A)) < 2e-6  # residual stays exact


def test_inputs_never_modified():
    B, A = make_clients(40, 30, [4, 4], seed=13)
    Bc = [b.clone() for b in B]
    Ac = [a.clone() for a in A]
    for method in fm.METHODS:
        Bm, Am, kw = method_case(method, B, A)
        fm.aggregate_lora(Bm, Am, method=method, **kw)
    assert all(torch.equal(x, y) for x, y in zip(B + A, Bc + Ac))


def test_huge_layer_never_densified():
    """2^18 x 2^18 (a dense ΔW would need 256 GiB): exact must not allocate m x n."""
    m = n = 2 ** 18
    g = torch.Generator().manual_seed(0)
    B = [torch.randn(m, 8, generator=g) * 0.01 for _ in range(4)]
    A = [torch.randn(8, n, generator=g) / 512 for _ in range(4)]
    res = fm.aggregate_lora(B, A, [1, 2, 3, 4], scalings=2.0, solver="exact")
    assert res.B.shape == (m, 8) and res.residual.left.shape == (m, 24)
    rows = torch.randint(0, m, (64,), generator=g)
    cols = torch.randint(0, n, (64,), generator=g)
    ref = sum((w / 10) * 2.0 * (b[rows].double() @ a[:, cols].double()) for w, b, a in zip([1, 2, 3, 4], B, A))
    got = 2.0 * res.B[rows].double() @ res.A[:, cols].double() + \
        res.residual.left[rows].double() @ res.residual.right[:, cols].double()
    assert rel_err(got, ref) < 1e-5
    assert fm.aggregate_lora(B, A, solver="auto").solver == "exact"


def test_merge_residual_in_place():
    B, A = make_clients(64, 48, [4, 4, 4], seed=14)
    res = fm.aggregate_lora(B, A, scalings=2.0, rank=4)
    W = torch.randn(64, 48)
    W0 = W.clone()
    out = fm.merge_residual_(W, res.residual, alpha=0.5)
    assert out is W
    assert rel_err(W - W0, 0.5 * res.residual.to_dense(torch.float64)) < 1e-6
    Wb = W0.to(torch.bfloat16)
    fm.merge_residual_(Wb, res.residual)
    assert rel_err(Wb.double(), W0.double() + res.residual.to_dense(torch.float64)) < 1e-2
    # new base + adapter == old base + exact sum
    W1 = W0.clone()
    fm.merge_residual_(W1, res.residual)
    eff = W1.double() + 2.0 * res.B.double() @ res.A.double()
    assert rel_err(eff - W0.double(), reference_delta(B, A, None, 2.0)) < 2e-6
    # errors leave W untouched
    Wbad = torch.randn(48, 64)
    keep = Wbad.clone()
    with pytest.raises(ValueError, match="does not match|but W is"):
        fm.merge_residual_(Wbad, res.residual)
    assert torch.equal(Wbad, keep)
    assert fm.merge_residual_(W, None) is W


def test_batched_layers_equal_per_layer():
    from fedmomentum_core import aggregate_layers
    layers = [make_clients(80, 50, [4, 4, 4], seed=20 + i) for i in range(5)]
    layers.append(make_clients(30, 50, [4, 4, 4], seed=40))
    res = aggregate_layers(layers, [1, 2, 3], names=[f"layer{i}" for i in range(6)], solver="exact")
    for (B, A), r in zip(layers, res):
        one = fm.aggregate_lora(B, A, [1, 2, 3], solver="exact")
        assert rel_err(r.delta(), one.delta()) < 1e-6
        assert rel_err(r.delta(), reference_delta(B, A, [1, 2, 3])) < 2e-6
    assert res[0].info["batched"] == 5 and res[5].info["batched"] == 1


@pytest.mark.parametrize("solver", ["exact", "auto"])
def test_stacked_residual_is_exact_and_matches_factored(solver):
    B, A = make_clients(90, 70, [4, 6, 8], seed=30)
    ref = reference_delta(B, A, [2, 1, 1], 1.5)
    st = fm.aggregate_lora(B, A, [2, 1, 1], scalings=1.5, residual="stacked", solver=solver)
    fa = fm.aggregate_lora(B, A, [2, 1, 1], scalings=1.5, residual="factored", solver=solver)
    assert st.residual.rank == 18 + 8 and st.exact
    assert rel_err(st.delta(), ref) < 2e-6
    assert rel_err(st.B.double() @ st.A.double(), fa.B.double() @ fa.A.double()) < 1e-5
    assert rel_err(st.residual.to_dense(torch.float64), fa.residual.to_dense(torch.float64)) < 1e-4
    with pytest.raises(ValueError, match="stacked"):
        fm.aggregate_lora(B, A, residual="stacked", residual_energy=0.9)


def test_stacked_residual_batched_and_dead_directions():
    from fedmomentum_core import aggregate_layers
    layers = [make_clients(60, 40, [3, 3], seed=50 + i) for i in range(3)]
    res = aggregate_layers(layers, residual="stacked", rank=8, solver="exact")
    for (B, A), r in zip(layers, res):
        assert r.info["batched"] == 3
        assert rel_err(r.delta(), reference_delta(B, A)) < 2e-6
        assert torch.count_nonzero(r.B[:, 6:]) == 0  # ΔW has rank 6 < 8: dead directions


@pytest.mark.parametrize("shared", ["exact", 1e-3])
def test_stacked_residual_with_rank_deficient_A_stack(shared):
    """The stacked remainder is written into the solver's own stacks: exact even when the A
    stack is rank-deficient (QR fallback), batched, and the inputs are left untouched."""
    from fedmomentum_core import aggregate_layers
    layers = [make_clients(70, 45, [5, 5, 5, 5], seed=60 + i, shared_A=shared) for i in range(2)]
    before = [[t.clone() for t in B + A] for B, A in layers]
    res = aggregate_layers(layers, [1, 3, 2, 2], scalings=[0.5, 1.0, 2.0, 1.5], out_scaling=1.0,
                           residual="stacked", rank=5, solver="exact")
    for (B, A), r, saved in zip(layers, res, before):
        ref = reference_delta(B, A, [1, 3, 2, 2], [0.5, 1.0, 2.0, 1.5])
        assert rel_err(r.delta(), ref) < 2e-6
        assert r.residual.left.shape == (70, 20 + 5) and r.residual.right.shape == (20 + 5, 45)
        assert all(torch.equal(x, y) for x, y in zip(B + A, saved))
    # the two layers' residuals do not share memory regions
    assert r.residual.left.data_ptr() != res[0].residual.left.data_ptr()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("residual", ["factored", "stacked"])
def test_batched_path_names_the_layer_and_client_with_non_finite_entries(bad, residual):
    """aggregate_layers reads the NaN/Inf check off the Grams: the error still names layer + client."""
    from fedmomentum_core import aggregate_layers
    layers = [make_clients(40, 30, [3, 3, 3], seed=70 + i) for i in range(3)]
    layers[1][1][2][0, 5] = bad  # layer 1, client 2, A
    with pytest.raises(ValueError, match=r"layer1.*client 2: A .*NaN/Inf"):
        aggregate_layers(layers, [1, 0, 2], names=[f"layer{i}" for i in range(3)], solver="exact",
                         residual=residual)
    huge = [make_clients(40, 30, [3, 3], seed=80)]
    huge[0][0][0].mul_(1e30)  # finite, but its square overflows fp32
    with pytest.raises(ValueError, match="too large"):
        aggregate_layers(huge, solver="exact")


def test_batched_fallbacks_stay_per_layer():
    """In one batch, layers whose B or A stack is rank-deficient (Householder-QR fallback) keep
    their own basis, and every layer's factors are those of the one-layer solve."""
    from fedmomentum_core.linalg import solve_exact_batch
    from fedmomentum_core.validate import validate_layer
    layers = [make_clients(60, 40, [3, 3, 3], seed=70 + i) for i in range(5)]
    B1, A1 = layers[1]
    layers[1] = ([B1[0].clone() for _ in B1], A1)          # shared B: B stack rank 3 of 9
    layers[3] = make_clients(60, 40, [3, 3, 3], seed=90, shared_A="exact")  # shared A
    inps = [validate_layer(B, A, [1, 2, 3]) for B, A in layers]
    got = solve_exact_batch(inps, 4, need_tail=True)
    assert [g.info["basis"] for g in got] == [
        ("cholesky", "cholesky"), ("qr", "cholesky"), ("cholesky", "cholesky"),
        ("cholesky", "qr"), ("cholesky", "cholesky")]
    for (B, A), g, inp in zip(layers, got, inps):
        ref = reference_delta(B, A, [1, 2, 3])
        assert rel_err(g.U.double() @ g.SV.double().T, ref) < 2e-6  # U·(σV)ᵀ rebuilds ΔW
        one = solve_exact_batch([inp], 4, need_tail=True)[0]
        assert torch.allclose(g.S, one.S, rtol=1e-5, atol=1e-6 * float(one.S[0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("need_tail", [True, False])
def test_one_pass_core_matches_general_path(dtype, need_tail):
    """The one-pass R x R stage (linalg.exact._fast_core: both sides' equilibrated Cholesky in one batch,
    coefficients folded into the small matrices, triangular solve instead of an inverse) gives the
    general path's singular values and subspaces, and U·(σV)ᵀ rebuilds the fp64 ΔW, with
    heterogeneous ranks, a negative scaling and several layers in one batch."""
    from fedmomentum_core.linalg import solve_exact_batch
    from fedmomentum_core.options import SolverTuning
    from fedmomentum_core.validate import validate_layer
    ranks = [3, 5, 2, 4]
    layers = [make_clients(70, 50, ranks, seed=200 + i) for i in range(3)]
    scal = [0.5, -1.5, 2.0, 1.0]
    inps = [validate_layer(B, A, [1, 2, 3, 4], scalings=scal, out_scaling=1.0) for B, A in layers]
    fast = solve_exact_batch(inps, 4, dtype=dtype, need_tail=need_tail)
    assert all(f.info["basis"] == ("cholesky", "cholesky") for f in fast)
    assert all(f.info["core"] == "one-pass" for f in fast)
    slow = solve_exact_batch(inps, 4, dtype=dtype, need_tail=need_tail, tuning=SolverTuning(fast_core=False))
    assert all(g.info["core"] == "general" for g in slow)  # fast_core=False really took the general path
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for (B, A), f, g in zip(layers, fast, slow):
        ref = reference_delta(B, A, [1, 2, 3, 4], scal)
        sv = torch.linalg.svdvals(ref)
        k = f.U.shape[1]
        assert k == (sum(ranks) if need_tail else 4)
        assert torch.allclose(f.S.double(), sv[:f.S.numel()], rtol=0, atol=tol * float(sv[0]))
        assert torch.allclose(f.S.double(), g.S.double(), rtol=0, atol=tol * float(sv[0]))
        # top-4 subspace (σ4/σ5 gap checked) agrees between the two paths
        if float(sv[3] / sv[4]) > 1.1:
            Pf = f.U[:, :4].double() @ f.U[:, :4].double().T
            Pg = g.U[:, :4].double() @ g.U[:, :4].double().T
            assert float((Pf - Pg).norm()) < 100 * tol
            top_f = f.U[:, :4].double() @ torch.diag(f.S[:4].double()) @ f.V[:, :4].double().T
            top_g = g.U[:, :4].double() @ torch.diag(g.S[:4].double()) @ g.V[:, :4].double().T
            assert rel_err(top_f, top_g) < 100 * tol
        if need_tail:
            assert rel_err(f.U.double() @ f.SV.double().T, ref) < 10 * tol
            eye = torch.eye(k, dtype=torch.float64)
            assert float((f.U.double().T @ f.U.double() - eye).abs().max()) < 10 * tol


def test_scratch_stacks_are_never_returned():
    """The factored path stacks into a buffer reused from call to call (linalg.workspace): a
    later call, of the same or another shape, must leave every earlier result intact."""
    from fedmomentum_core.linalg import release_workspace, thread_workspace
    from fedmomentum_core.options import SolverTuning
    assert SolverTuning().workspace
    first = make_clients(96, 80, [4, 6, 5], seed=11)
    second = make_clients(96, 80, [4, 6, 5], seed=12)
    third = make_clients(120, 64, [8, 8], seed=13)
    res = fm.aggregate_lora(*first, rank=4)
    kept = {name: t.clone() for name, t in (("B", res.B), ("A", res.A), ("left", res.residual.left),
                                             ("right", res.residual.right))}
    fm.aggregate_lora(*second, rank=4)
    fm.aggregate_lora(*third, rank=8)
    for name, t in (("B", res.B), ("A", res.A), ("left", res.residual.left), ("right", res.residual.right)):
        assert torch.equal(t, kept[name]), name
    ref = reference_delta(*first)
    got = res.B.double() @ res.A.double() + res.residual.to_dense().double()
    assert rel_err(got, ref) < 1e-5
    # the buffer is kept (and not grown by a same-shaped call); release frees it
    held = thread_workspace().nbytes
    assert held >= 4 * (96 + 80) * 15
    fm.aggregate_lora(*second, rank=4)
    assert thread_workspace().nbytes == held
    release_workspace()
    assert thread_workspace().nbytes == 0
    from fedmomentum_core import aggregate_layer
    aggregate_layer(*second, rank=4, tuning=SolverTuning(workspace=False))
    assert thread_workspace().nbytes == 0  # workspace=False: stacks allocated per call


def test_scratch_stacks_are_per_thread():
    """Two threads aggregating at once each get their own scratch stacks and exact results."""
    import threading
    cases = [make_clients(256, 192, [8] * 5, seed=20 + i) for i in range(2)]
    refs = [reference_delta(*c) for c in cases]
    errs, fails = [None, None], []

    def work(i):
        try:
            worst = 0.0
            for _ in range(15):
                r = fm.aggregate_lora(*cases[i], rank=8)
                got = r.B.double() @ r.A.double() + r.residual.to_dense().double()
                worst = max(worst, rel_err(got, refs[i]))
            errs[i] = worst
        except Exception as e:  # reported below, not swallowed
            fails.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not fails, fails
    assert all(e is not None and e < 1e-5 for e in errs), errs
