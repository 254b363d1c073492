"""Triton kernels under the CPU interpreter (TRITON_INTERPRET=1, FEDMOMENTUM_BACKEND=triton).

Not collected by a plain ``pytest`` run (the file name does not start with ``test_``):
``tests/test_kernels.py::test_interpreter_cases`` runs this file in a subprocess with both
environment variables set. Triton decides interpreter vs compiler when a ``@triton.jit`` function
is *defined*, including its own standard library (``tl.zeros`` …) at ``import triton``, so the
interpreter cannot be switched on inside a process that has already imported Triton, and a
subprocess is also what keeps the settings from leaking into other test modules. To run it by
hand: ``TRITON_INTERPRET=1 FEDMOMENTUM_BACKEND=triton python -m pytest tests/kernels_interp_cases.py``.

Every kernel is compared with the float64 torch reference by DESIGN.md's tolerance rule: its
max error may be at most 2x the max error of the same torch op run in the same dtype, plus a
small atol. Shapes are tiny and odd (37 x 53), K = 1 and K = 3, heterogeneous client ranks
including t < 16 (padded for ``tl.dot``) and t > BLOCK_T (several chunks per client).
"""
from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("FEDMOMENTUM_BACKEND") != "triton":
    pytest.skip("run through tests/test_kernels.py (needs TRITON_INTERPRET=1 FEDMOMENTUM_BACKEND=triton "
                "from process start)", allow_module_level=True)

pytest.importorskip("triton")

import fedmomentum_kernels as K  # noqa: E402
from fedmomentum_kernels import reference as R  # noqa: E402

M, N = 37, 53


@pytest.fixture(scope="module")
def interp():
    """The Triton dispatch module (kernels built for the interpreter)."""
    import importlib
    return importlib.import_module("fedmomentum_kernels._triton_dispatch")


# ----------------------------------------------------------------------------- helpers

def _randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _clients(ts, side, dtype=torch.float32, seed=0, rows=None):
    """Per-client factors of widths ``ts``: left m x t, right t x n."""
    out = []
    for k, t in enumerate(ts):
        if side == "left":
            out.append(_randn(rows or M, t, dtype=dtype, seed=seed + k))
        else:
            out.append(_randn(t, rows or N, dtype=dtype, seed=seed + k))
    return out


def _coeffs(K_):
    return [0.7, -1.3, 2.1, 0.4, -0.9][:K_]


def _boom(*a, **k):
    raise AssertionError("the torch reference ran instead of the Triton kernel")


def assert_rule(got: torch.Tensor, torch_same: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype):
    """DESIGN.md: err(kernel) <= 2 * err(torch, same dtype) + atol, atol = 4 eps(dtype) max|ref|."""
    assert got.shape == ref64.shape, (got.shape, ref64.shape)
    assert torch.isfinite(got).all()
    scale = float(ref64.abs().max()) if ref64.numel() else 0.0
    atol = 4 * torch.finfo(dtype).eps * max(scale, 1e-30)
    err_k = float((got.double() - ref64).abs().max()) if got.numel() else 0.0
    err_t = float((torch_same.double() - ref64).abs().max()) if got.numel() else 0.0
    assert err_k <= 2 * err_t + atol, f"kernel err {err_k:.3e} > 2 x torch err {err_t:.3e} + {atol:.3e}"


TS = {1: [[5], [21]], 3: [[3, 16, 21], [1, 8, 40]]}
CASES = [(k, ts) for k in (1, 3) for ts in TS[k]]


# ----------------------------------------------------------------------------- dispatch / import

def test_interp_uses_triton_path(interp, monkeypatch):
    assert K.select_backend("cpu") == "triton"
    assert K._impl("stacked_gram", torch.device("cpu")).__module__ == "fedmomentum_kernels._triton_dispatch"

    for name in R.__all__:
        monkeypatch.setattr(R, name, _boom)
    B = _clients([3, 16], "left")
    K.stacked_gram(B, [1.0, 2.0], "left")
    K.lowrank_accumulate_(torch.zeros(M, N), B, _clients([3, 16], "right"), [1.0, 1.0])


