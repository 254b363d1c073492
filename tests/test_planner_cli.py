"""The auto cost model and the demo command."""
from __future__ import annotations

import re
import subprocess
import sys

import fedmomentum
from fedmomentum_core.cost import choose_solver, solver_costs, solver_flops


def test_cost_model_choices():
    assert choose_solver(4096, 4096, 160, 16) == "exact"          # K=10, r=16
    assert choose_solver(8192, 8192, 1600, 16) == "randomized"    # K=100: R³ and R² dominate
    assert choose_solver(8192, 8192, 1600, 16, full_spectrum=True) == "exact"
    assert choose_solver(64, 48, 48, 8) == "dense"                # R >= min(m, n)
    # randomized would be > 4x cheaper here, but exact is only ~4e8 FLOPs: stay exact
    c = solver_costs(256, 512, 240, 4)
    assert c["randomized"] * 4 <= c["exact"] < 2e9
    assert choose_solver(256, 512, 240, 4) == "exact"
    c = solver_costs(4096, 4096, 160, 16)
    assert c["exact"] < c["dense"] / 100  # the factored route never pays for m·n·min(m,n)


def test_auto_reads_the_same_flops_the_profiler_reports():
    """One cost model: ``auto`` decides from :func:`solver_flops`, the profiler's numbers."""
    for shape in [(4096, 4096, 160, 16), (8192, 8192, 1600, 16), (256, 512, 240, 4),
                  (4096, 11008, 320, 16)]:
        c = solver_costs(*shape)
        for s in ("exact", "randomized", "dense"):
            assert c[s] == solver_flops(*shape, s)["total"]
        assert solver_flops(*shape, "auto") == solver_flops(*shape, choose_solver(*shape))


def test_module_cost_is_flops_plus_bytes_read():
    from fedmomentum_core.cost import BYTE_COST, module_cost
    m, n, ranks = 4096, 1024, [16, 8, 8]
    got = module_cost(m, n, ranks, 16, "exact", itemsize=2)
    assert got == solver_flops(m, n, 32, 16, "exact")["total"] + BYTE_COST * (m + n) * 32 * 2
    assert module_cost(m, n, ranks) == got  # r defaults to the largest client rank, auto -> exact


def test_demo_runs_and_reports_small_invariant_error():
    out = subprocess.run([sys.executable, "-m", "fedmomentum", "demo", "--size", "256", "--clients", "4",
                          "--rank", "8"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = {l.split("  ")[0].strip(): l for l in out.stdout.splitlines()}
    exact = next(l for l in out.stdout.splitlines() if l.startswith("fedmomentum solver=exact"))
    inv = float(exact.split()[-2])
    assert inv < 1e-5
    assert "dense + torch.svd_lowrank" in out.stdout and "dense + torch.linalg.svd" in out.stdout
    assert lines


def test_cli_help_and_errors(capsys):
    from fedmomentum.cli import main
    assert main([]) == 2
    assert re.search(r"demo", capsys.readouterr().out)
    assert fedmomentum.__version__
