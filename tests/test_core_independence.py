"""Calls are independent (issue 15): whatever one call did (inference mode, inputs that require
grad, another dtype, a failure half-way), the next call's result is the one a fresh process gets;
aggregation never records autograd history; outputs that overflow the output dtype and weights
whose sum overflows are clear errors."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fedmomentum_core import METHODS, AggregateOptions, SolverTuning, aggregate_layer, aggregate_layers
from method_cases import method_case

HERE = os.path.dirname(os.path.abspath(__file__))


def clients(m, n, ranks, seed, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    B = [(torch.randn(m, r, generator=g) * 0.1 * scale).to(dtype) for r in ranks]
    A = [(torch.randn(r, n, generator=g) / n ** 0.5 * scale).to(dtype) for r in ranks]
    return B, A


def huge_fp16(seed, m=64, n=512, K=3, r=4):
    """fp16 clients with entries up to ±60000 (finite): the balanced B of their sum exceeds 65504."""
    g = torch.Generator().manual_seed(seed)
    B = [((torch.rand(m, r, generator=g) * 2 - 1) * 60000).half() for _ in range(K)]
    A = [((torch.rand(r, n, generator=g) * 2 - 1) * 60000).half() for _ in range(K)]
    return B, A


def _cases():
    """name -> zero-argument call returning a list of AggregationResult (deterministic)."""
    B, A = clients(96, 80, [4, 6, 5], 1)
    Bh, Ah = clients(96, 80, [4, 4, 4], 2, torch.float16)
    Bb, Ab = clients(64, 120, [8, 8], 3, torch.bfloat16)
    Bd, Ad = clients(48, 40, [3, 3, 3], 4, torch.float64)
    w = [1.0, 2.0, 3.0]
    layers = [clients(72, 56, [4, 4, 4], 10 + i) for i in range(3)]
    def one(B=B, A=A, w=w, **kw):
        return lambda: [aggregate_layer(B, A, w, name="case", **kw)]

    return {
        "exact": one(solver="exact"),
        "exact_stacked": one(solver="exact", residual="stacked"),
        "exact_general_path": one(solver="exact", tuning=SolverTuning(fast_core=False, workspace=False)),
        "randomized": one(solver="randomized", rank=4),
        "dense": one(solver="dense"),
        "energy": one(residual_energy=0.99),
        "fedit": one(method="fedit", B=[b[:, :4] for b in B], A=[a[:4] for a in A]),
        "fedex_lora": one(method="fedex_lora", B=[b[:, :4] for b in B], A=[a[:4] for a in A]),
        "flora": one(method="flora"),
        "florist": one(method="florist"),
        "fp16_exact": one(B=Bh, A=Ah, solver="exact"),
        "bf16_fp64_compute": one(B=Bb, A=Ab, w=[1.0, 1.0], compute_dtype=torch.float64),
        "fp64_inputs": one(B=Bd, A=Ad, compute_dtype=torch.float64),
        "batched": lambda: aggregate_layers(layers, w, names=["l0", "l1", "l2"], rank=4),
    }


def _tensors(results) -> dict:
    out = {}
    for i, r in enumerate(results):
        for k in ("B", "A"):
            t = getattr(r, k)
            if t is not None:
                out[f"{i}.{k}"] = t.detach().clone()
        if r.residual is not None:
            out[f"{i}.left"] = r.residual.left.detach().clone()
            out[f"{i}.right"] = r.residual.right.detach().clone()
    return out


def _assert_same(got: dict, ref: dict, what: str):
    assert got.keys() == ref.keys(), what
    for k in ref:
        a, b = got[k], ref[k]
        assert a.dtype == b.dtype and a.shape == b.shape, (what, k)
        if not torch.equal(a, b):
            err = float((a.double() - b.double()).norm() / max(b.double().norm(), 1e-30))
            assert err <= 1e-6, (what, k, err)


def _reference_in_fresh_process(tmp_path) -> dict:
    out = tmp_path / "ref.pt"
    code = ("import sys, torch; sys.path.insert(0, %r); import test_core_independence as t; "
            "torch.save({n: t._tensors(f()) for n, f in t._cases().items()}, %r)" % (HERE, str(out)))
    env = dict(os.environ)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    return torch.load(out)


def _disturb():
    """Calls that change modes, dtypes and fail half-way (each failure is expected)."""
    B, A = clients(96, 80, [4, 6, 5], 1)
    with torch.inference_mode():
        aggregate_layer(B, A, solver="exact")
        aggregate_layers([(B, A), (B, A)], rank=4)
    Bg = [b.clone().requires_grad_(True) for b in B]
    Ag = [a.clone().requires_grad_(True) for a in A]
    for solver in ("exact", "randomized", "dense"):
        aggregate_layer(Bg, Ag, solver=solver, rank=4)
    aggregate_layers([(Bg, Ag)] * 2, rank=4)
    bad = [b.clone() for b in B]
    bad[1][3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        aggregate_layer(bad, A, solver="exact")
    with pytest.raises(ValueError, match="NaN"):
        aggregate_layers([(B, A), (bad, A)], solver="exact")
    with pytest.raises(ValueError, match="exceeds"):
        aggregate_layer(B, A, rank=500)
    Bh, Ah = huge_fp16(5)
    with pytest.raises(ValueError, match="float16"):
        aggregate_layer(Bh, Ah, solver="exact")
    Bs, As = clients(300, 200, [16] * 4, 6)  # another shape grows the scratch buffers
    aggregate_layer(Bs, As, solver="exact", compute_dtype=torch.float64)


def test_every_good_call_equals_a_fresh_process(tmp_path):
    ref = _reference_in_fresh_process(tmp_path)
    cases = _cases()
    for name, call in cases.items():  # once in this (already used) process, then after disturbances
        _assert_same(_tensors(call()), ref[name], name)
    for name, call in cases.items():
        _disturb()
        _assert_same(_tensors(call()), ref[name], f"{name} after disturbances")
        with torch.inference_mode():
            _assert_same(_tensors(call()), ref[name], f"{name} in inference mode")


def test_inference_mode_then_normal_call():
    B, A = clients(96, 80, [4, 6, 5], 7)
    with torch.inference_mode():
        first = aggregate_layer(B, A, solver="exact")
    again = aggregate_layer(B, A, solver="exact")  # failed before: inplace update to inference tensor
    assert torch.equal(first.B, again.B) and torch.equal(first.A, again.A)
    assert not again.B.is_inference()


def test_grad_inputs_then_normal_call():
    B, A = clients(96, 80, [4, 6, 5], 8)
    Bg = [b.clone().requires_grad_(True) for b in B]
    Ag = [a.clone().requires_grad_(True) for a in A]
    first = aggregate_layer(Bg, Ag, solver="exact")
    again = aggregate_layer(B, A, solver="exact")  # failed before: out=... and autograd
    assert torch.equal(first.B, again.B)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("solver", ["exact", "randomized", "dense"])
def test_no_autograd_history(method, solver):
    B, A = clients(64, 48, [4, 4, 4], 9)
    B, A, kw = method_case(method, B, A)
    Bg = [b.clone().requires_grad_(True) for b in B]
    Ag = [a.clone().requires_grad_(True) for a in A]
    if method == "florist" and solver == "randomized":
        pytest.skip("florist needs the full spectrum")
    res = aggregate_layer(Bg, Ag, method=method, solver=solver, rank=4, **kw)
    outs = [res.B, res.A, res.singular_values]
    if res.residual is not None:
        outs += [res.residual.left, res.residual.right]
    for t in outs:
        if t is not None:
            assert not t.requires_grad and t.grad_fn is None, (method, solver)
    batched = aggregate_layers([(Bg, Ag)] * 2, method=method, solver=solver, rank=4, **kw)
    for r in batched:
        assert r.A.grad_fn is None and not r.A.requires_grad


def test_fp16_overflow_after_cast_is_an_error():
    """fp16 clients with large (finite) entries: the rebuilt B, A do not fit in float16."""
    B, A = huge_fp16(11)
    assert all(bool(torch.isfinite(t).all()) for t in (*B, *A))
    with pytest.raises(ValueError, match=r"layer 'q_proj'.*float16.*float32") as ei:
        aggregate_layer(B, A, name="q_proj", solver="exact")
    assert "out_scaling" in str(ei.value)
    with pytest.raises(ValueError, match=r"layer 'q_proj'.*float16"):
        aggregate_layers([(B, A)], names=["q_proj"])
    # the remedy works: the same clients in float32 aggregate fine
    res = aggregate_layer([b.float() for b in B], [a.float() for a in A], name="q_proj")
    assert bool(torch.isfinite(res.B).all())


def test_weight_sum_overflow_is_named():
    B, A = clients(32, 24, [2, 2, 2], 12)
    with pytest.raises(ValueError, match="sum overflows float64.*rescale the weights"):
        aggregate_layer(B, A, [1e308, 1e308, 1e308])


def test_options_object_equals_keywords_and_conflicts_are_refused():
    B, A = clients(96, 80, [4, 6, 5], 13)
    opts = AggregateOptions(solver="exact", rank=4, residual="stacked")
    a = aggregate_layer(B, A, options=opts)
    b = aggregate_layer(B, A, solver="exact", rank=4, residual="stacked")
    assert torch.equal(a.B, b.B) and torch.equal(a.residual.left, b.residual.left)
    with pytest.raises(TypeError, match="either options= or the keywords"):
        aggregate_layer(B, A, options=opts, rank=5)
    with pytest.raises(ValueError, match="layer 'x': unknown solver"):
        aggregate_layer(B, A, solver="nope", name="x")
