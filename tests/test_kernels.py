"""Kernel package tests that run in the normal (non-interpreter) pytest process.

The Triton kernels themselves are tested under the CPU interpreter by
``tests/kernels_interp_cases.py``, which :func:`test_interpreter_cases` runs in a subprocess
with ``TRITON_INTERPRET=1 FEDMOMENTUM_BACKEND=triton`` set from process start (Triton reads
``TRITON_INTERPRET`` when ``@triton.jit`` functions are defined, its own ``tl.zeros`` & co. at
``import triton``; a subprocess is the only clean way to switch, and it keeps the settings out
of every other test module). GPU tests live in ``tests/test_kernels_gpu.py``.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fedmomentum_kernels as K
from fedmomentum_kernels import _tables

HERE = Path(__file__).resolve().parent
_CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FEDMOMENTUM_BACKEND")}


def test_interpreter_cases(tmp_path):
    """All Triton kernels (and core on them) under TRITON_INTERPRET=1, in a subprocess."""
    pytest.importorskip("triton")
    env = dict(_CLEAN_ENV, TRITON_INTERPRET="1", FEDMOMENTUM_BACKEND="triton")
    cmd = [sys.executable, "-m", "pytest", str(HERE / "kernels_interp_cases.py"), "-q", "-p", "no:cacheprovider",
           "-p", "no:randomly", "--rootdir", str(HERE.parent), "-o", "addopts=-ra",
           f"--basetemp={tmp_path / 'bt'}"]
    r = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=1800)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-8000:]
    summary = out.strip().splitlines()[-1]
    m = re.search(r"(\d+) passed", summary)
    assert m and int(m.group(1)) >= 50, summary
    assert "skipped" not in summary and "failed" not in summary and "error" not in summary, summary


def test_import_without_triton(tmp_path):
    """``import fedmomentum_kernels`` and the torch path work when triton cannot be imported."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, fedmomentum_kernels as K\n"
            "assert not K.triton_available()\n"
            "assert K.select_backend('cpu') == 'torch'\n"
            "o = torch.zeros(3, 4); K.lowrank_accumulate_(o, [torch.ones(3, 2)], [torch.ones(2, 4)], [0.5])\n"
            "assert float(o.sum()) == 12.0\n"
            "g = K.stacked_gram([torch.ones(3, 2)], [2.0], 'left'); assert float(g[0, 0]) == 12.0\n"
            "assert 'fedmomentum_kernels._triton_dispatch' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_CLEAN_ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def test_this_process_is_not_in_interpreter_mode():
    """Nothing in this test session switched the interpreter on for everyone else."""
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
    assert K.select_backend("cpu") == "torch" or os.environ.get("FEDMOMENTUM_BACKEND") == "torch"


def test_chunk_and_pair_tables():
    dev = torch.device("cpu")
    ch = _tables.chunk_table([3, 0, 40, 16], 16, dev)
    # (client, first column, width, stacked offset); the t = 0 client has no chunk
    assert ch.tolist() == [[0, 0, 3, 0], [2, 0, 16, 3], [2, 16, 16, 19], [2, 32, 8, 35], [3, 0, 16, 43]]
    pr = _tables.pair_table(3, dev).tolist()
    assert pr == [[0, 0], [0, 1], [0, 2], [1, 1], [1, 2], [2, 2]]
    assert _tables.client_offsets([3, 0, 40], dev).tolist() == [0, 3, 3]
    assert _tables.pair_table(0, dev).shape == (0, 2)


def test_tall_table_strides():
    dev = torch.device("cpu")
    left = torch.zeros(5, 3)
    right = torch.zeros(20, 7).T  # 7 x 20 view, strides (1, 7)
    tl_ = _tables.tall_table([[left]], "left", dev).tolist()
    tr = _tables.tall_table([[right]], "right", dev).tolist()
    assert tl_ == [[left.data_ptr(), 3, 1, 3]]
    # right factors are read transposed (rows = n): row stride is the column stride
    assert tr == [[right.data_ptr(), 7, 1, 7]]


def test_common_dtype_and_errors():
    a, b = torch.zeros(2, 2, dtype=torch.bfloat16), torch.zeros(2, 2)
    xs, dt = _tables.common_dtype([a, b], "left factor")
    assert dt == torch.float32 and all(x.dtype == torch.float32 for x in xs)
    xs, dt = _tables.common_dtype([a, a], "left factor")
    assert dt == torch.bfloat16 and xs[0] is a
    with pytest.raises(TypeError, match="left factor 1"):
        _tables.common_dtype([a, torch.zeros(2, 2, dtype=torch.float64)], "left factor")


def test_row_splits_cover_rows():
    pytest.importorskip("triton")
    from fedmomentum_kernels.gram import _splits  # imports triton (compiled mode: fine, nothing launched)
    for rows in (1, 37, 128, 1000, 28672):
        for programs, block, target in ((1, 32, 8), (55, 128, 528), (4400, 128, 528), (3, 32, 1000)):
            s, per = _splits(rows, programs, block, target)
            assert per % block == 0 and s >= 1
            assert (s - 1) * per < rows <= s * per  # every slice non-empty, all rows covered


def test_backend_override(monkeypatch):
    monkeypatch.setenv("FEDMOMENTUM_BACKEND", "torch")
    assert K.select_backend("cpu") == "torch"
    monkeypatch.setenv("FEDMOMENTUM_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FEDMOMENTUM_BACKEND"):
        K.select_backend("cpu")
    monkeypatch.setenv("FEDMOMENTUM_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if K.triton_available():
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            K.select_backend("cpu")
