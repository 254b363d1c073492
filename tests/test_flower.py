"""Flower integration: FedMomentumStrategy on real flwr Messages, apply_server_update, and a
2-round 3-client simulation whose clients must end with the server's exact aggregate.

References are float64 dense sums Σ_k p_k s_k B_k A_k computed here from the replies."""
from __future__ import annotations

import importlib
import logging
import math
import os
import sys
from pathlib import Path

import pytest
import torch

flwr = pytest.importorskip("flwr")
peft = pytest.importorskip("peft")

from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict  # noqa: E402

import fedmomentum  # noqa: E402
from fedmomentum.flower import (  # noqa: E402
    MERGED_THROUGH_ATTR, RESIDUAL_RECORD_PREFIX, FedMomentumStrategy, apply_server_update,
    residual_records)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "flower"
R, ALPHA = 3, 6.0
S = ALPHA / R
MODULES = {"base_model.model.fc1": (10, 12), "base_model.model.fc2": (8, 10)}


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(12, 10)
        self.fc2 = torch.nn.Linear(10, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def lora_cfg() -> LoraConfig:
    return LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["fc1", "fc2"], lora_dropout=0.0)


def tiny_peft(seed: int = 0):
    torch.manual_seed(seed)
    return get_peft_model(Tiny(), lora_cfg())


def client_sd(seed: int, rank: int = R) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (m, n) in MODULES.items():
        sd[f"{name}.lora_B.weight"] = torch.randn(m, rank, generator=g)
        sd[f"{name}.lora_A.weight"] = torch.randn(rank, n, generator=g)
    return sd


def dense_sum(sds, weights) -> dict[str, torch.Tensor]:
    """float64 Σ_k p_k s B_k A_k per module."""
    p = torch.tensor(weights, dtype=torch.float64)
    p = p / p.sum()
    out = {}
    for name in MODULES:
        out[name] = sum(p[k] * S * (sd[f"{name}.lora_B.weight"].double() @ sd[f"{name}.lora_A.weight"].double())
                        for k, sd in enumerate(sds))
    return out


