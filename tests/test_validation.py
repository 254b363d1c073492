"""Every bad input raises a clear error naming the client and expected vs given."""
from __future__ import annotations

import pytest
import torch

import fedmomentum as fm
from conftest import make_clients


def good(K=3, m=20, n=16, r=4):
    return make_clients(m, n, [r] * K, seed=0)


CASES = [
    ("K=0", lambda: fm.aggregate_lora([], []), ValueError, "K = 0"),
    ("len mismatch", lambda: fm.aggregate_lora(good()[0], good()[1][:2]), ValueError, "len\\(A\\) = 2"),
    ("single tensor", lambda: fm.aggregate_lora(good()[0][0], good()[1]), TypeError, "sequence of K tensors"),
    ("non 2-D", lambda: fm.aggregate_lora([good()[0][0][None]] + good()[0][1:], good()[1]), ValueError,
     "client 0: B must be 2-D"),
    ("m differs", lambda: fm.aggregate_lora([good()[0][0], torch.randn(21, 4), good()[0][2]], good()[1]),
     ValueError, "client 1: B has 21 rows, expected m = 20"),
    ("n differs", lambda: fm.aggregate_lora(good()[0], [good()[1][0], good()[1][1], torch.randn(4, 17)]),
     ValueError, "client 2: A has 17 columns, expected n = 16"),
    ("rank mismatch", lambda: fm.aggregate_lora([good()[0][0], torch.randn(20, 5), good()[0][2]], good()[1]),
     ValueError, "client 1: B has 5 columns but A has 4 rows"),
    ("rank < 1", lambda: fm.aggregate_lora(*good(), rank=0), ValueError, "rank must be >= 1"),
    ("zero-rank client", lambda: fm.aggregate_lora([torch.randn(20, 0)], [torch.randn(0, 16)]), ValueError,
     "client 0: LoRA rank is 0"),
    ("negative weight", lambda: fm.aggregate_lora(*good(), [1, -1, 1]), ValueError, "weights\\[1\\] \\(client 1\\) is -1"),
    ("nan weight", lambda: fm.aggregate_lora(*good(), [1, float("nan"), 1]), ValueError, "client 1"),
    ("zero weights", lambda: fm.aggregate_lora(*good(), [0, 0, 0]), ValueError, "all weights are zero"),
    ("weights count", lambda: fm.aggregate_lora(*good(), [1, 2]), ValueError, "expected 3 weights"),
    ("scalings count", lambda: fm.aggregate_lora(*good(), scalings=[1, 2]), ValueError, "expected 3 scalings"),
    ("nan factor", lambda: fm.aggregate_lora(good()[0][:2] + [torch.full((20, 4), float("nan"))], good()[1]),
     ValueError, "client 2: B .* NaN/Inf"),
    ("inf factor", lambda: fm.aggregate_lora(good()[0], [good()[1][0], good()[1][1].clone().fill_(float("inf")),
                                                          good()[1][2]]), ValueError, "client 1: A .* NaN/Inf"),
    ("int dtype", lambda: fm.aggregate_lora([torch.ones(20, 4, dtype=torch.int64)], [torch.ones(4, 16)]),
     TypeError, "client 0: B has dtype torch.int64"),
    ("mixed dtype", lambda: fm.aggregate_lora([good()[0][0], good()[0][1].double(), good()[0][2]], good()[1]),
     TypeError, "client 1: B has dtype torch.float64, expected torch.float32"),
    ("device", lambda: fm.aggregate_lora([good()[0][0], good()[0][1].to("meta"), good()[0][2]], good()[1]),
     ValueError, "client 1: B is on meta"),
    ("unknown method", lambda: fm.aggregate_lora(*good(), method="fedavg"), ValueError, "unknown method"),
    ("unknown solver", lambda: fm.aggregate_lora(*good(), solver="qr"), ValueError, "unknown solver"),
    ("rank too big", lambda: fm.aggregate_lora(*good(), rank=17), ValueError, "exceeds min\\(m, n\\) = 16"),
    ("bad compute dtype", lambda: fm.aggregate_lora(*good(), compute_dtype=torch.float16), TypeError, "compute_dtype"),
    ("bad split", lambda: fm.aggregate_lora(*good(), split="right"), ValueError, "split"),
    ("bad residual", lambda: fm.aggregate_lora(*good(), residual="dense"), ValueError, "residual"),
]


@pytest.mark.parametrize("label,call,exc,pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input(label, call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_layer_name_in_errors():
    B, A = good()
    with pytest.raises(ValueError, match="layer 'model.layers.3.q_proj': client 1"):
        fm.aggregate_lora(B, [A[0], torch.randn(4, 9), A[2]], name="model.layers.3.q_proj")


def test_weights_normalised_and_tensor_weights_accepted():
    B, A = good()
    r1 = fm.aggregate_lora(B, A, [1, 2, 3])
    r2 = fm.aggregate_lora(B, A, torch.tensor([10.0, 20.0, 30.0]))
    assert torch.allclose(r1.B.double() @ r1.A.double(), r2.B.double() @ r2.A.double(), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_matches_entrywise_check(dtype):
    """The sum fast path must agree with isfinite().all(), including finite tensors whose sum
    overflows (the fallback) and single NaN/Inf entries anywhere."""
    from fedmomentum_core.validate import all_finite
    big = torch.finfo(dtype).max
    t = torch.full((64, 33), big, dtype=dtype)       # finite, but its sum overflows any float acc
    assert bool(torch.isfinite(t).all()) and all_finite(t)
    t = torch.randn(64, 33).to(dtype)
    assert all_finite(t)
    for bad in (float("nan"), float("inf"), float("-inf")):
        for pos in ((0, 0), (63, 32), (17, 5)):
            u = t.clone()
            u[pos] = bad
            assert not all_finite(u)
    u = t.clone()
    u[0, 0], u[1, 1] = float("inf"), float("-inf")  # Inf + -Inf = NaN: still caught
    assert not all_finite(u)