def test_kernels_use_the_interpreter(interp):
    from triton.runtime.interpreter import InterpretedFunction
    from fedmomentum_kernels import gram, lowrank_accumulate, sketch
    for kern in (lowrank_accumulate._lowrank_accumulate_kernel, gram._stacked_gram_kernel,
                 sketch._stacked_expand_kernel, sketch._stacked_shrink_kernel):
        assert isinstance(kern, InterpretedFunction)


# ----------------------------------------------------------------------------- lowrank_accumulate_

@pytest.mark.parametrize("Kc,ts", CASES)
def test_lowrank_accumulate_fp32(interp, Kc, ts):
    lefts, rights = _clients(ts, "left"), _clients(ts, "right", seed=10)
    cs = _coeffs(Kc)
    out = _randn(M, N, seed=99)
    ref64 = out.double().clone()
    R.lowrank_accumulate_(ref64, [x.double() for x in lefts], [x.double() for x in rights], cs)
    same = out.clone()
    R.lowrank_accumulate_(same, lefts, rights, cs)
    got = out.clone()
    ret = K.lowrank_accumulate_(got, lefts, rights, cs)
    assert ret is got
    assert_rule(got, same, ref64, torch.float32)


@pytest.mark.parametrize("out_dtype,fac_dtype", [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                                                 (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                                 (torch.float16, torch.float32)])
def test_lowrank_accumulate_low_precision(interp, out_dtype, fac_dtype):
    ts = [3, 16, 21]
    lefts = _clients(ts, "left", dtype=fac_dtype)
    rights = _clients(ts, "right", dtype=fac_dtype, seed=10)
    cs = _coeffs(3)
    out = _randn(M, N, seed=99, dtype=out_dtype)
    ref64 = out.double()
    R.lowrank_accumulate_(ref64, [x.double() for x in lefts], [x.double() for x in rights], cs)
    same = out.clone()
    R.lowrank_accumulate_(same, lefts, rights, cs)
    got = out.clone()
    K.lowrank_accumulate_(got, lefts, rights, cs)
    assert got.dtype == out_dtype
    assert_rule(got, same, ref64, out_dtype)


@pytest.mark.parametrize("left_dtype,right_dtype", [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_lowrank_accumulate_lefts_and_rights_differ(interp, left_dtype, right_dtype):
    """Lefts in one dtype, rights in another: the launcher runs both in fp32 (one kernel variant)."""
    ts = [3, 16, 21]
    lefts = _clients(ts, "left", dtype=left_dtype)
    rights = _clients(ts, "right", dtype=right_dtype, seed=10)
    cs = _coeffs(3)
    out = _randn(M, N, seed=99, dtype=torch.bfloat16)
    ref64 = out.double()
    R.lowrank_accumulate_(ref64, [x.double() for x in lefts], [x.double() for x in rights], cs)
    same = out.clone()
    R.lowrank_accumulate_(same, lefts, rights, cs)
    got = out.clone()
    K.lowrank_accumulate_(got, lefts, rights, cs)
    assert_rule(got, same, ref64, torch.bfloat16)


def test_lowrank_accumulate_strides_mixed_and_empty(interp):
    """Non-contiguous out and factors, a mixed-dtype factor list, t = 0 and zero coefficients."""
    base = _randn(N, M, seed=5)
    out = base.T  # 37 x 53 view with strides (1, 37)
    L0 = _randn(7, M, seed=1).T  # m x 7 transposed view
    R0 = _randn(N, 7, seed=2).T
    L1 = _randn(M, 19, seed=3, dtype=torch.bfloat16)
    R1 = _randn(19, N, seed=4)
    L2, R2 = torch.zeros(M, 0), torch.zeros(0, N)
    L3, R3 = _randn(M, 2, seed=6), _randn(2, N, seed=7)
    lefts, rights, cs = [L0, L1, L2, L3], [R0, R1, R2, R3], [1.5, -0.5, 3.0, 0.0]
    ref64 = out.double().clone()
    R.lowrank_accumulate_(ref64, [x.double() for x in lefts], [x.double() for x in rights], cs)
    same = out.clone()
    R.lowrank_accumulate_(same, lefts, rights, cs)
    K.lowrank_accumulate_(out, lefts, rights, cs)
    assert out.data_ptr() == base.data_ptr()
    assert_rule(out, same, ref64, torch.float32)
    # nothing to add: out unchanged, bit for bit
    before = out.clone()
    K.lowrank_accumulate_(out, [L2], [R2], [1.0])
    K.lowrank_accumulate_(out, [], [], [])
    assert torch.equal(out, before)


def test_lowrank_accumulate_fp64_goes_to_reference(interp):
    lefts, rights = _clients([3, 4], "left", dtype=torch.float64), _clients([3, 4], "right", dtype=torch.float64)
    out = torch.zeros(M, N, dtype=torch.float64)
    K.lowrank_accumulate_(out, lefts, rights, [1.0, -2.0])
    want = lefts[0] @ rights[0] - 2.0 * lefts[1] @ rights[1]
    assert torch.allclose(out, want, rtol=1e-12, atol=1e-12)


def test_lowrank_accumulate_bad_input_leaves_out_untouched(interp):
    out = _randn(M, N)
    before = out.clone()
    with pytest.raises(ValueError, match="factor 1"):
        K.lowrank_accumulate_(out, [torch.ones(M, 2), torch.ones(M, 3)], [torch.ones(2, N), torch.ones(2, N)],
                              [1.0, 1.0])
    with pytest.raises(TypeError, match="factor 0"):
        K.lowrank_accumulate_(out, [torch.ones(M, 2, dtype=torch.int32)], [torch.ones(2, N)], [1.0])
    with pytest.raises(ValueError, match="same length"):
        K.lowrank_accumulate_(out, [torch.ones(M, 2)], [torch.ones(2, N)], [1.0, 2.0])
    assert torch.equal(out, before)


# ----------------------------------------------------------------------------- stacked Gram

@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("Kc,ts", CASES)
def test_stacked_gram(interp, side, Kc, ts):
    fs, cs = _clients(ts, side), _coeffs(Kc)
    ref64 = R.stacked_gram([f.double() for f in fs], cs, side, torch.float64)
    same = R.stacked_gram(fs, cs, side)
    got = K.stacked_gram(fs, cs, side)
    assert got.dtype == torch.float32
    assert_rule(got, same, ref64, torch.float32)
    # symmetric blocks are computed once and stored twice: off-diagonal client blocks match exactly
    offs = [0]
    for t in ts:
        offs.append(offs[-1] + t)
    for a in range(Kc):
        for b in range(a + 1, Kc):
            blk = got[offs[a]:offs[a + 1], offs[b]:offs[b + 1]]
            assert torch.equal(blk, got[offs[b]:offs[b + 1], offs[a]:offs[a + 1]].T)


@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("side", ["left", "right"])
def test_stacked_gram_split_reduction(interp, side, splits):
    from fedmomentum_kernels.gram import launch_stacked_gram
    ts = [3, 16, 21]
    fs, cs = _clients(ts, side), _coeffs(3)
    got = launch_stacked_gram([fs], [cs], side, splits=splits)[0]
    assert_rule(got, R.stacked_gram(fs, cs, side), R.stacked_gram([f.double() for f in fs], cs, side,
                                                                    torch.float64), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stacked_gram_low_precision_factors(interp, dtype):
    ts = [3, 16, 21]
    fs, cs = _clients(ts, "left", dtype=dtype), _coeffs(3)
    ref64 = R.stacked_gram([f.double() for f in fs], cs, "left", torch.float64)
    assert_rule(K.stacked_gram(fs, cs, "left"), R.stacked_gram(fs, cs, "left"), ref64, torch.float32)


# ----------------------------------------------------------------------------- stacked products

@pytest.mark.parametrize("ncols", [7, 19])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("Kc,ts", CASES)
def test_stacked_matmul_and_t(interp, side, Kc, ts, ncols):
    fs, cs = _clients(ts, side), _coeffs(Kc)
    T = sum(ts)
    rows = M if side == "left" else N
    f64 = [f.double() for f in fs]
    # X_cat @ mat
    mat = _randn(T if side == "left" else rows, ncols, seed=50)
    got = K.stacked_matmul(fs, cs, side, mat)
    assert_rule(got, R.stacked_matmul(fs, cs, side, mat),
                R.stacked_matmul(f64, cs, side, mat.double(), torch.float64), torch.float32)
    # X_catᵀ @ mat
    mat = _randn(rows if side == "left" else T, ncols, seed=51)
    got = K.stacked_matmul_t(fs, cs, side, mat)
    assert_rule(got, R.stacked_matmul_t(fs, cs, side, mat),
                R.stacked_matmul_t(f64, cs, side, mat.double(), torch.float64), torch.float32)


@pytest.mark.parametrize("side", ["left", "right"])
def test_shrink_split_reduction_and_strided_mat(interp, side):
    from fedmomentum_kernels.sketch import launch_stacked_shrink
    ts = [3, 16, 21]
    fs, cs = _clients(ts, side), _coeffs(3)
    rows = M if side == "left" else N
    mat = _randn(19, rows, seed=8).T  # rows x 19, non-contiguous
    got = launch_stacked_shrink([fs], [cs], side, mat[None], splits=3)[0]
    # shrink is X_catᵀ @ mat on the left, X_cat @ mat on the right
    op = R.stacked_matmul_t if side == "left" else R.stacked_matmul
    assert_rule(got, op(fs, cs, side, mat), op([f.double() for f in fs], cs, side, mat.double(), torch.float64),
                torch.float32)


def test_stacked_products_bf16_factors(interp):
    ts = [3, 16, 21]
    for side in ("left", "right"):
        fs, cs = _clients(ts, side, dtype=torch.bfloat16), _coeffs(3)
        f64 = [f.double() for f in fs]
        T, rows = sum(ts), (M if side == "left" else N)
        mat = _randn(T if side == "left" else rows, 9, seed=3)
        assert_rule(K.stacked_matmul(fs, cs, side, mat), R.stacked_matmul(fs, cs, side, mat),
                    R.stacked_matmul(f64, cs, side, mat.double(), torch.float64), torch.float32)


def test_stacked_dtype_argument(interp):
    fs, cs = _clients([3, 16], "left"), [1.0, -1.0]
    assert K.stacked_gram(fs, cs, "left", torch.float16).dtype == torch.float16
    g64 = K.stacked_gram(fs, cs, "left", torch.float64)  # fp64 is served by the reference
    assert g64.dtype == torch.float64
    assert torch.allclose(g64, R.stacked_gram(fs, cs, "left", torch.float64), rtol=0, atol=0)


# ----------------------------------------------------------------------------- batched by shape

@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_entries(interp, side):
    ts, L = [3, 16, 21], 3
    facs = [_clients(ts, side, seed=20 * li) for li in range(L)]
    cs = [[0.5 + li, -1.0, 0.25 * li] for li in range(L)]
    f64 = [[f.double() for f in fs] for fs in facs]
    T, rows = sum(ts), (M if side == "left" else N)
    got = K.batched_stacked_gram(facs, cs, side)
    assert got.shape == (L, T, T)
    assert_rule(got, R.batched_stacked_gram(facs, cs, side),
                R.batched_stacked_gram(f64, cs, side, torch.float64), torch.float32)
    mats = _randn(L, T if side == "left" else rows, 11, seed=4)
    assert_rule(K.batched_stacked_matmul(facs, cs, side, mats), R.batched_stacked_matmul(facs, cs, side, mats),
                R.batched_stacked_matmul(f64, cs, side, mats.double(), torch.float64), torch.float32)
    mats = _randn(L, rows if side == "left" else T, 11, seed=5)
    assert_rule(K.batched_stacked_matmul_t(facs, cs, side, mats),
                R.batched_stacked_matmul_t(facs, cs, side, mats),
                R.batched_stacked_matmul_t(f64, cs, side, mats.double(), torch.float64), torch.float32)


def test_batched_bad_input(interp):
    facs = [_clients([3, 16], "left", seed=0), _clients([3, 17], "left", seed=5)]
    with pytest.raises(ValueError, match="layer 1"):
        K.batched_stacked_gram(facs, [[1.0, 1.0]] * 2, "left")
    facs = [_clients([3, 16], "left"), [torch.ones(M + 1, 3), torch.ones(M + 1, 16)]]
    with pytest.raises(ValueError, match="layer 1, client 0"):
        K.batched_stacked_gram(facs, [[1.0, 1.0]] * 2, "left")
    facs = [_clients([3, 16], "left")]
    with pytest.raises(ValueError, match="side"):
        K.batched_stacked_gram(facs, [[1.0, 1.0]], "middle")
    with pytest.raises(ValueError, match="mats"):
        K.batched_stacked_matmul(facs, [[1.0, 1.0]], "left", torch.ones(1, 20, 4))
    with pytest.raises(ValueError, match="mat must be a 2-D"):
        K.stacked_matmul(facs[0], [1.0, 1.0], "left", torch.ones(19))
    with pytest.raises(ValueError, match="coefficients"):
        K.stacked_gram(facs[0], [1.0], "left")


# ----------------------------------------------------------------------------- core on the kernels

def _core_pair(B, A, **kw):
    import fedmomentum
    return fedmomentum.aggregate_lora(B, A, [1.0, 2.0, 3.0], rank=4, scalings=2.0, **kw)


@pytest.mark.parametrize("solver", ["exact", "randomized", "dense"])
def test_core_aggregate_lora_same_on_triton(interp, monkeypatch, solver):
    """fedmomentum.aggregate_lora on a 37 x 53, K = 3 layer: Triton backend == torch backend."""
    B = _clients([4, 6, 8], "left", seed=70)
    A = _clients([4, 6, 8], "right", seed=80)
    with monkeypatch.context() as mp:  # the Triton run must not fall back to the torch reference
        for name in R.__all__:
            mp.setattr(R, name, _boom)
        res_tr = _core_pair(B, A, solver=solver)
    monkeypatch.setenv("FEDMOMENTUM_BACKEND", "torch")
    res_t = _core_pair(B, A, solver=solver)
    want = sum(w / 6.0 * 2.0 * (b.double() @ a.double()) for w, b, a in zip([1.0, 2.0, 3.0], B, A))
    tol = 2e-5 * float(want.abs().max())
    for res in (res_tr, res_t):
        assert (res.delta() - want).abs().max() <= tol
    top_tr = res_tr.out_scaling * (res_tr.B.double() @ res_tr.A.double())
    top_t = res_t.out_scaling * (res_t.B.double() @ res_t.A.double())
    assert (top_tr - top_t).abs().max() <= tol
    assert torch.allclose(res_tr.singular_values, res_t.singular_values, rtol=1e-4, atol=tol)


def test_core_batched_layers_and_merge_on_triton(interp, monkeypatch):
    """aggregate_layers (batched exact solver on the batched kernels) and merge_residual_."""
    import fedmomentum
    from fedmomentum_core.methods import aggregate_layers
    layers = [(_clients([4, 6, 8], "left", seed=90 + i), _clients([4, 6, 8], "right", seed=95 + i)) for i in range(3)]
    W = _randn(M, N, seed=3)
    W_tr = W.clone()
    with monkeypatch.context() as mp:  # the Triton run must not fall back to the torch reference
        for name in R.__all__:
            mp.setattr(R, name, _boom)
        res_tr = aggregate_layers(layers, [1.0, 2.0, 3.0], rank=4, solver="exact")
        fedmomentum.merge_residual_(W_tr, res_tr[0].residual)
    assert all(r.info.get("batched") == 3 for r in res_tr)
    monkeypatch.setenv("FEDMOMENTUM_BACKEND", "torch")
    res_t = aggregate_layers(layers, [1.0, 2.0, 3.0], rank=4, solver="exact")
    W_t = W.clone()
    fedmomentum.merge_residual_(W_t, res_t[0].residual)
    for (B, A), a, b in zip(layers, res_tr, res_t):
        want = sum(w / 6.0 * (x.double() @ y.double()) for w, x, y in zip([1.0, 2.0, 3.0], B, A))
        tol = 2e-5 * float(want.abs().max())
        assert (a.delta() - want).abs().max() <= tol
        assert (a.delta() - b.delta()).abs().max() <= tol
    assert (W_tr.double() - W_t.double()).abs().max() <= 2e-5 * float(W_t.abs().max())
