"""Model-level aggregation (fedmomentum.aggregate, fedmomentum.peft.plan/rules) on state dicts.

The oracle is float64 dense math: per module Σ_k p_k s_k B_k A_k in the base weight's
orientation, with s_k computed here from the config by hand.
"""
from __future__ import annotations

import math

import pytest
import torch

import fedmomentum as fm
from fedmomentum_core import LowRank
from fedmomentum.peft.plan import aggregate_state_dicts, plan_modules
from fedmomentum.peft.rules import client_scaling, group_lora_keys, peft_pattern_key
from fedmomentum_core.plan import ModelAggregation

P = "base_model.model."


def _client(mods: dict, seed: int, *, live: str | None = None, emb: set = frozenset(), dtype=torch.float32):
    """mods: {path: (m, n, r)} -> a PEFT-style state dict with random factors."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for path, (m, n, r) in mods.items():
        B = torch.randn(m, r, generator=g, dtype=torch.float64).to(dtype)
        A = torch.randn(r, n, generator=g, dtype=torch.float64).to(dtype)
        if path in emb:
            ka, kb = (f"{P}{path}.lora_embedding_A", f"{P}{path}.lora_embedding_B")
            if live:
                ka, kb = ka + f".{live}", kb + f".{live}"
        else:
            mid = f".{live}" if live else ""
            ka, kb = f"{P}{path}.lora_A{mid}.weight", f"{P}{path}.lora_B{mid}.weight"
        sd[ka], sd[kb] = A, B
    return sd


def _factors(sd, path, emb=False):
    for k, v in sd.items():
        if k.startswith(P + path + ".lora_"):
            if ("lora_embedding_A" in k) if emb else (".lora_A" in k):
                A = v
            else:
                B = v
    return B.double(), A.double()


def _check_invariant(agg: ModelAggregation, sds, p, s_list, path, *, transpose=False, emb=False):
    """out_s·B·A (oriented) + residual == Σ p_k s_k B_k A_k (oriented), fp64."""
    ref = sum(pk * sk * (lambda BA: BA[0] @ BA[1])(_factors(sd, path, emb)) for pk, sk, sd in zip(p, s_list, sds))
    rep = next(r for r in agg.report if r.name == P + path)
    if emb:
        A, B = agg.state_dict[f"{P}{path}.lora_embedding_A"], agg.state_dict[f"{P}{path}.lora_embedding_B"]
    else:
        A, B = agg.state_dict[f"{P}{path}.lora_A.weight"], agg.state_dict[f"{P}{path}.lora_B.weight"]
    got = rep.out_scaling * (B.double() @ A.double())
    if transpose:
        ref, got = ref.T, got.T
    res = agg.residuals.get(P + path)
    if res is not None:
        assert res.shape == tuple(ref.shape)  # base-weight orientation
        got = got + res.to_dense(torch.float64)
    assert float((got - ref).norm() / ref.norm()) < 1e-5


MODS = {"model.layers.0.q_proj": (24, 16, 4), "model.layers.0.down_proj": (16, 40, 4),
        "model.layers.1.q_proj": (24, 16, 4)}


def test_group_keys_saved_live_embedding_and_other():
    sd = _client(MODS, 0)
    g, other = group_lora_keys(sd.keys())
    assert set(g) == {P + k for k in MODS} and other == []
    live = _client(MODS, 0, live="default", emb={"model.layers.1.q_proj"})
    g2, _ = group_lora_keys(list(live) + ["model.norm.weight"])
    lk = g2[P + "model.layers.1.q_proj"]
    assert lk.embedding and lk.adapter == "default" and lk.a_key.endswith("lora_embedding_A.default")
    with pytest.raises(ValueError, match="several adapters"):
        group_lora_keys(list(live) + [f"{P}x.lora_A.other.weight", f"{P}x.lora_B.other.weight"])
    with pytest.raises(ValueError, match=r"client 3: module .*x' has lora_A .* but no lora_B"):
        group_lora_keys([f"{P}x.lora_A.weight"], client="client 3")
    with pytest.raises(ValueError, match="DoRA"):
        group_lora_keys([f"{P}x.lora_magnitude_vector.default.weight"])
    with pytest.raises(ValueError, match="other than the A/B"):
        group_lora_keys([f"{P}x.lora_B.bias"])


@pytest.mark.parametrize("patterns,module", [
    (["q_proj", "v_proj"], "model.layers.0.self_attn.q_proj"),
    (["layers.1.mlp.up_proj", "up_proj"], "model.layers.1.mlp.up_proj"),
    (["up_proj"], "model.layers.1.mlp.gate_up_proj"),
    ([r"model\.layers\.0\..*proj"], "model.layers.0.mlp.down_proj"),
    (["layers.1.q_proj"], "model.layers.11.q_proj"),
])
def test_pattern_rule_matches_peft(patterns, module):
    from peft.utils.other import get_pattern_key
    peft_key = get_pattern_key(patterns, module)
    ours = peft_pattern_key(patterns, module)
    assert (ours if ours is not None else module) == peft_key


def test_client_scaling_rslora_patterns_and_mismatch():
    cfg = {"r": 8, "lora_alpha": 16, "use_rslora": True, "rank_pattern": {"q_proj": 4},
           "alpha_pattern": {"layers.0.q_proj": 2}}
    s, alpha, rs = client_scaling(cfg, P + "model.layers.0.q_proj", 4)
    assert rs and alpha == 2 and s == pytest.approx(2 / math.sqrt(4))
    s, alpha, _ = client_scaling(cfg, P + "model.layers.0.v_proj", 8)
    assert s == pytest.approx(16 / math.sqrt(8))
    s, _, _ = client_scaling({"r": 8, "lora_alpha": 16}, "v_proj", 8)
    assert s == 2.0
    with pytest.raises(ValueError, match=r"c7: module 'base_model.model.model.layers.1.q_proj'.*rank_pattern\['q_proj'\] = 4.*8 rows"):
        client_scaling(cfg, P + "model.layers.1.q_proj", 8, client="c7")
    assert client_scaling(None, "x", 5) == (1.0, 5.0, False)


def test_aggregate_saved_and_live_forms_invariant_and_report():
    sds = [_client(MODS, k) for k in range(3)]
    sds[1] = _client(MODS, 1, live="default")  # one client in live form
    cfg = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "down_proj"]}
    w = [1, 2, 5]
    agg = fm.aggregate(sds, w, configs=cfg, rank=2, profile=True)
    assert isinstance(agg, fm.ModelAggregation)
    p = [x / sum(w) for x in w]
    for path in MODS:
        _check_invariant(agg, sds, p, [2.0] * 3, path)
    assert set(agg.state_dict) == {f"{P}{m}.lora_{x}.weight" for m in MODS for x in "AB"}
    assert agg.config["r"] == 2 and agg.config["lora_alpha"] == 4 and agg.config["rank_pattern"] == {}
    rep = agg.report[0]
    assert rep.ranks == (4, 4, 4) and rep.rank == 2 and rep.residual_rank == 10 and rep.seconds >= 0
    assert 0 < rep.energy_kept < 1 and "input_bytes" in rep.info
    assert [r.name for r in agg.report] == [P + "model.layers.0.down_proj", P + "model.layers.0.q_proj",
                                           P + "model.layers.1.q_proj"]
    assert "3 modules" in agg.summary()


def test_heterogeneous_ranks_scalings_and_rank_pattern_consistency():
    from peft import LoraConfig
    from peft.utils.other import get_pattern_key

    mods_r = [{k: (m, n, r) for k, (m, n, _) in MODS.items()} for r in (2, 6, 4)]
    mods_r[2]["model.layers.0.down_proj"] = (16, 40, 3)
    sds = [_client(mr, 10 + k) for k, mr in enumerate(mods_r)]
    cfgs = [LoraConfig(r=2, lora_alpha=4), LoraConfig(r=6, lora_alpha=6, use_rslora=True),
            LoraConfig(r=4, lora_alpha=4, rank_pattern={"down_proj": 3}, alpha_pattern={"down_proj": 9})]
    agg = fm.aggregate(sds, [3, 1, 1], configs=cfgs, method="florist", tau=0.6)
    # florist: per-module output rank, written to rank_pattern with PEFT's matching rule
    out = agg.config
    for rep in agg.report:
        rel = rep.name[len(P):]
        key = get_pattern_key(out["rank_pattern"].keys(), rel)
        assert out["rank_pattern"].get(key, out["r"]) == rep.rank
        akey = get_pattern_key(out["alpha_pattern"].keys(), rel)
        alpha = out["alpha_pattern"].get(akey, out["lora_alpha"])
        assert alpha / rep.rank == pytest.approx(rep.out_scaling)  # output s = α/r (no rsLoRA: not all used it)
        assert rep.residual_rank == 0 and rep.energy_dropped > 0
    assert out["use_rslora"] is False
    LoraConfig(**{k: v for k, v in out.items() if k in ("r", "lora_alpha", "rank_pattern", "alpha_pattern")})
    # fedmomentum on the same clients: exact with per-client s_k, output s = Σ p_k s_k
    agg = fm.aggregate(sds, [3, 1, 1], configs=cfgs, rank=3)
    p = [0.6, 0.2, 0.2]
    for path in MODS:
        s = [4 / 2, 6 / math.sqrt(6), (9 / 3) if "down" in path else 1.0]
        _check_invariant(agg, sds, p, s, path)
        rep = next(r for r in agg.report if r.name == P + path)
        assert rep.out_scaling == pytest.approx(sum(a * b for a, b in zip(p, s)))


def test_conv1d_and_embedding_orientation():
    mods = {"transformer.h.0.attn.c_attn": (48, 16, 4), "transformer.wte": (16, 30, 4)}
    sds = [_client(mods, 20 + k, emb={"transformer.wte"}) for k in range(2)]
    agg = fm.aggregate(sds, configs={"r": 4, "lora_alpha": 4, "fan_in_fan_out": True}, rank=2)
    assert agg.residuals[P + "transformer.h.0.attn.c_attn"].shape == (16, 48)  # Conv1D weight: in x out
    assert agg.residuals[P + "transformer.wte"].shape == (30, 16)  # Embedding weight: num x dim
    _check_invariant(agg, sds, [0.5, 0.5], [1.0, 1.0], "transformer.h.0.attn.c_attn", transpose=True)
    _check_invariant(agg, sds, [0.5, 0.5], [1.0, 1.0], "transformer.wte", transpose=True, emb=True)
    assert f"{P}transformer.wte.lora_embedding_A" in agg.state_dict
    # nn.Linear (no fan_in_fan_out): residual is out x in
    agg = fm.aggregate(sds, configs={"r": 4, "lora_alpha": 4}, rank=2)
    assert agg.residuals[P + "transformer.h.0.attn.c_attn"].shape == (48, 16)


def test_non_lora_tensors_averaged_and_configs_none():
    sds = [_client(MODS, k) for k in range(2)]
    sds[0]["base_model.model.score.modules_to_save.default.weight"] = torch.ones(3, 4)
    sds[1]["base_model.model.score.modules_to_save.default.weight"] = torch.full((3, 4), 4.0)
    agg = fm.aggregate(sds, [1, 3])
    torch.testing.assert_close(agg.state_dict["base_model.model.score.modules_to_save.default.weight"],
                               torch.full((3, 4), 3.25))
    assert agg.config["r"] == 4 and agg.config["lora_alpha"] == 4  # configs=None: s = 1
    for path in MODS:
        _check_invariant(agg, sds, [0.25, 0.75], [1.0, 1.0], path)
    sds[1]["base_model.model.score.modules_to_save.default.weight"] = torch.ones(4, 4)
    with pytest.raises(ValueError, match=r"client 1: non-LoRA tensor .*score.*\(4, 4\), expected \(3, 4\)"):
        fm.aggregate(sds)


def test_method_specific_outputs():
    sds = [_client(MODS, 30 + k) for k in range(3)]
    cfg = {"r": 4, "lora_alpha": 8}
    agg = fm.aggregate(sds, configs=cfg, method="fedsa_lora")
    assert all(".lora_A." in k for k in agg.state_dict) and len(agg.state_dict) == len(MODS)
    assert agg.residuals == {}
    agg = fm.aggregate(sds, configs=cfg, method="flora", generator=torch.Generator().manual_seed(0))
    for path in MODS:
        assert float(agg.state_dict[f"{P}{path}.lora_B.weight"].abs().max()) == 0.0
        _check_invariant(agg, sds, [1 / 3] * 3, [2.0] * 3, path)
    agg = fm.aggregate(sds, configs=cfg, method="fedex_lora")
    for path in MODS:
        _check_invariant(agg, sds, [1 / 3] * 3, [2.0] * 3, path)
    agg = fm.aggregate(sds, configs=cfg, residual="none")
    assert agg.residuals == {} and agg.residual_mode == "discarded"
    assert all(r.residual == "discarded" and r.energy_dropped > 0 for r in agg.report)


def test_bad_inputs_name_client_and_module():
    sds = [_client(MODS, k) for k in range(3)]
    bad = dict(sds[2])
    del bad[f"{P}model.layers.1.q_proj.lora_A.weight"], bad[f"{P}model.layers.1.q_proj.lora_B.weight"]
    with pytest.raises(ValueError, match=r"client 2: has no LoRA factors for module .*layers.1.q_proj"):
        fm.aggregate([sds[0], sds[1], bad])
    other = _client({**MODS, "model.layers.0.q_proj": (24, 20, 4)}, 5)
    with pytest.raises(ValueError, match=r"client 1: module .*layers.0.q_proj.*different shapes"):
        fm.aggregate([sds[0], other])
    with pytest.raises(ValueError, match="expected 3 weights"):
        fm.aggregate(sds, [1, 2])
    with pytest.raises(ValueError, match="unknown method"):
        fm.aggregate(sds, method="nope")
    nan = {k: v.clone() for k, v in sds[1].items()}
    nan[f"{P}model.layers.1.q_proj.lora_B.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layers.1.q_proj.*client 1 \(c1\).*NaN"):
        aggregate_state_dicts([sds[0], nan], client_names=["c0", "c1"])
    plan = plan_modules([{k: tuple(v.shape) for k, v in sd.items()} for sd in sds], {"r": 4, "lora_alpha": 8})
    assert [s.rel_name for s in plan.modules] == ["model.layers.0.down_proj", "model.layers.0.q_proj",
                                                  "model.layers.1.q_proj"]
    assert plan.modules[0].scalings == (2.0, 2.0, 2.0) and plan.modules[0].weight_shape == (16, 40)
    with pytest.raises(TypeError, match="single mapping"):
        fm.aggregate(sds[0])
    with pytest.raises(ValueError, match="client 0: no LoRA factors"):
        fm.aggregate([{"x.weight": torch.ones(2)}])


def test_inputs_not_modified_and_dtype_kept():
    sds = [_client(MODS, k, dtype=torch.bfloat16) for k in range(2)]
    before = {k: v.clone() for k, v in sds[0].items()}
    agg = fm.aggregate(sds, configs={"r": 4, "lora_alpha": 4})
    assert all(v.dtype == torch.bfloat16 for v in agg.state_dict.values())
    assert all(r.left.dtype == torch.float32 for r in agg.residuals.values())
    assert all(torch.equal(before[k], sds[0][k]) for k in before)
    assert isinstance(next(iter(agg.residuals.values())), LowRank)


def test_run_plan_batches_same_shapes_in_module_order_without_mutating_callbacks():
    """Same-shaped modules go through aggregate_layers together (what the benchmarks time); the
    callback sees every module once, in module order, and its object is never changed afterwards;
    the result equals the one-module-at-a-time path."""
    from fedmomentum_core.plan import plan_batches, run_plan
    from fedmomentum.peft.plan import aggregate_state_dicts as agg_sd

    mods = {f"model.layers.{i}.{n}": shape for i in range(3)
            for n, shape in (("q_proj", (24, 16, 4)), ("up_proj", (40, 16, 4)))}
    sds = [_client(mods, seed) for seed in range(3)]
    plan = plan_modules([{k: tuple(v.shape) for k, v in sd.items()} for sd in sds])
    batches = plan_batches(plan.modules, solver="exact")
    assert sorted(len(b) for b in batches) == [3, 3]  # q_proj x3 and up_proj x3
    seen = []
    agg = run_plan(plan, lambda s: ([sd[k.b_key] for sd, k in zip(sds, s.keys)],
                                    [sd[k.a_key] for sd, k in zip(sds, s.keys)]),
                   solver="exact", on_module=lambda r: seen.append((r, r.residual)))
    assert [r.report.name for r, _ in seen] == [s.name for s in plan.modules]
    assert all(r.residual is res and res is not None for r, res in seen)  # not mutated after the call
    assert all(r.report.info.get("batched") == 3 for r, _ in seen)
    one = agg_sd(sds, solver="exact", lookahead=0)  # batches of one
    assert all(rep.info.get("batched") is None for rep in one.report)
    for k, v in one.state_dict.items():
        _close = torch.allclose(agg.state_dict[k].double() @ agg.state_dict[k].double().T,
                                v.double() @ v.double().T, atol=1e-4, rtol=1e-4)
        assert _close, k
    for name, lr in one.residuals.items():
        assert torch.allclose(agg.residuals[name].to_dense(torch.float64), lr.to_dense(torch.float64), atol=1e-5)
