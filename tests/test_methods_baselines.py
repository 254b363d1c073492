"""Issue 17's baselines (flexlora, hetlora, fedsvd, rolora, fedrot_lora, ilora): each equals a
dense float64 restatement of its algorithm (written here in plain torch, as FedLLM-Factory computes
it: the m x n ΔW, torch.linalg.svd / qr), bad inputs give clear errors, and the method options
are validated against the registry."""
from __future__ import annotations

import pytest
import torch

import fedmomentum as fm
import fedmomentum_core as fm_core
from fedmomentum_core.methods import METHODS, ilora_init

M, N = 48, 36
RANKS = [2, 5, 3, 4]
W = [1.0, 2.0, 0.5, 3.0]
S = [2.0, 1.0, 0.5, 1.5]  # per-client LoRA scales
OUT_S = 1.25
TOL = 2e-5  # fp32 factors, fp32 compute


def rel(a, b):
    return float((a.double() - b.double()).norm() / max(b.double().norm(), 1e-30))


def clients(ranks=RANKS, *, seed=0, shared=None, m=M, n=N):
    g = torch.Generator().manual_seed(seed)
    B = [torch.randn(m, r, generator=g) for r in ranks]
    A = [torch.randn(r, n, generator=g) for r in ranks]
    if shared == "A":
        A = [A[0].clone() for _ in ranks]
    elif shared == "B":
        B = [B[0].clone() for _ in ranks]
    return B, A


def p_of(w=W):
    return [x / sum(w) for x in w]


def dense_delta(B, A, w=W, s=S):
    """Σ p_k s_k B_k A_k, dense, float64 (FedLLM-Factory's first step)."""
    return sum(pk * sk * b.double() @ a.double() for pk, sk, b, a in zip(p_of(w), s, B, A))


def agg(B, A, method, **kw):
    kw.setdefault("scalings", S)
    kw.setdefault("out_scaling", OUT_S)
    return fm.aggregate_lora(B, A, W, method=method, **kw)


def prod(res, B=None, A=None):
    B = res.B if B is None else B
    A = res.A if A is None else A
    return res.out_scaling * B.double() @ A.double()


# ---- FlexLoRA ---------------------------------------------------------------------------------

@pytest.mark.parametrize("solver", ["exact", "dense"])
def test_flexlora_equals_dense_svd_truncated_per_client(solver):
    B, A = clients()
    res = agg(B, A, "flexlora", solver=solver)
    U, Sv, Vh = torch.linalg.svd(dense_delta(B, A))
    top = lambda r: U[:, :r] @ torch.diag(Sv[:r]) @ Vh[:r]  # noqa: E731
    assert res.rank == max(RANKS) and not res.exact and res.residual is None
    assert rel(prod(res), top(max(RANKS))) < TOL
    per = res.info["per_client"]
    assert [b.shape[1] for b, _ in per] == RANKS and [a.shape[0] for _, a in per] == RANKS
    for (bk, ak), rk in zip(per, RANKS):
        assert bk.dtype == torch.float32
        assert rel(prod(res, bk, ak), top(rk)) < TOL
    dropped = float((Sv[max(RANKS):] ** 2).sum() / (Sv ** 2).sum())
    assert abs(res.energy_dropped - dropped) < 1e-5


def test_flexlora_client_ranks_option_and_errors():
    B, A = clients()
    R = sum(RANKS)
    res = agg(B, A, "flexlora", rank=3, method_options={"client_ranks": [1, 7, R, 2]})
    U, Sv, Vh = torch.linalg.svd(dense_delta(B, A))
    assert res.rank == 3
    for (bk, ak), rk in zip(res.info["per_client"], [1, 7, R, 2]):
        assert rel(prod(res, bk, ak), U[:, :rk] @ torch.diag(Sv[:rk]) @ Vh[:rk]) < TOL
    with pytest.raises(ValueError, match=r"flexlora: client 1's rank 15 exceeds the stacked rank R"):
        agg(B, A, "flexlora", method_options={"client_ranks": [1, R + 1, 2, 2]})
    with pytest.raises(ValueError, match="client_ranks has 2 entries for K = 4"):
        agg(B, A, "flexlora", method_options={"client_ranks": [1, 2]})
    with pytest.raises(ValueError, match="'flexlora', option 'client_ranks': client 0's rank must be an int >= 1"):
        agg(B, A, "flexlora", method_options={"client_ranks": [0, 2, 2, 2]})


