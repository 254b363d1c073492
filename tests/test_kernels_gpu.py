"""Compiled Triton kernels on CUDA (bf16, fp16, fp32, big shapes); skipped without a GPU.

Same rule as the interpreter tests: max error against the float64 reference at most 2x the error
of the torch op in the same dtype plus a small atol. fp32 operands use IEEE fp32 in ``tl.dot``
unless ``torch.backends.cuda.matmul.allow_tf32`` is set (it is off by default), so the torch
comparison is like for like.
"""
from __future__ import annotations

import os

import pytest
import torch

import fedmomentum_kernels as K
from fedmomentum_kernels import reference as R

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                                 reason="compiled kernels only")]

DEV = "cuda"


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return (torch.randn(*shape, generator=g, device=DEV, dtype=torch.float32) * scale).to(dtype)


def assert_rule(got, torch_same, ref64, dtype):
    scale = float(ref64.abs().max())
    atol = 4 * torch.finfo(dtype).eps * max(scale, 1e-30)
    err_k = float((got.double() - ref64).abs().max())
    err_t = float((torch_same.double() - ref64).abs().max())
    assert err_k <= 2 * err_t + atol, f"kernel err {err_k:.3e} > 2 x torch err {err_t:.3e} + {atol:.3e}"


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("FEDMOMENTUM_BACKEND", raising=False)
    assert K.select_backend(DEV) == "triton"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m,n,ts", [(1000, 3001, [16] * 10), (4096, 4096, [176]), (777, 513, [3, 17, 64, 1])])
def test_lowrank_accumulate_gpu(dtype, m, n, ts):
    lefts = [_randn(m, t, dtype=dtype, seed=k, scale=0.1) for k, t in enumerate(ts)]
    rights = [_randn(t, n, dtype=dtype, seed=100 + k, scale=0.1) for k, t in enumerate(ts)]
    cs = [0.1 * (k + 1) * (-1) ** k for k in range(len(ts))]
    out = _randn(m, n, dtype=dtype, seed=7)
    ref64 = out.double()
    R.lowrank_accumulate_(ref64, [x.double() for x in lefts], [x.double() for x in rights], cs)
    same = out.clone()
    R.lowrank_accumulate_(same, lefts, rights, cs)
    K.lowrank_accumulate_(out, lefts, rights, cs)
    assert_rule(out, same, ref64, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("side", ["left", "right"])
def test_stacked_kernels_gpu(dtype, side):
    m, n, ts = 8192, 1024, [16, 16, 8, 32, 16]
    fs = [(_randn(m, t, dtype=dtype, seed=k) if side == "left" else _randn(t, n, dtype=dtype, seed=k))
          for k, t in enumerate(ts)]
    cs = [0.5, -1.0, 2.0, 0.3, 1.1]
    f64 = [f.double() for f in fs]
    T, rows = sum(ts), (m if side == "left" else n)
    assert_rule(K.stacked_gram(fs, cs, side), R.stacked_gram(fs, cs, side),
                R.stacked_gram(f64, cs, side, torch.float64), torch.float32)
    mat = _randn(T if side == "left" else rows, 26, seed=9)
    assert_rule(K.stacked_matmul(fs, cs, side, mat), R.stacked_matmul(fs, cs, side, mat),
                R.stacked_matmul(f64, cs, side, mat.double(), torch.float64), torch.float32)
    mat = _randn(rows if side == "left" else T, 26, seed=10)
    assert_rule(K.stacked_matmul_t(fs, cs, side, mat), R.stacked_matmul_t(fs, cs, side, mat),
                R.stacked_matmul_t(f64, cs, side, mat.double(), torch.float64), torch.float32)


def test_batched_gpu_bf16():
    L, m, ts = 8, 4096, [16] * 10
    facs = [[_randn(m, t, dtype=torch.bfloat16, seed=100 * li + k) for k, t in enumerate(ts)] for li in range(L)]
    cs = [[1.0 / (k + 1) for k in range(len(ts))] for _ in range(L)]
    f64 = [[f.double() for f in fs] for fs in facs]
    assert_rule(K.batched_stacked_gram(facs, cs, "left"), R.batched_stacked_gram(facs, cs, "left"),
                R.batched_stacked_gram(f64, cs, "left", torch.float64), torch.float32)
    mats = _randn(L, sum(ts), 160, seed=3)
    assert_rule(K.batched_stacked_matmul(facs, cs, "left", mats), R.batched_stacked_matmul(facs, cs, "left", mats),
                R.batched_stacked_matmul(f64, cs, "left", mats.double(), torch.float64), torch.float32)


def test_core_round_gpu_matches_torch_backend(monkeypatch):
    import fedmomentum
    B = [_randn(2048, 16, dtype=torch.bfloat16, seed=k) for k in range(4)]
    A = [_randn(16, 1024, dtype=torch.bfloat16, seed=10 + k) for k in range(4)]
    res_tr = fedmomentum.aggregate_lora(B, A, [1, 2, 3, 4], rank=16, solver="exact")
    monkeypatch.setenv("FEDMOMENTUM_BACKEND", "torch")
    res_t = fedmomentum.aggregate_lora(B, A, [1, 2, 3, 4], rank=16, solver="exact")
    want = sum(w / 10 * (b.double() @ a.double()) for w, b, a in zip([1, 2, 3, 4], B, A))
    for res in (res_tr, res_t):
        assert float((res.delta() - want).norm() / want.norm()) < 1e-5


def test_device_config_is_the_compiled_one():
    """The config a launch gets on this GPU is the one tests/test_kernels_compile.py compiled for its
    architecture (same tiles, warps, stages; only target_programs follows this card's SM count)."""
    import dataclasses

    from fedmomentum_kernels._tables import GPU_TARGETS, arch_of, config_for
    arch = arch_of(DEV)
    assert arch.warp_size in (32, 64) and arch.shared_bytes > 0 and arch.num_sms > 0
    named = [a for a in GPU_TARGETS if (a.backend, a.arch) == (arch.backend, arch.arch)]
    if not named:
        pytest.skip(f"{arch.label} is not one of the ahead-of-time compile targets")
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        here, compiled = config_for(torch.device(DEV), dt), config_for(named[0], dt)
        assert dataclasses.replace(here, target_programs=0) == dataclasses.replace(compiled, target_programs=0)
