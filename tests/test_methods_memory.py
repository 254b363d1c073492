"""Issue 17's factored baselines on a 2^16 x 2^16 layer (K = 4, r = 8): a dense ΔW would be
16 GiB in fp32; every method must aggregate with a peak-memory growth of a few hundred MB at most."""
from __future__ import annotations

import pytest
import torch

import fedmomentum as fm
from fedmomentum_core.memory import PeakMemory

from method_cases import method_case

SIDE = 2 ** 16
K, R = 4, 8
LIMIT = 400 * 2 ** 20  # one m x n fp32 matrix is 16 GiB


@pytest.fixture(scope="module")
def wide_clients():
    g = torch.Generator().manual_seed(0)
    B = [torch.randn(SIDE, R, generator=g) * 0.01 for _ in range(K)]
    A = [torch.randn(R, SIDE, generator=g) / 256 for _ in range(K)]
    return B, A


@pytest.mark.parametrize("method", ["flexlora", "hetlora", "fedsvd", "rolora", "fedrot_lora", "ilora"])
def test_wide_layer_never_densified(method, wide_clients):
    B, A, kw = method_case(method, *wide_clients)
    if method in ("flexlora", "hetlora"):
        kw = {"method_options": {"client_ranks": [2, 4, 8, 8]}}
    with PeakMemory() as pm:
        res = fm.aggregate_lora(B, A, [1, 2, 3, 4], method=method, solver="exact", **kw)
    assert res.B.shape == (SIDE, R) and res.A.shape == (R, SIDE)
    assert pm.delta_bytes < LIMIT, (method, pm.delta_bytes / 2 ** 20)
    # spot check s·B·A on 64 entries against the method's product on those rows/columns only
    g = torch.Generator().manual_seed(1)
    rows, cols = torch.randint(0, SIDE, (64,), generator=g), torch.randint(0, SIDE, (64,), generator=g)
    got = res.B[rows].double() @ res.A[:, cols].double()
    assert bool(torch.isfinite(got).all())
    if METHOD_EXACT.get(method):
        p = [w / 10 for w in (1, 2, 3, 4)]
        ref = sum(pk * b[rows].double() @ a[:, cols].double() for pk, b, a in zip(p, B, A))
        assert float((got - ref).norm() / ref.norm()) < 1e-4


METHOD_EXACT = {"fedsvd": True, "rolora": True}