# ---- HetLoRA ----------------------------------------------------------------------------------

def test_hetlora_equals_dense_sparsity_weighted_padding():
    B, A = clients()
    res = agg(B, A, "hetlora")
    r = max(RANKS)
    norms = [float((sk * b.double() @ a.double()).norm()) for sk, b, a in zip(S, B, A)]  # dense ‖s_k B_k A_k‖_F
    w = [pk * nk for pk, nk in zip(p_of(), norms)]
    w = [x / sum(w) for x in w]
    Bbar = sum(wk * sk / OUT_S * torch.nn.functional.pad(b.double(), (0, r - b.shape[1]))
               for wk, sk, b in zip(w, S, B))
    Abar = sum(wk * torch.nn.functional.pad(a.double(), (0, 0, 0, r - a.shape[0])) for wk, a in zip(w, A))
    assert max(abs(x - y) for x, y in zip(res.info["weights"], w)) < 1e-6
    assert rel(res.B, Bbar) < TOL and rel(res.A, Abar) < TOL
    for (bk, ak), rk in zip(res.info["per_client"], RANKS):
        assert rel(prod(res, bk, ak), OUT_S * Bbar[:, :rk] @ Abar[:rk]) < TOL
    assert not res.exact and res.residual is None


def test_hetlora_errors():
    B, A = clients()
    with pytest.raises(ValueError, match=r"hetlora: client 2's rank 6 exceeds the padded rank"):
        agg(B, A, "hetlora", method_options={"client_ranks": [1, 2, 6, 2]})
    with pytest.raises(ValueError, match="hetlora zero-pads .* rank=3 but the clients' max rank is 5"):
        agg(B, A, "hetlora", rank=3)


def test_hetlora_all_zero_updates_fall_back_to_data_weights():
    B, A = clients([3, 3, 3, 3])
    B = [torch.zeros_like(b) for b in B]
    res = agg(B, A, "hetlora")
    assert res.info["weights"] == pytest.approx(p_of())


# ---- FedSVD -----------------------------------------------------------------------------------

def test_fedsvd_equals_dense_svd_of_Bbar_A():
    r = 4
    B, A = clients([r] * 4, shared="A")
    res = agg(B, A, "fedsvd")
    # FedLLM-Factory's fedsvd.py, dense: B̄ = Σ p_k B_k (our s_k/s folded in), SVD(B̄ @ A)
    Bbar = sum(pk * sk / OUT_S * b.double() for pk, sk, b in zip(p_of(), S, B))
    U, Sv, Vh = torch.linalg.svd(Bbar @ A[0].double())
    assert res.exact and res.residual is not None and res.residual.rank == 0
    assert rel(prod(res), OUT_S * Bbar @ A[0].double()) < TOL  # exact: rank ≤ r
    assert rel(res.B.double() @ res.A.double(), U[:, :r] @ torch.diag(Sv[:r]) @ Vh[:r]) < TOL
    assert torch.allclose(res.A.double() @ res.A.double().T, torch.eye(r, dtype=torch.float64), atol=1e-5)
    assert torch.allclose((res.A.double() @ Vh[:r].T).abs(), torch.eye(r, dtype=torch.float64), atol=1e-4)  # A = ±V_rᵀ
    assert METHODS["fedsvd"].trains == frozenset({"B"})


def test_fedsvd_errors():
    B, A = clients([4] * 4)
    with pytest.raises(ValueError, match="fedsvd needs one frozen A shared by all clients .* client 1's A"):
        agg(B, A, "fedsvd")
    B, A = clients([4, 3], shared=None)
    with pytest.raises(ValueError, match="fedsvd needs one rank for all clients"):
        fm.aggregate_lora(B, A, method="fedsvd")


