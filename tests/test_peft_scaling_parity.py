"""Scaling parity with PEFT as the oracle.

Real ``peft`` PeftModels (tiny LlamaForCausalLM built from a config, no hub access) with
``rank_pattern``/``alpha_pattern`` keys such as ``q_proj|v_proj`` and ``layers.0.*`` (regex keys, as
PEFT matches them), rsLoRA on and off and mixed client ranks. Every path that turns an adapter config
into LoRA scalings must use exactly PEFT's ``lora_layer.scaling[adapter]`` for every module:

* the adapter-folder path (``plan_adapters`` / ``aggregate_adapters``),
* the state-dict path (``fedmomentum.aggregate(..., configs=...)``),
* the Flower strategy (``residual="ship"`` and ``"server"``, ``merged_state_dict(include_adapter=True)``),
* the torchrun path (``fedmomentum.distributed``'s sharded code, run in-process on a gloo group of 1).

Besides comparing the scalings, each path's output is checked end to end against PEFT's own
``get_delta_weight``: new adapter (scaled as PEFT scales it when loaded) + residual ==
Σ_k p_k ΔW_k. The old Flower copy of the pattern rule (``rf"(.*\\.)?{key}$"``, no group) misses
``v_proj`` under a ``q_proj|v_proj`` key, so these tests fail on it.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

import fedmomentum as fm  # noqa: E402
from fedmomentum.peft import aggregate_adapters, plan_adapters  # noqa: E402
from fedmomentum.peft.plan import plan_modules  # noqa: E402
from peft_helpers import LLAMA_TARGETS, build_clients, build_llama_base, load_base  # noqa: E402

P = "base_model.model."
WEIGHTS = [3.0, 1.0, 2.0]
#: K = 3 clients: mixed ranks, rsLoRA on/off, regex pattern keys with PEFT's first-match-in-dict-order
#: rule. Keys are listed sorted: PEFT writes adapter_config.json with sorted keys, so a config whose
#: pattern order is not sorted means something else once saved and reloaded (PEFT itself then fails
#: to load the adapter it saved)
CLIENT_CONFIGS = [
    dict(r=4, lora_alpha=8, rank_pattern={"layers.0.*": 6, "q_proj|v_proj": 2},
         alpha_pattern={"layers.1.mlp.*": 3, "q_proj|v_proj": 16}),
    dict(r=8, lora_alpha=6, use_rslora=True, rank_pattern={"q_proj|v_proj": 4},
         alpha_pattern={"layers.0.*": 12, "o_proj": 5}),
    dict(r=2, lora_alpha=5, alpha_pattern={"k_proj|v_proj": 7}),
]
LLAMA = dict(hidden=32, intermediate=64, heads=4, kv_heads=2, layers=2, vocab=64)


def _peft_layers(pm) -> dict[str, LoraLayer]:
    return {name: mod for name, mod in pm.base_model.model.named_modules() if isinstance(mod, LoraLayer)}


def _peft_scalings(pm, adapter: str = "default") -> dict[str, float]:
    return {name: float(mod.scaling[adapter]) for name, mod in _peft_layers(pm).items()}


def _peft_deltas(pm, adapter: str = "default") -> dict[str, torch.Tensor]:
    return {name: mod.get_delta_weight(adapter).to(torch.float64) for name, mod in _peft_layers(pm).items()}


def _oracle(deltas: list[dict[str, torch.Tensor]], weights) -> dict[str, torch.Tensor]:
    p = [w / sum(weights) for w in weights]
    return {name: sum(pk * d[name] for pk, d in zip(p, deltas)) for name in deltas[0]}


def _close(got: torch.Tensor, want: torch.Tensor, what: str, tol: float = 1e-5) -> None:
    err = float((got - want).abs().max())
    assert err <= tol * max(1.0, float(want.abs().max())), (what, err)


@pytest.fixture(scope="module")
def clients(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    base = build_llama_base(root / "base", **LLAMA)
    dirs = build_clients(base, root / "clients", CLIENT_CONFIGS, seed=3)
    pms = [PeftModel.from_pretrained(load_base(base), str(d)) for d in dirs]
    scal = [_peft_scalings(pm) for pm in pms]
    # the fixture itself must exercise what the test claims: patterns changed r and alpha per module
    assert len({s for sk in scal for s in sk.values()}) >= 6
    assert scal[0]["model.layers.1.self_attn.v_proj"] == 16 / 2  # q_proj|v_proj: rank 2, alpha 16
    assert scal[0]["model.layers.0.self_attn.v_proj"] == 16 / 6  # layers.0.* comes first for the rank
    assert scal[0]["model.layers.0.mlp.up_proj"] == 8 / 6        # layers.0.* rank, default alpha
    assert scal[1]["model.layers.0.self_attn.q_proj"] == pytest.approx(12 / math.sqrt(4))
    assert scal[2]["model.layers.1.self_attn.v_proj"] == 7 / 2   # k_proj|v_proj alpha
    ranks = {pm.base_model.model.model.layers[1].self_attn.v_proj.lora_A["default"].weight.shape[0] for pm in pms}
    assert ranks == {2, 4}
    return dict(root=root, base=base, dirs=dirs, pms=pms, scalings=scal, deltas=[_peft_deltas(pm) for pm in pms])


def _check_plan_scalings(plan, scal) -> None:
    assert len(plan.modules) == len(scal[0]) == 2 * len(LLAMA_TARGETS)
    for spec in plan.modules:
        for k, s in enumerate(spec.scalings):
            assert s == pytest.approx(scal[k][spec.rel_name], rel=1e-12), (spec.name, k)


def _check_exact(state, residuals, report, oracle, kinds=None) -> None:
    """s·B·A (s: the report's out_scaling) + residual == the PEFT oracle, per module."""
    for rep in report:
        rel = rep.name[len(P):]
        B = state[f"{rep.name}.lora_B.weight"].to(torch.float64)
        A = state[f"{rep.name}.lora_A.weight"].to(torch.float64)
        got = rep.out_scaling * (B @ A)
        if rep.name in residuals:
            got = got + residuals[rep.name].to_dense(torch.float64)
        _close(got, oracle[rel], rep.name)


# ----------------------------------------------------------------------------- adapter folders

def test_adapter_folder_path_uses_peft_scalings(clients, tmp_path):
    scal = clients["scalings"]
    _check_plan_scalings(plan_adapters(clients["dirs"], WEIGHTS).plan, scal)
    out = tmp_path / "out"
    agg = aggregate_adapters(clients["dirs"], out, WEIGHTS, solver="exact")
    oracle = _oracle(clients["deltas"], WEIGHTS)
    _check_exact(agg.state_dict, agg.residuals, agg.report, oracle)
    # the written adapter, loaded by PEFT, is scaled exactly as we computed it
    pm = PeftModel.from_pretrained(load_base(clients["base"]), str(out))
    out_scal = _peft_scalings(pm)
    deltas = _peft_deltas(pm)
    for rep in agg.report:
        rel = rep.name[len(P):]
        assert out_scal[rel] == pytest.approx(rep.out_scaling, rel=1e-9), rep.name
        _close(deltas[rel] + agg.residuals[rep.name].to_dense(torch.float64), oracle[rel], rep.name)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] or cfg["alpha_pattern"]  # per-module values differ from the global ones


