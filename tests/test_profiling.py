"""The profiler: cost formulas checked by counting, peak memory, budgets, the profile JSON and CLI."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fedmomentum_core.methods import aggregate_layer
from fedmomentum_core.profiling import (PeakMemory, baseline_bytes, baseline_flops, client_weights,
                                        module_memory_bytes, parse_memory, plan_chunks, profile_round,
                                        solver_bytes, solver_flops, synthetic_module)
from fedmomentum_core.shapes import model_shapes

TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2}


def _counted(fn) -> int:
    """Matmul FLOPs torch actually ran (FlopCounterMode counts GEMMs, not LAPACK factorisations)."""
    fc = FlopCounterMode(display=False)
    with fc:
        fn()
    return fc.get_total_flops()


def _slopes(solver, K, r, residual, rank):
    """Counted GEMM FLOPs at (m, n), (m+100, n), (m, n+100): their differences isolate the terms
    that scale with m and with n (the big GEMMs), whatever the R x R work costs."""
    out = {}
    for m, n in ((200, 150), (300, 150), (200, 250)):
        B, A, w = synthetic_module(m, n, K, r, dtype=torch.float32, seed=1)
        out[(m, n)] = _counted(lambda: aggregate_layer(B, A, w, rank=rank, solver=solver,
                                                       residual=residual))
    return out


@pytest.mark.parametrize("K, r", [(3, 4), (5, 16)])  # R = 12: one Gram GEMM; R = 80: symmetric halves
@pytest.mark.parametrize("residual", ["factored", "none"])
def test_exact_flops_by_counting(residual, K, r):
    rank = 4
    R = K * r
    got = _slopes("exact", K, r, residual, rank)
    tail = residual == "factored"

    def gemm(m, n):
        f = solver_flops(m, n, R, rank, "exact", need_tail=tail)
        return f["gram"] + f["form_uv"]

    for (m, n) in ((300, 150), (200, 250)):
        assert got[(m, n)] - got[(200, 150)] == pytest.approx(gemm(m, n) - gemm(200, 150), rel=1e-12)
    # and the formula's Gram term alone, counted on the Grams of the stacked factors as the solver
    # forms them (and equal to the plain GEMMs below the symmetric split's threshold)
    from fedmomentum_core.cost import SYMMETRIC_GRAM_MIN_R
    from fedmomentum_core.linalg import gram_into
    _gram_into = (lambda x, out: gram_into(x, out, SYMMETRIC_GRAM_MIN_R))
    B, A, _ = synthetic_module(200, 150, K, r, dtype=torch.float32)
    Bc, Ac = torch.cat(B, 1), torch.cat(A, 0)
    GB, GA = torch.empty(R, R), torch.empty(R, R)
    f = solver_flops(200, 150, R, rank, "exact")["gram"]
    assert _counted(lambda: (_gram_into(Bc, GB), _gram_into(Ac.T, GA))) == f
    assert torch.allclose(GB, Bc.T @ Bc, rtol=1e-5, atol=1e-5) and torch.allclose(GA, Ac @ Ac.T, rtol=1e-5, atol=1e-5)
    plain = _counted(lambda: (Bc.T @ Bc, Ac @ Ac.T))
    assert plain == f if R < SYMMETRIC_GRAM_MIN_R else f == pytest.approx(0.75 * plain)


def test_randomized_flops_by_counting():
    K, r, rank = 4, 8, 8  # R = 32 > ℓ = 18: the Hutchinson probes run too
    R = K * r
    got = _slopes("randomized", K, r, "factored", rank)

    def gemm(m, n):
        f = solver_flops(m, n, R, rank, "randomized")
        return f["products"] + f["rotate"]

    for (m, n) in ((300, 150), (200, 250)):
        assert got[(m, n)] - got[(200, 150)] == pytest.approx(gemm(m, n) - gemm(200, 150), rel=1e-12)


def test_dense_lowrank_flops_by_counting():
    m, n, q = 200, 150, 14
    dW = torch.randn(m, n)
    counted = _counted(lambda: torch.svd_lowrank(dW, q=q, niter=2))
    f = baseline_flops(m, n, 12, 4, "dense_lowrank")
    assert counted == f["products"] + f["rotate"]
    B, A, w = synthetic_module(m, n, 3, 4, dtype=torch.float32)
    assert _counted(lambda: sum(b @ a for b, a in zip(B, A))) == f["form"]
    assert baseline_flops(m, n, 12, 4, "dense_full")["form"] == f["form"]
    assert solver_flops(m, n, 12, 4, "dense")["total"] == baseline_flops(m, n, 12, 4, "dense_full")["total"]


@pytest.mark.parametrize("solver", ["exact", "randomized"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bytes_by_counting(solver, dtype):
    m, n, K, r = 120, 90, 3, 5
    B, A, w = synthetic_module(m, n, K, r, dtype=dtype, seed=3)
    res = aggregate_layer(B, A, w, rank=r, solver=solver)
    read = sum(t.numel() * t.element_size() for t in B + A)
    written = (res.B.numel() * res.B.element_size() + res.A.numel() * res.A.element_size()
               + res.residual.nbytes)
    model = solver_bytes(m, n, [r] * K, r, solver, itemsize=torch.empty(0, dtype=dtype).element_size())
    assert (model["read"], model["written"]) == (read, written)
    assert model["total"] == read + written


def test_baseline_bytes_and_memory_estimates_grow_with_mn():
    a = baseline_bytes(1000, 1000, [8] * 4, 8, "dense_lowrank")
    b = baseline_bytes(2000, 1000, [8] * 4, 8, "dense_lowrank")
    assert b["written"] - a["written"] == 4 * 1000 * 1000 + 1000 * 8 * 2
    assert baseline_bytes(1000, 1000, [8] * 4, 8, "dense_full")["read"] < a["read"]
    assert module_memory_bytes(8192, 8192, [16] * 10, 16, "exact") < \
        module_memory_bytes(8192, 8192, [16] * 10, 16, "dense")
    with pytest.raises(ValueError, match="baseline"):
        baseline_flops(10, 10, 2, 1, "svd")


def test_peak_memory_sees_an_allocation():
    size = 192 * 2 ** 20
    with PeakMemory("cpu") as pm:
        x = torch.ones(size // 4, dtype=torch.float32)  # touched pages: resident
        del x
    # RSS can shrink a little elsewhere meanwhile (pages returned); the allocation dominates
    assert 0.97 * size <= pm.delta_bytes <= size + 64 * 2 ** 20


def test_parse_memory():
    assert parse_memory("2GB") == 2 * 10 ** 9
    assert parse_memory("1.5GiB") == int(1.5 * 2 ** 30)
    assert parse_memory("512 MB") == 512 * 10 ** 6
    assert parse_memory(1024) == 1024 and parse_memory(None) is None
    for bad in ("two gigs", "-1GB", "0"):
        with pytest.raises(ValueError):
            parse_memory(bad)
    with pytest.raises(TypeError):
        parse_memory([1])


def test_plan_chunks():
    sizes = [30, 50, 20, 60, 10]
    chunks = plan_chunks(sizes, lambda x: x, 80)
    assert chunks == [[30, 50], [20, 60], [10]]
    assert all(sum(c) <= 80 for c in chunks)
    assert plan_chunks(sizes, lambda x: x, None, max_items=2) == [[30, 50], [20, 60], [10]]
    with pytest.raises(ValueError, match="item-60 alone needs"):
        plan_chunks(sizes, lambda x: x, 55, label=lambda x: f"item-{x}")


def test_synthetic_rounds_are_seeded_per_module():
    B1, A1, w1 = synthetic_module(40, 30, 3, 4, seed=5, index=7)
    B2, A2, w2 = synthetic_module(40, 30, 3, 4, seed=5, index=7)
    B3, _, _ = synthetic_module(40, 30, 3, 4, seed=5, index=8)
    assert all(torch.equal(a, b) for a, b in zip(B1 + A1, B2 + A2)) and w1 == w2 == client_weights(3, 5)
    assert not torch.equal(B1[0], B3[0])
    assert B1[0].dtype == torch.bfloat16 and B1[0].shape == (40, 4) and A1[0].shape == (4, 30)


def test_profile_matches_the_reference_and_batching():
    """Energy kept per module equals the fp64 dense SVD of the same synthetic round, batched or not."""
    rb = profile_round(TINY, 3, 4, layers=2, progress=False, seed=2)
    ru = profile_round(TINY, 3, 4, layers=2, progress=False, seed=2, batched=False)
    shapes = model_shapes(TINY)
    for i, t in enumerate(shapes.modules(2)):
        B, A, w = synthetic_module(t.m, t.n, 3, 4, seed=2, index=i)
        p = torch.tensor(w, dtype=torch.float64) / sum(w)
        dW = sum(pk * b.double() @ a.double() for pk, b, a in zip(p, B, A))
        s = torch.linalg.svdvals(dW)
        want = float((s[:4] ** 2).sum() / (s ** 2).sum())
        assert rb["modules"][i]["name"] == t.name
        assert rb["modules"][i]["energy_kept"] == pytest.approx(want, rel=1e-4)
        assert ru["modules"][i]["energy_kept"] == pytest.approx(want, rel=1e-4)
    assert {m["batch_size"] for m in ru["modules"]} == {1}
    assert max(m["batch_size"] for m in rb["modules"]) == 2  # q/o and gate/up share a shape here
    assert rb["round_seconds_extrapolated"] == pytest.approx(rb["round_seconds"] * 3 / 2)
    assert rb["extrapolated"] is True


def test_profile_json_llama70b_one_layer(tmp_path):
    from fedmomentum.cli import main
    out = tmp_path / "p.json"
    rc = main(["profile", "--model", "llama-70b", "--clients", "2", "--rank", "4", "--layers", "1",
               "--json", str(out), "--no-progress"])
    assert rc == 0
    rep = json.loads(out.read_text())
    for key in ("model", "clients", "rank", "dtype", "device", "modules", "round_seconds",
                "round_seconds_extrapolated", "baselines"):
        assert key in rep
    assert (rep["model"], rep["clients"], rep["rank"], rep["dtype"], rep["device"]) == \
        ("llama-70b", 2, 4, "bf16", "cpu")
    mods = rep["modules"]
    assert len(mods) == 7
    want = [("self_attn.q_proj", 8192, 8192), ("self_attn.k_proj", 1024, 8192),
            ("self_attn.v_proj", 1024, 8192), ("self_attn.o_proj", 8192, 8192),
            ("mlp.gate_proj", 28672, 8192), ("mlp.up_proj", 28672, 8192), ("mlp.down_proj", 8192, 28672)]
    for rec, (path, m, n) in zip(mods, want):
        assert rec["name"] == f"model.layers.0.{path}" and (rec["m"], rec["n"], rec["R"]) == (m, n, 8)
        for key in ("seconds", "flops", "bytes", "peak_memory_bytes", "energy_kept"):
            assert isinstance(rec[key], (int, float)) and rec[key] >= 0
        assert 0 < rec["energy_kept"] <= 1
        assert rec["bytes"] == solver_bytes(m, n, [4, 4], 4, rec["solver"], itemsize=2)["total"]
    assert rep["round_seconds_extrapolated"] == pytest.approx(rep["round_seconds"] * 80)
    assert rep["extrapolated"] is True and rep["baselines"] == {}


def test_profile_shapes_match_peft_lora_orientation():
    """lora_B is out x r and lora_A is r x in, as PEFT builds them on the same config."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg = dict(TINY)
    conf = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(conf)
    lm = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj",
                                                                       "o_proj", "gate_proj", "up_proj",
                                                                       "down_proj"]))
    sd = peft.get_peft_model_state_dict(lm)
    rep = profile_round(TINY, 2, 4, layers=1, progress=False)
    assert len(rep["modules"]) == 7
    for rec in rep["modules"]:
        key = f"base_model.model.{rec['name']}"
        assert tuple(sd[f"{key}.lora_B.weight"].shape) == (rec["m"], 4)
        assert tuple(sd[f"{key}.lora_A.weight"].shape) == (4, rec["n"])