def test_fedsvd_zero_B_keeps_orthonormal_A():
    B, A = clients([4] * 4, shared="A")
    res = agg([torch.zeros_like(b) for b in B], A, "fedsvd")
    assert float(res.B.abs().max()) == 0.0
    assert torch.allclose(res.A.double() @ res.A.double().T, torch.eye(4, dtype=torch.float64), atol=1e-5)


# ---- RoLoRA -----------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [1, 2, 3, 4])
def test_rolora_averages_the_trained_factor(t):
    shared = "A" if t % 2 else "B"
    B, A = clients([4] * 4, shared=shared, seed=t)
    res = agg(B, A, "rolora", method_options={"round": t})
    c = [pk * sk / OUT_S for pk, sk in zip(p_of(), S)]
    if t % 2:
        assert rel(res.B, sum(ck * b.double() for ck, b in zip(c, B))) < TOL
        assert torch.equal(res.A, A[0])
    else:
        assert rel(res.A, sum(ck * a.double() for ck, a in zip(c, A))) < TOL
        assert torch.equal(res.B, B[0])
    assert res.exact and rel(prod(res), dense_delta(B, A)) < TOL
    assert METHODS["rolora"].trains_in(t) == frozenset({"B" if t % 2 else "A"})


def test_rolora_errors():
    B, A = clients([4] * 4, shared="A")
    with pytest.raises(ValueError, match=r"method 'rolora' needs the option 'round'.*it accepts 'round'"):
        agg(B, A, "rolora")
    with pytest.raises(ValueError, match=r"rolora needs one frozen B shared .*round 2 trains A only"):
        agg(B, A, "rolora", method_options={"round": 2})
    B2, A2 = clients([4] * 4, shared="B")
    with pytest.raises(ValueError, match=r"rolora needs one frozen A shared .*round 1 trains B only"):
        agg(B2, A2, "rolora", method_options={"round": 1})
    with pytest.raises(ValueError, match="option 'round': must be an int >= 0"):
        agg(B, A, "rolora", method_options={"round": -1})
    with pytest.raises(ValueError, match="pass the round"):
        METHODS["rolora"].trains_in(None)


# ---- FedRot-LoRA ------------------------------------------------------------------------------

def dense_fedrot(B, A, Bg, Ag, t, lam):
    """The paper's server step in plain fp64 torch: Procrustes, soft (polar of the interpolation),
    rotate, average."""
    Bs, As = [], []
    for b, a in zip(B, A):
        b, a = b.double(), a.double()
        if t >= 1:
            Mx = a @ Ag.double().T if t % 2 else b.T @ Bg.double()
            U, _, Vh = torch.linalg.svd(Mx)
            X = (1 - lam) * torch.eye(Mx.shape[0], dtype=torch.float64) + lam * (U @ Vh)
            U2, _, Vh2 = torch.linalg.svd(X)
            Rk = U2 @ Vh2
            b, a = b @ Rk, Rk.T @ a
        Bs.append(b)
        As.append(a)
    Bbar = sum(pk * sk / OUT_S * b for pk, sk, b in zip(p_of(), S, Bs))
    Abar = sum(pk * a for pk, a in zip(p_of(), As))
    return Bbar, Abar, Bs, As


@pytest.mark.parametrize("t,lam", [(0, 0.5), (1, 0.5), (2, 0.5), (3, 1.0), (4, 0.0), (5, 0.25)])
def test_fedrot_lora_equals_dense_restatement(t, lam):
    B, A = clients([4] * 4, seed=10 + t)
    Bg, Ag = clients([4], seed=99)
    res = agg(B, A, "fedrot_lora", method_options={"round": t, "reference": (Bg[0], Ag[0]), "lam": lam})
    Bbar, Abar, Bs, As = dense_fedrot(B, A, Bg[0], Ag[0], t, lam)
    assert rel(res.B, Bbar) < 1e-4 and rel(res.A, Abar) < 1e-4
    assert rel(prod(res), OUT_S * Bbar @ Abar) < 1e-4
    for b, a, bs, as_ in zip(B, A, Bs, As):  # the rotation leaves each client's product unchanged
        assert rel(bs @ as_, b.double() @ a.double()) < 1e-12
    for Rk in res.info["rotations"]:
        assert torch.allclose(Rk.T @ Rk, torch.eye(4, dtype=torch.float64), atol=1e-12)
    assert len(res.info["rotations"]) == (4 if t >= 1 else 0)