# ----------------------------------------------------------------------------- state dicts

@pytest.mark.parametrize("form", ["saved", "live"])
def test_state_dict_path_uses_peft_scalings(clients, form):
    pms = clients["pms"]
    if form == "saved":
        sds = [get_peft_model_state_dict(pm) for pm in pms]
    else:
        sds = [{k: v for k, v in pm.state_dict().items()} for pm in pms]
    configs = [pm.peft_config["default"] for pm in pms]  # LoraConfig objects
    shapes = [{k: tuple(v.shape) for k, v in sd.items()} for sd in sds]
    _check_plan_scalings(plan_modules(shapes, configs, WEIGHTS), clients["scalings"])
    agg = fm.aggregate(sds, WEIGHTS, configs=configs, solver="exact")
    _check_exact(agg.state_dict, agg.residuals, agg.report, _oracle(clients["deltas"], WEIGHTS))


# ----------------------------------------------------------------------------- torchrun path

def test_torchrun_sharded_path_uses_peft_scalings(clients, tmp_path):
    """The sharded code of fedmomentum.distributed (plan on every rank, shard, run_plan, gather,
    assemble) on an in-process gloo group of one rank."""
    import torch.distributed as dist

    from fedmomentum import distributed as fdist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        agg = fdist._run_sharded(clients["dirs"], tmp_path / "out", WEIGHTS, rank=None, method="fedmomentum",
                                 solver="exact", residual="save", base_model=None, merged_out=None,
                                 progress=False, profile=False, keep_residuals=True, overwrite=False)
    finally:
        dist.destroy_process_group()
    oracle = _oracle(clients["deltas"], WEIGHTS)
    _check_exact(agg.state_dict, agg.residuals, agg.report, oracle)
    pm = PeftModel.from_pretrained(load_base(clients["base"]), str(tmp_path / "out"))
    out_scal = _peft_scalings(pm)
    for rep in agg.report:
        assert out_scal[rep.name[len(P):]] == pytest.approx(rep.out_scaling, rel=1e-9), rep.name
    # and the cost model the shards are balanced with sees the same plan
    assert sorted(i for s in fdist.shard_modules(plan_adapters(clients["dirs"]).modules, 1) for i in s) == \
        list(range(2 * len(LLAMA_TARGETS)))