@pytest.fixture
def task_identity():
    """Flower needs a run identity to build instruction messages outside a running app."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 4242, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def instruction(node: int) -> Message:
    return Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=node,
                   message_type="train")


def reply(node: int, sd, n, loss=1.0, **extra_metrics) -> Message:
    metrics = {"train-loss": float(loss), **extra_metrics}
    if n is not None:
        metrics["num-examples"] = n
    content = RecordDict({"arrays": ArrayRecord({k: v.clone() for k, v in sd.items()}),
                          "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=instruction(node))


def check_exact(arrays: ArrayRecord, strategy, ref: dict[str, torch.Tensor], rnd: int):
    sd = arrays.to_torch_state_dict()
    res = strategy.residual_history().get(rnd, {})
    for name, delta in ref.items():
        got = S * (sd[f"{name}.lora_B.weight"].double() @ sd[f"{name}.lora_A.weight"].double())
        if name in res:
            got = got + res[name].to_dense(torch.float64)
        err = float((got - delta).abs().max())
        assert err <= 1e-5 * max(1.0, float(delta.abs().max())), (name, err)


# ----------------------------------------------------------------------------- strategy

def test_aggregate_train_exact_with_metrics(task_identity):
    sds = [client_sd(1), client_sd(2), client_sd(3)]
    ns = [10, 30, 60]
    strat = FedMomentumStrategy(method="fedmomentum", rank=R, solver="exact", lora_config=lora_cfg())
    arrays, metrics = strat.aggregate_train(1, [reply(i + 1, sd, n, loss=i) for i, (sd, n) in
                                                enumerate(zip(sds, ns))])
    assert set(arrays.keys()) == set(sds[0].keys())
    for name, (m, n) in MODULES.items():
        assert tuple(arrays[f"{name}.lora_B.weight"].shape) == (m, R)
        assert tuple(arrays[f"{name}.lora_A.weight"].shape) == (R, n)
    check_exact(arrays, strat, dense_sum(sds, ns), 1)
    # client metrics weighted like FedAvg, plus ours
    assert metrics["train-loss"] == pytest.approx((0 * 10 + 1 * 30 + 2 * 60) / 100)
    assert math.isfinite(metrics["aggregation-seconds"]) and metrics["aggregation-seconds"] >= 0
    energies = [r.energy_kept for r in strat.last_aggregation.report]
    assert metrics["energy-kept"] == pytest.approx(sum(energies) / len(energies))
    assert 0.0 < metrics["energy-kept"] < 1.0          # rank 3 of a rank-8 sum cannot keep it all
    res = strat.residual_history()[1]
    assert metrics["residual-rank"] == sum(lr.rank for lr in res.values()) > 0
    assert metrics["num-clients"] == 3 and metrics["dropped-replies"] == 0
    assert "num-examples" not in metrics


def test_bad_replies_dropped_with_warning(task_identity, caplog):
    good = [client_sd(1), client_sd(2)]
    missing = client_sd(3)
    del missing["base_model.model.fc2.lora_A.weight"]
    nan = client_sd(4)
    nan["base_model.model.fc1.lora_B.weight"][0, 0] = float("nan")
    wrong_shape = client_sd(5)
    wrong_shape["base_model.model.fc1.lora_A.weight"] = torch.randn(R, 13)
    err = Message(Error(code=1, reason="client crashed"), reply_to=instruction(9))
    replies = [reply(1, good[0], 20), err, reply(3, missing, 20), reply(4, nan, 20),
               reply(5, wrong_shape, 20), reply(6, client_sd(6), None),      # no num-examples
               reply(7, client_sd(7), 0), reply(2, good[1], 40)]
    strat = FedMomentumStrategy(rank=R, solver="exact", lora_config=lora_cfg())
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = strat.aggregate_train(1, replies)
    assert arrays is not None
    check_exact(arrays, strat, dense_sum(good, [20, 40]), 1)
    assert metrics["num-clients"] == 2 and metrics["dropped-replies"] == 6
    text = caplog.text
    for what in ("client crashed", "adapter keys differ", "non-finite", "(3, 13), expected n = 12",
                 "num-examples", "node 7"):
        assert what in text, what


def test_all_bad_replies_give_none(task_identity):
    err = Message(Error(code=1, reason="x"), reply_to=instruction(1))
    bad = client_sd(1)
    bad["base_model.model.fc1.lora_A.weight"][:] = float("inf")
    strat = FedMomentumStrategy(rank=R, lora_config=lora_cfg())
    assert strat.aggregate_train(1, [err, reply(2, bad, 5)]) == (None, None)
    assert strat.aggregate_train(1, []) == (None, None)


def test_constructor_rejects_bad_options():
    with pytest.raises(ValueError, match="method"):
        FedMomentumStrategy(method="nope")
    with pytest.raises(ValueError, match="solver"):
        FedMomentumStrategy(solver="nope")
    with pytest.raises(ValueError, match="residual"):
        FedMomentumStrategy(residual="later")
    with pytest.raises(ValueError, match="base"):
        FedMomentumStrategy(residual="server")
    with pytest.raises(ValueError, match="rank"):
        FedMomentumStrategy(rank=0)


def test_inexact_method_energy_nan_skipped(task_identity):
    sds = [client_sd(1), client_sd(2)]
    strat = FedMomentumStrategy(method="fedit", rank=R, lora_config=lora_cfg())
    arrays, metrics = strat.aggregate_train(1, [reply(1, sds[0], 1), reply(2, sds[1], 1)])
    # fedit: plain averages of B and A
    out = arrays.to_torch_state_dict()
    for k in sds[0]:
        torch.testing.assert_close(out[k], (sds[0][k] + sds[1][k]) / 2)
    energies = [r.energy_kept for r in strat.last_aggregation.report]
    finite = [e for e in energies if math.isfinite(e)]
    if finite:
        assert metrics["energy-kept"] == pytest.approx(sum(finite) / len(finite))
    else:
        assert math.isnan(metrics["energy-kept"])


# ----------------------------------------------------------------------------- client side

def effective(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_A", {}):
            out[name] = mod.get_base_layer().weight.detach().double() + \
                mod.get_delta_weight("default").detach().double()
    return out


def test_apply_server_update_exact_idempotent_and_stateless(task_identity):
    model = tiny_peft()
    w0 = {name: model.get_submodule(name).base_layer.weight.detach().double().clone() for name in MODULES}
    sds = [client_sd(1), client_sd(2), client_sd(3)]
    strat = FedMomentumStrategy(rank=R, solver="exact", lora_config=lora_cfg())
    arrays, _ = strat.aggregate_train(1, [reply(i + 1, sd, 10 * (i + 1)) for i, sd in enumerate(sds)])
    ref = dense_sum(sds, [10, 20, 30])
    content = RecordDict({"arrays": arrays,
                          f"{RESIDUAL_RECORD_PREFIX}1": residual_records(strat.residual_history()[1])})

    info = apply_server_update(model, content)
    assert info["merged_rounds"] == [1] and info["adapter_loaded"]
    assert getattr(model, MERGED_THROUGH_ATTR) == 1
    eff = effective(model)
    for name in MODULES:
        torch.testing.assert_close(eff[name], w0[name] + ref[name], atol=1e-5, rtol=1e-5)
    # the same message again merges nothing (kept model)
    assert apply_server_update(model, content)["merged_rounds"] == []
    for name, w in effective(model).items():
        torch.testing.assert_close(w, eff[name], atol=0, rtol=0)

    # stateless client: fresh model each message, residual rounds kept in context.state
    state = RecordDict()
    fresh = tiny_peft()
    apply_server_update(fresh, content, state=state)
    assert f"{RESIDUAL_RECORD_PREFIX}1" in state
    fresh2 = tiny_peft()
    apply_server_update(fresh2, RecordDict({"arrays": arrays}), state=state)   # no residual in msg
    for name, w in effective(fresh2).items():
        torch.testing.assert_close(w, eff[name], atol=1e-6, rtol=1e-6)


def test_apply_server_update_rejects_bad_input_untouched(task_identity):
    model = tiny_peft()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    from fedmomentum import LowRank
    good = {"base_model.model.fc1": LowRank(torch.randn(10, 2), torch.randn(2, 12))}
    bad = {**good, "base_model.model.fc2": LowRank(torch.randn(8, 2), torch.randn(2, 11))}
    with pytest.raises(ValueError, match="fc2"):
        apply_server_update(model, RecordDict({f"{RESIDUAL_RECORD_PREFIX}1": residual_records(bad)}))
    nomod = {"base_model.model.fc9": LowRank(torch.randn(10, 2), torch.randn(2, 12))}
    with pytest.raises(ValueError, match="fc9"):
        apply_server_update(model, RecordDict({f"{RESIDUAL_RECORD_PREFIX}1": residual_records(nomod)}))
    sd = client_sd(1)
    sd["base_model.model.fc2.lora_A.weight"] = torch.randn(R + 1, 10)
    with pytest.raises(ValueError, match="fc2.lora_A"):
        apply_server_update(model, RecordDict({"arrays": ArrayRecord(sd),
                                               f"{RESIDUAL_RECORD_PREFIX}1": residual_records(good)}))
    with pytest.raises(TypeError):
        apply_server_update(model, {"arrays": ArrayRecord(client_sd(1))})
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not hasattr(model, MERGED_THROUGH_ATTR)


def test_server_mode_merged_state_dict(task_identity):
    model = tiny_peft()
    w0 = {name: model.get_submodule(name).base_layer.weight.detach().double().clone() for name in MODULES}
    strat = FedMomentumStrategy(rank=R, solver="exact", residual="server", lora_config=lora_cfg(),
                                base=model)
    sds1 = [client_sd(1), client_sd(2)]
    a1, _ = strat.aggregate_train(1, [reply(1, sds1[0], 1), reply(2, sds1[1], 3)])
    g1 = a1.to_torch_state_dict()
    sds2 = [client_sd(3), client_sd(4)]
    strat.aggregate_train(2, [reply(1, sds2[0], 2), reply(2, sds2[1], 2)])
    assert strat.residual_history() == {}          # nothing is shipped in "server" mode
    d1, d2 = dense_sum(sds1, [1, 3]), dense_sum(sds2, [2, 2])
    merged = strat.merged_state_dict(include_adapter=True)
    base_only = strat.merged_state_dict()
    for name in MODULES:
        key = f"{name}.base_layer.weight"
        s_b1a1 = S * (g1[f"{name}.lora_B.weight"].double() @ g1[f"{name}.lora_A.weight"].double())
        # invariant each round: base_t + s·B_t·A_t = base_{t-1} + ΔW_t
        want = w0[name] + d1[name] - s_b1a1 + d2[name]
        torch.testing.assert_close(merged[key].double(), want, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(base_only[key].double(), w0[name])
    # the live model was not touched (the server keeps a copy)
    for name in MODULES:
        torch.testing.assert_close(model.get_submodule(name).base_layer.weight.double(), w0[name])


# ----------------------------------------------------------------------------- simulation

@pytest.mark.slow
def test_simulation_two_rounds_three_clients_exact(monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(EXAMPLE), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    task = importlib.import_module("fedmomentum_app.task")
    client_app = importlib.import_module("fedmomentum_app.client_app")
    server_app = importlib.import_module("fedmomentum_app.server_app")
    from flwr.simulation import run_simulation

    class Recording(server_app.CheckedFedMomentum):
        """Keeps what the clients sent and what the server returned, per round."""

        def __init__(self, **kw):
            super().__init__(**kw)
            self.sent, self.returned = {}, {}

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            self.sent[server_round] = [
                (m.content["arrays"].to_torch_state_dict(), m.content["metrics"]["num-examples"])
                for m in replies if not m.has_error()]
            arrays, metrics = super().aggregate_train(server_round, replies)
            self.returned[server_round] = arrays.to_torch_state_dict()
            return arrays, metrics

    app, holder = server_app.make_server_app(2, 3, rank=task.RANK, local_steps=3,
                                             strategy_cls=Recording)
    run_simulation(server_app=app, client_app=client_app.app, num_supernodes=3,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    strat, result = holder["strategy"], holder["result"]
    assert sorted(strat.sent) == [1, 2] and all(len(v) == 3 for v in strat.sent.values())
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    for r in (1, 2):
        tm = result.train_metrics_clientapp[r]
        assert math.isfinite(tm["aggregation-seconds"]) and 0 < tm["energy-kept"] <= 1
        assert tm["residual-rank"] > 0

    # independent fp64 reference: every round, base_t + s·B_t·A_t = base_{t-1} + Σ p_k s B_k A_k
    s = task.ALPHA / task.RANK
    base = {k: v.detach().double() for k, v in task.build_model().state_dict().items()}

    def dsum(sent, name):
        tot = sum(n for _, n in sent)
        return sum((n / tot) * s * (sd[f"{name}.lora_B.weight"].double() @ sd[f"{name}.lora_A.weight"].double())
                   for sd, n in sent)

    names = sorted({k.rsplit(".lora_", 1)[0] for k in strat.returned[1]})
    g1 = strat.returned[1]
    eff_clients = strat.effective[2]
    assert len(eff_clients) == 3
    server_view = strat.merged_state_dict(include_adapter=True)
    for name in names:
        b1a1 = s * (g1[f"{name}.lora_B.weight"].double() @ g1[f"{name}.lora_A.weight"].double())
        want = base[f"{name}.base_layer.weight"] + dsum(strat.sent[1], name) - b1a1 + dsum(strat.sent[2], name)
        scale = max(1.0, float(want.abs().max()))
        for node, sd in eff_clients.items():
            err = float((sd[name].double() - want).abs().max())
            assert err <= 2e-5 * scale, (node, name, err)
        err = float((server_view[f"{name}.base_layer.weight"].double() - want).abs().max())
        assert err <= 2e-5 * scale, (name, err)
    assert strat.max_abs_diff[2] <= 2e-5