def test_fedrot_lora_full_rotation_undoes_client_basis_drift():
    """Clients hold the reference adapter in rotated bases: lam=1 A-alignment recovers it, FedIT
    (plain averaging) does not."""
    g = torch.Generator().manual_seed(3)
    Bg, Ag = torch.randn(M, 4, generator=g), torch.randn(4, N, generator=g)
    Qs = [torch.linalg.qr(torch.randn(4, 4, generator=g)).Q for _ in range(3)]
    B = [Bg @ Q for Q in Qs]
    A = [Q.T @ Ag for Q in Qs]
    ref = Bg.double() @ Ag.double()
    rot = fm.aggregate_lora(B, A, method="fedrot_lora", method_options={"round": 1, "reference": (Bg, Ag), "lam": 1.0})
    plain = fm.aggregate_lora(B, A, method="fedit")
    assert rel(rot.B.double() @ rot.A.double(), ref) < 1e-5
    assert rel(plain.B.double() @ plain.A.double(), ref) > 0.1


def test_fedrot_lora_round0_is_fedit_and_reference_by_layer_name():
    B, A = clients([4] * 4)
    r0 = agg(B, A, "fedrot_lora", method_options={"round": 0})
    fi = agg(B, A, "fedit")
    assert torch.allclose(r0.B, fi.B) and torch.allclose(r0.A, fi.A)
    Bg, Ag = clients([4], seed=7)
    by_name = agg(B, A, "fedrot_lora", name="q_proj",
                  method_options={"round": 2, "reference": {"q_proj": (Bg[0], Ag[0])}})
    direct = agg(B, A, "fedrot_lora", method_options={"round": 2, "reference": (Bg[0], Ag[0])})
    assert torch.equal(by_name.B, direct.B) and torch.equal(by_name.A, direct.A)


def test_fedrot_lora_errors():
    B, A = clients([4] * 4)
    with pytest.raises(ValueError, match="'fedrot_lora' needs the option 'reference'.*from round 1 on"):
        agg(B, A, "fedrot_lora", method_options={"round": 1})
    Bg, Ag = clients([3], seed=7)
    with pytest.raises(ValueError, match=r"reference adapter must be B_prev 48 x 4 and A_prev 4 x 36"):
        agg(B, A, "fedrot_lora", method_options={"round": 1, "reference": (Bg[0], Ag[0])})
    with pytest.raises(ValueError, match="option 'lam': must be a number in"):
        agg(B, A, "fedrot_lora", method_options={"round": 1, "reference": (Bg[0], Ag[0]), "lam": 2})
    with pytest.raises(TypeError, match="option 'reference': must be the previous global adapter"):
        agg(B, A, "fedrot_lora", method_options={"round": 1, "reference": Bg[0]})
    with pytest.raises(ValueError, match="the reference dict has no entry for layer 'v_proj'"):
        agg(B, A, "fedrot_lora", name="v_proj",
            method_options={"round": 1, "reference": {"q_proj": (Bg[0], Ag[0])}})
    B3, A3 = clients([4, 3, 4, 4])
    with pytest.raises(ValueError, match="fedrot_lora needs one rank for all clients"):
        agg(B3, A3, "fedrot_lora", method_options={"round": 0})


# ---- ILoRA ------------------------------------------------------------------------------------