# ----------------------------------------------------------------------------- Flower

FLOWER_CONFIG = dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, lora_dropout=0.0,
                     rank_pattern={"layers.0.*": 6, "q_proj|v_proj": 2},
                     alpha_pattern={"layers.1.mlp.*": 3, "q_proj|v_proj": 16})


@pytest.fixture(params=[False, True], ids=["lora", "rslora"])
def flower_round(clients, request):
    pytest.importorskip("flwr")
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 4242, 1
    pms = []
    rs = request.param
    for k in range(3):
        pm = get_peft_model(load_base(clients["base"]), LoraConfig(**FLOWER_CONFIG, use_rslora=rs))
        g = torch.Generator().manual_seed(77 + k)
        with torch.no_grad():
            for name, prm in pm.named_parameters():
                if "lora_" in name:
                    prm.copy_(torch.randn(prm.shape, generator=g) * 0.3 / max(1, prm.shape[-1]) ** 0.5)
        pms.append(pm)

    def replies(models):
        out = []
        for node, (pm, n) in enumerate(zip(models, WEIGHTS), start=1):
            ins = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=node,
                          message_type="train")
            content = RecordDict({"arrays": ArrayRecord(get_peft_model_state_dict(pm)),
                                  "metrics": MetricRecord({"num-examples": n})})
            out.append(Message(content, reply_to=ins))
        return out

    yield dict(pms=pms, replies=replies, use_rslora=rs)
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def test_flower_scaling_rule_is_peft(clients):
    """The scale the strategy folds in (merged_state_dict) is PEFT's, for a q_proj|v_proj key too."""
    pytest.importorskip("flwr")
    from fedmomentum import flower

    for rs in (False, True):
        cfg = LoraConfig(**FLOWER_CONFIG, use_rslora=rs)
        pm = get_peft_model(load_base(clients["base"]), cfg)
        for rel, s in _peft_scalings(pm).items():
            r = _peft_layers(pm)[rel].r["default"]
            assert flower._module_scaling(cfg.to_dict(), P + rel, r) == pytest.approx(s, rel=1e-12), (rs, rel)


@pytest.mark.parametrize("mode", ["ship", "server"])
def test_flower_strategy_uses_peft_scalings(clients, flower_round, mode):
    from fedmomentum.flower import FedMomentumStrategy, apply_server_update

    pms = flower_round["pms"]
    cfg = pms[0].peft_config["default"]  # one LoraConfig for the federation
    base_sd = {k: v.clone() for k, v in load_base(clients["base"]).state_dict().items()}
    strat = FedMomentumStrategy(method="fedmomentum", solver="exact", residual=mode, lora_config=cfg,
                                base=base_sd)
    arrays, metrics = strat.aggregate_train(1, flower_round["replies"](pms))
    assert arrays is not None and metrics["num-clients"] == 3
    oracle = _oracle([_peft_deltas(pm) for pm in pms], WEIGHTS)
    client_scal = _peft_scalings(pms[0])
    agg = strat.last_aggregation
    for rep in agg.report:
        assert rep.out_scaling == pytest.approx(client_scal[rep.name[len(P):]], rel=1e-12), rep.name
    _check_exact(agg.state_dict, {k: v for k, v in (agg.residuals or {}).items()}, agg.report, oracle)
    # merged_state_dict(include_adapter=True): base + residual + s·B·A with PEFT's s == base + ΔW
    merged = strat.merged_state_dict(include_adapter=True)
    for rel, dw in oracle.items():
        key = f"{rel}.weight"
        _close(merged[key].to(torch.float64) - base_sd[key].to(torch.float64), dw, rel)
    if mode == "ship":
        # a client applying the shipped update with its own PEFT model ends on base + ΔW as well
        fresh = get_peft_model(load_base(clients["base"]),
                               LoraConfig(**FLOWER_CONFIG, use_rslora=flower_round["use_rslora"]))
        from flwr.app import RecordDict
        from fedmomentum.flower import RESIDUAL_RECORD_PREFIX, residual_records
        content = RecordDict({"arrays": arrays,
                              f"{RESIDUAL_RECORD_PREFIX}1": residual_records(strat.residual_history()[1])})
        apply_server_update(fresh, content)
        deltas = _peft_deltas(fresh)
        layers = _peft_layers(fresh)
        for rel, dw in oracle.items():
            w = layers[rel].get_base_layer().weight.to(torch.float64)
            _close(w - base_sd[f"{rel}.weight"].to(torch.float64) + deltas[rel], dw, rel)