def test_cli_compare_and_plot(tmp_path, capsys):
    from fedmomentum.cli import main
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY))
    png, js = tmp_path / "p.png", tmp_path / "p.json"
    rc = main(["profile", "--model", str(cfg), "--clients", "3", "--rank", "4", "--dtype", "fp32",
               "--solver", "exact", "--compare", "dense_lowrank,dense_full", "--json", str(js),
               "--plot", str(png), "--no-progress"])
    assert rc == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rep = json.loads(js.read_text())
    assert rep["extrapolated"] is False and rep["layers_measured"] == 3
    assert rep["round_seconds"] == pytest.approx(rep["round_seconds_extrapolated"])
    assert set(rep["baselines"]) == {"dense_lowrank", "dense_full"}
    for b in rep["baselines"].values():
        assert len(b["modules"]) == 7 and b["ratio_to_fedmomentum"] > 0
        assert b["round_seconds_extrapolated"] == pytest.approx(b["seconds"] * 3)
    assert {m["solver"] for m in rep["modules"]} == {"exact"}
    assert "round (3 layers)" in capsys.readouterr().out


def test_profile_bad_inputs(tmp_path, capsys):
    from fedmomentum.cli import main
    with pytest.raises(ValueError, match="dtype"):
        profile_round(TINY, 2, 4, dtype="int8", progress=False)
    with pytest.raises(ValueError, match="3 layers"):
        profile_round(TINY, 2, 4, layers=4, progress=False)
    with pytest.raises(ValueError, match="unknown baseline"):
        profile_round(TINY, 2, 4, compare=["peft_svd"], progress=False)
    with pytest.raises(ValueError, match="clients"):
        profile_round(TINY, 0, 4, progress=False)
    # impossible budget: a clear error naming the module, before anything is generated
    q_need = module_memory_bytes(8192, 8192, [16] * 10, 16)
    gate_need = module_memory_bytes(28672, 8192, [16] * 10, 16)
    assert q_need < gate_need
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj \(28672 x 8192, R=160\) alone needs"):
        profile_round("llama-70b", 10, 16, layers=1, max_memory=(q_need + gate_need) // 2, progress=False)
    assert main(["profile", "--model", "llama-70b", "--clients", "10", "--rank", "16",
                 "--max-memory", "1MB", "--no-progress"]) == 1
    assert "alone needs" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


_RSS_SCRIPT = r"""
import json, sys
from fedmomentum_core.profiling import profile_round
cfg = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 3,
       "num_attention_heads": 16, "num_key_value_heads": 4}
budget = None if sys.argv[1] == "none" else sys.argv[1]
rep = profile_round(cfg, 8, 32, max_memory=budget, layers_at_once=3, progress=False, solver="exact")
print(json.dumps({"peak": rep["totals"]["peak_memory_bytes"], "chunks": rep["chunks"]}))
"""


def _rss_run(budget: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, budget], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_memory_budget_is_honoured_by_rss_growth():
    """RSS growth (fresh processes) stays under the budget; holding all 3 layers at once does not."""
    budget = 100 * 10 ** 6
    free = _rss_run("none")
    capped = _rss_run(str(budget))
    assert free["chunks"] == 1 and free["peak"] > budget  # the measurement can see a violation
    assert capped["chunks"] > 1
    assert capped["peak"] <= budget


# ----------------------------------------------------------------------------- model-level API

def _adapter_state(K: int, shapes: dict, r: int, dtype=torch.float32, seed: int = 0):
    """K PEFT saved-form state dicts: ``shapes`` maps module path -> (out, in)."""
    sds = []
    for k in range(K):
        g = torch.Generator().manual_seed(seed + k)
        sd = {}
        for path, (m, n) in shapes.items():
            sd[f"base_model.model.{path}.lora_A.weight"] = (torch.randn(r, n, generator=g) / n ** 0.5).to(dtype)
            sd[f"base_model.model.{path}.lora_B.weight"] = (torch.randn(m, r, generator=g) * 0.02).to(dtype)
        sds.append(sd)
    return sds


def _lora_config(r: int, targets) -> dict:
    return {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": sorted(targets),
            "task_type": "CAUSAL_LM", "base_model_name_or_path": "tiny", "use_rslora": False,
            "fan_in_fan_out": False, "bias": "none"}


def test_aggregate_profile_attaches_records():
    import fedmomentum as fm
    shapes = {"model.layers.0.self_attn.q_proj": (64, 48), "model.layers.0.mlp.down_proj": (48, 80)}
    K, r = 3, 4
    sds = _adapter_state(K, shapes, r, dtype=torch.bfloat16)
    cfg = _lora_config(r, ["q_proj", "down_proj"])
    agg = fm.aggregate(sds, [3, 1, 2], configs=cfg, profile=True, solver="exact")
    assert len(agg.report) == 2
    for rep in agg.report:
        m, n = rep.shape
        R = sum(rep.ranks)
        pre = f"base_model.model.{rep.name}" if not rep.name.startswith("base_model") else rep.name
        inputs = sum(sd[f"{pre}.lora_{x}.weight"].nbytes for sd in sds for x in "AB")
        outputs = agg.state_dict[f"{pre}.lora_A.weight"].nbytes + agg.state_dict[f"{pre}.lora_B.weight"].nbytes
        resid = agg.residuals[rep.name].nbytes
        assert rep.bytes == inputs + outputs + resid  # the model, checked by counting tensors
        assert rep.flops == solver_flops(m, n, R, rep.rank, "exact")["total"]
        assert isinstance(rep.peak_memory_bytes, int) and rep.peak_memory_bytes >= 0
        rec = rep.info["profile"]
        for key in ("name", "m", "n", "R", "seconds", "flops", "bytes", "peak_memory_bytes", "energy_kept"):
            assert key in rec
        assert (rec["m"], rec["n"], rec["R"]) == (m, n, R) and rec["energy_kept"] == pytest.approx(rep.energy_kept)
    plain = fm.aggregate(sds, [3, 1, 2], configs=cfg, solver="exact")
    assert all(rep.flops is None and rep.peak_memory_bytes is None for rep in plain.report)


def _write_adapters(root, K: int, shapes: dict, r: int, dtype=torch.bfloat16) -> list:
    from safetensors.torch import save_file
    dirs = []
    targets = sorted({p.rsplit(".", 1)[-1] for p in shapes})
    for k, sd in enumerate(_adapter_state(K, shapes, r, dtype=dtype)):
        d = root / f"client{k}"
        d.mkdir()
        save_file(sd, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps(_lora_config(r, targets)))
        dirs.append(d)
    return dirs


def test_aggregate_adapters_impossible_budget_errors(tmp_path):
    from fedmomentum.peft import aggregate_adapters
    shapes = {f"model.layers.{i}.mlp.up_proj": (512, 256) for i in range(2)}
    dirs = _write_adapters(tmp_path, 3, shapes, 8)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj.*alone needs"):
        aggregate_adapters(dirs, out, max_memory="100KB")
    assert not out.exists()
    # every module fits alone, but the kept outputs (adapter + residuals) do not
    one = module_memory_bytes(512, 256, [8] * 3, 8, "exact", itemsize=4)
    with pytest.raises(ValueError, match="outputs kept"):
        aggregate_adapters(dirs, out, max_memory=one + 1000)
    assert not out.exists()
    agg = aggregate_adapters(dirs, out, max_memory="1GB")
    assert len(agg.report) == 2 and (out / "adapter_config.json").is_file()


_ADAPTER_RSS_SCRIPT = r"""
import json, sys
from fedmomentum_core.profiling import PeakMemory
from fedmomentum.peft import aggregate_adapters
dirs, out, budget = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
with PeakMemory("cpu") as pm:
    aggregate_adapters(dirs, out, max_memory=None if budget == "none" else budget, solver="exact")
print(json.dumps({"growth": pm.delta_bytes}))
"""


def test_aggregate_adapters_budget_honoured_by_rss(tmp_path):
    """RSS growth of a fresh process aggregating 8 modules of 8 clients stays within max_memory."""
    shapes = {f"model.layers.{i}.mlp.up_proj": (3072, 2048) for i in range(8)}
    dirs = _write_adapters(tmp_path, 8, shapes, 16)
    budget = 150 * 10 ** 6
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", _ADAPTER_RSS_SCRIPT, json.dumps([str(d) for d in dirs]),
                          str(tmp_path / "out"), str(budget)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    growth = json.loads(res.stdout.strip().splitlines()[-1])["growth"]
    inputs = sum((d / "adapter_model.safetensors").stat().st_size for d in dirs)
    assert growth <= budget
    assert growth > 0.1 * inputs  # the measurement sees the work (it is not trivially zero)


@pytest.mark.parametrize("budget", [None, "1GB"])
def test_budget_frees_scratch_stacks_between_modules(tmp_path, budget):
    """Under max_memory the exact solver's per-thread scratch stacks (kept between calls, not in the
    next module's estimate) are freed after every module; without a budget they are kept for reuse."""
    from fedmomentum.peft import aggregate_adapters
    from fedmomentum_core.linalg import release_workspace, thread_workspace
    shapes = {f"model.layers.{i}.mlp.up_proj": (512, 256) for i in range(2)}
    dirs = _write_adapters(tmp_path, 3, shapes, 8)
    release_workspace()
    aggregate_adapters(dirs, tmp_path / "out", max_memory=budget, solver="exact")
    kept = thread_workspace().nbytes
    if budget is None:
        assert kept >= 4 * (512 + 256) * 24  # both sides' stacks (R = 24) stay for the next call
    else:
        assert kept == 0
    release_workspace()


def test_profile_round_budget_frees_scratch_stacks():
    """profile_round under max_memory frees the scratch stacks after each chunk (same rule as above)."""
    from fedmomentum_core.linalg import release_workspace, thread_workspace
    release_workspace()
    profile_round(TINY, 3, 4, max_memory="1GB", progress=False, solver="exact", residual="factored")
    assert thread_workspace().nbytes == 0
    profile_round(TINY, 3, 4, progress=False, solver="exact", residual="factored")
    assert thread_workspace().nbytes > 0
    release_workspace()