@pytest.mark.parametrize("rank", [3, 5, 9])
def test_ilora_equals_dense_qr_of_delta(rank):
    B, A = clients()
    res = agg(B, A, "ilora", rank=rank)
    Q, R = torch.linalg.qr(dense_delta(B, A))  # FedLLM-Factory style: QR of the dense ΔW
    assert rel(prod(res), Q[:, :rank] @ R[:rank]) < TOL
    assert torch.allclose(res.B.double().T @ res.B.double(), torch.eye(rank, dtype=torch.float64), atol=1e-5)
    dropped = float((R[rank:] ** 2).sum() / (R ** 2).sum())
    assert abs(res.energy_dropped - dropped) < 1e-5
    assert not res.exact and res.residual is None


def test_ilora_rank_above_stacked_rank_completes_B_orthonormally():
    B, A = clients([1, 2])
    res = fm.aggregate_lora(B, A, method="ilora", rank=6)
    assert rel(res.B.double() @ res.A.double(), dense_delta(B, A, [1, 1], [1, 1])) < TOL
    assert torch.allclose(res.B.double().T @ res.B.double(), torch.eye(6, dtype=torch.float64), atol=1e-5)


def test_ilora_init_matches_dense_qr_and_preserves_the_model():
    g = torch.Generator().manual_seed(4)
    W0 = torch.randn(40, 30, generator=g, dtype=torch.float64)
    B, A, Wn = ilora_init(W0, 4, 2.0)
    Q, R = torch.linalg.qr(W0)
    assert torch.allclose(2.0 * B @ A, Q[:, :4] @ R[:4], atol=1e-10)
    assert torch.allclose(Wn + 2.0 * B @ A, W0, atol=1e-10)
    assert torch.allclose(B.T @ B, torch.eye(4, dtype=torch.float64), atol=1e-12)
    with pytest.raises(ValueError, match=r"rank must be an int in \[1, min\(m, n\) = 30\]"):
        ilora_init(W0, 31)


# ---- options and registry ---------------------------------------------------------------------

def test_unknown_option_names_the_method_and_what_it_accepts():
    B, A = clients([4] * 4)
    with pytest.raises(ValueError, match=r"method 'fedmomentum' does not accept the option\(s\) \['round'\]; it accepts no options"):
        fm.aggregate_lora(B, A, method_options={"round": 1})
    with pytest.raises(ValueError, match=r"'fedrot_lora' does not accept the option\(s\) \['lambda'\]; it accepts 'round'.*'reference'.*'lam'.*default 0.5"):
        fm.aggregate_lora(B, A, method="fedrot_lora", method_options={"round": 1, "lambda": 0.5})
    with pytest.raises(TypeError, match="method_options must be a dict"):
        fm.aggregate_lora(B, A, method="rolora", method_options=[("round", 1)])


def test_traits_and_papers_of_the_new_methods():
    new = ["flexlora", "hetlora", "fedsvd", "rolora", "fedrot_lora", "ilora"]
    for name in new:
        spec = METHODS[name]
        assert "20" in spec.paper and spec.fn.__doc__
    assert {n for n in METHODS if METHODS[n].per_client} == {"flexlora", "hetlora"}
    assert [o.name for o in METHODS["fedrot_lora"].options] == ["round", "reference", "lam"]
    assert METHODS["fedmomentum"].trains_in(None) == frozenset({"A", "B"})


def test_method_options_reach_aggregate_layers_and_options_object():
    B, A = clients([4] * 4, shared="A")
    layers = [(B, A), (B, A)]
    res = fm_core.aggregate_layers(layers, W, names=["a", "b"], scalings=S, out_scaling=OUT_S, method="rolora",
                                   method_options={"round": 3})
    one = agg(B, A, "rolora", method_options={"round": 3})
    assert all(torch.equal(r.B, one.B) for r in res)
    opts = fm_core.AggregateOptions(method="rolora", method_options={"round": 3})
    assert opts.method_options["round"] == 3
    again = fm_core.aggregate_layer(B, A, W, scalings=S, out_scaling=OUT_S, options=opts)
    assert torch.equal(again.B, one.B)
    with pytest.raises(ValueError, match="needs the option 'round'"):
        fm_core.AggregateOptions(method="rolora")
