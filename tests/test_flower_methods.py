"""FedMomentumStrategy runs every method of ``fedmomentum.METHODS`` on real flwr Messages:
round-dependent options (rolora's ``round``, fedrot_lora's ``round`` and ``reference``) come from
Flower's server_round and the adapter configure_train sent, train messages say which LoRA factors
the clients train (``TRAIN_FACTORS_KEY``, applied by ``apply_server_update``), and per-client
methods (flexlora) send each node its own-rank adapter.

References are float64 dense restatements computed here from the replies."""
from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("peft")

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

import fedmomentum  # noqa: E402
from fedmomentum.flower import TRAIN_FACTORS_KEY, FedMomentumStrategy, apply_server_update  # noqa: E402
from test_flower import (ALPHA, EXAMPLE, MODULES, R, S, Tiny, client_sd, lora_cfg,  # noqa: E402
                         task_identity, tiny_peft)

from flower_grid import Nodes  # noqa: E402

__all__ = ["task_identity"]   # the fixture, imported for pytest


def strategy(method: str, **kw) -> FedMomentumStrategy:
    return FedMomentumStrategy(method=method, rank=kw.pop("rank", R), lora_config=lora_cfg(),
                               min_available_nodes=1, min_train_nodes=1, **kw)


def reply_to(msg: Message, sd: dict, n: int) -> Message:
    content = RecordDict({"arrays": ArrayRecord({k: v.clone() for k, v in sd.items()}),
                          "metrics": MetricRecord({"num-examples": n})})
    return Message(content, reply_to=msg)


def factors(sd, name):
    return sd[f"{name}.lora_B.weight"], sd[f"{name}.lora_A.weight"]


def train_record(msg: Message) -> dict:
    return dict(msg.content[TRAIN_FACTORS_KEY])


def global_adapter(seed: int, zero_B: bool = False) -> dict[str, torch.Tensor]:
    sd = client_sd(seed)
    if zero_B:   # PEFT's initialisation: B = 0
        for name in MODULES:
            sd[f"{name}.lora_B.weight"].zero_()
    return sd


def p_of(ns):
    tot = float(sum(ns))
    return [n / tot for n in ns]


# ----------------------------------------------------------------------------- (a) rolora

def test_rolora_two_rounds_alternate_and_match_dense(task_identity):
    strat = strategy("rolora", solver="exact")
    g0 = global_adapter(90, zero_B=True)
    ns = {1: 10, 2: 30, 3: 60}
    p = p_of(ns.values())

    # round 1: B only, A shared (the one configure_train sent)
    msgs = list(strat.configure_train(1, ArrayRecord(g0), ConfigRecord(), Nodes([1, 2, 3])))
    assert len(msgs) == 3
    for m in msgs:
        assert train_record(m) == {"factors": ["B"], "round": 1, "method": "rolora"}
    sds1 = {}
    for m in msgs:
        node = m.metadata.dst_node_id
        sd = client_sd(node)
        for name in MODULES:   # the client trained B with A frozen
            sd[f"{name}.lora_A.weight"] = g0[f"{name}.lora_A.weight"].clone()
        sds1[node] = sd
    g1_rec, metrics = strat.aggregate_train(1, [reply_to(m, sds1[m.metadata.dst_node_id],
                                                         ns[m.metadata.dst_node_id]) for m in msgs])
    assert g1_rec is not None and metrics["num-clients"] == 3
    g1 = g1_rec.to_torch_state_dict()
    for name in MODULES:
        B1, A1 = factors(g1, name)
        A0 = g0[f"{name}.lora_A.weight"].double()
        Bbar = sum(pk * sds1[k][f"{name}.lora_B.weight"].double() for pk, k in zip(p, ns))
        torch.testing.assert_close(A1.double(), A0, rtol=0, atol=0)
        torch.testing.assert_close(B1.double(), Bbar, rtol=1e-6, atol=1e-6)
        dense = sum(pk * S * (sds1[k][f"{name}.lora_B.weight"].double() @ A0) for pk, k in zip(p, ns))
        torch.testing.assert_close(S * B1.double() @ A1.double(), dense, rtol=1e-5, atol=1e-5)

    # round 2: A only, B shared (the round-1 aggregate)
    msgs = list(strat.configure_train(2, g1_rec, ConfigRecord(), Nodes([1, 2, 3])))
    for m in msgs:
        assert train_record(m) == {"factors": ["A"], "round": 2, "method": "rolora"}
    sds2 = {}
    for m in msgs:
        node = m.metadata.dst_node_id
        sd = client_sd(10 + node)
        for name in MODULES:
            sd[f"{name}.lora_B.weight"] = g1[f"{name}.lora_B.weight"].clone()
        sds2[node] = sd
    g2_rec, _ = strat.aggregate_train(2, [reply_to(m, sds2[m.metadata.dst_node_id],
                                                   ns[m.metadata.dst_node_id]) for m in msgs])
    assert g2_rec is not None
    g2 = g2_rec.to_torch_state_dict()
    for name in MODULES:
        B2, A2 = factors(g2, name)
        torch.testing.assert_close(B2, g1[f"{name}.lora_B.weight"], rtol=0, atol=0)
        Abar = sum(pk * sds2[k][f"{name}.lora_A.weight"].double() for pk, k in zip(p, ns))
        torch.testing.assert_close(A2.double(), Abar, rtol=1e-6, atol=1e-6)

    # the round-2 message freezes B on the client
    model = tiny_peft()
    info = apply_server_update(model, msgs[0])
    assert info["trains"] == ["A"]
    for n, prm in model.named_parameters():
        if ".lora_A." in n:
            assert prm.requires_grad, n
        elif ".lora_B." in n:
            assert not prm.requires_grad, n


# ----------------------------------------------------------------------------- (b) fedrot_lora

@pytest.mark.parametrize("lam", [None, 0.7])
def test_fedrot_lora_reference_is_what_configure_train_sent(task_identity, lam):
    opts = {} if lam is None else {"lam": lam}
    strat = strategy("fedrot_lora", method_options=opts or None)
    ns = {1: 5, 2: 7, 3: 11}
    p = p_of(ns.values())
    # round 2's start is NOT round 1's output: the reference must be what configure_train sent
    for rnd, sent_seed in ((1, 90), (2, 91)):
        sent = global_adapter(sent_seed)
        msgs = list(strat.configure_train(rnd, ArrayRecord(sent), ConfigRecord(), Nodes(list(ns))))
        assert all(train_record(m)["factors"] == ["A", "B"] for m in msgs)
        sds = {m.metadata.dst_node_id: client_sd(20 * rnd + m.metadata.dst_node_id) for m in msgs}
        new, _ = strat.aggregate_train(rnd, [reply_to(m, sds[m.metadata.dst_node_id],
                                                      ns[m.metadata.dst_node_id]) for m in msgs])
        assert new is not None, rnd
        got = new.to_torch_state_dict()
        for name in MODULES:
            want = fedmomentum.aggregate_lora(
                [sds[k][f"{name}.lora_B.weight"] for k in ns], [sds[k][f"{name}.lora_A.weight"] for k in ns],
                p, rank=R, scalings=S, method="fedrot_lora",
                method_options={"round": rnd, "reference": factors(sent, name), **opts})
            B, A = factors(got, name)
            torch.testing.assert_close(B, want.B, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(A, want.A, rtol=1e-6, atol=1e-6)
            # and it is not the unrotated average (the rotation did something)
            plain = sum(pk * sds[k][f"{name}.lora_A.weight"] for pk, k in zip(p, ns))
            assert float((A - plain).abs().max()) > 1e-3


# ----------------------------------------------------------------------------- (c) flexlora

def test_flexlora_heterogeneous_ranks_each_node_gets_its_own_adapter(task_identity):
    strat = strategy("flexlora", rank=3, solver="exact")
    ranks = {1: 2, 2: 3, 3: 3}
    ns = {1: 10, 2: 20, 3: 30}
    p = p_of(ns.values())
    msgs = list(strat.configure_train(1, ArrayRecord(global_adapter(90)), ConfigRecord(),
                                      Nodes([1, 2, 3])))
    sds = {k: client_sd(k, rank=ranks[k]) for k in ranks}
    new, metrics = strat.aggregate_train(1, [reply_to(m, sds[m.metadata.dst_node_id],
                                                      ns[m.metadata.dst_node_id]) for m in msgs])
    assert new is not None and metrics["num-clients"] == 3
    glob = new.to_torch_state_dict()
    for name in MODULES:   # the strategy's result is the global adapter (rank `rank`)
        assert glob[f"{name}.lora_A.weight"].shape[0] == 3

    # next round: node k gets its own rank; node 4 (not aggregated last round) the global one
    msgs2 = {m.metadata.dst_node_id: m for m in
             strat.configure_train(2, new, ConfigRecord(), Nodes([1, 2, 3, 4]))}
    for name in MODULES:
        dW = sum(pk * (ALPHA / ranks[k]) * (sds[k][f"{name}.lora_B.weight"].double()
                                             @ sds[k][f"{name}.lora_A.weight"].double())
                 for pk, k in zip(p, ranks))
        U, Sv, Vh = torch.linalg.svd(dW, full_matrices=False)
        for k, rk in ranks.items():
            own = msgs2[k].content["arrays"].to_torch_state_dict()
            B, A = factors(own, name)
            assert tuple(B.shape) == (MODULES[name][0], rk) and tuple(A.shape) == (rk, MODULES[name][1])
            top = (U[:, :rk] * Sv[:rk]) @ Vh[:rk]
            got = (ALPHA / rk) * (B.double() @ A.double())     # the scale node k's PEFT applies
            err = float((got - top).abs().max())
            assert err <= 1e-5 * float(dW.abs().max()), (name, k, err)
        B4, A4 = factors(msgs2[4].content["arrays"].to_torch_state_dict(), name)
        torch.testing.assert_close(A4, glob[f"{name}.lora_A.weight"], rtol=0, atol=0)
        torch.testing.assert_close(B4, glob[f"{name}.lora_B.weight"], rtol=0, atol=0)

    # a rank-2 client loads its adapter; evaluate messages carry the node's own adapter too
    model = get_peft_model(Tiny(), LoraConfig(r=2, lora_alpha=ALPHA, target_modules=["fc1", "fc2"]))
    assert apply_server_update(model, msgs2[1])["adapter_loaded"]
    ev = {m.metadata.dst_node_id: m for m in strat.configure_evaluate(1, new, ConfigRecord(), Nodes([1, 2]))}
    assert tuple(ev[1].content["arrays"]["base_model.model.fc1.lora_A.weight"].shape) == (2, 12)
    assert TRAIN_FACTORS_KEY not in ev[1].content


# ----------------------------------------------------------------------------- (d) client side

@pytest.mark.parametrize("method", ["ffa_lora", "fedsvd"])
def test_apply_server_update_freezes_A_for_B_only_methods(task_identity, method):
    strat = strategy(method)
    msg = next(iter(strat.configure_train(1, ArrayRecord(global_adapter(90)), ConfigRecord(), Nodes([1]))))
    assert train_record(msg) == {"factors": ["B"], "round": 1, "method": method}
    model = tiny_peft()
    info = apply_server_update(model, msg)
    assert info["trains"] == ["B"] and info["adapter_loaded"]
    seen = {"A": 0, "B": 0}
    for n, prm in model.named_parameters():
        if ".lora_A." in n:
            assert not prm.requires_grad, n
            seen["A"] += 1
        elif ".lora_B." in n:
            assert prm.requires_grad, n
            seen["B"] += 1
    assert seen == {"A": len(MODULES), "B": len(MODULES)}
    # a message without the record leaves requires_grad alone; a fedmomentum one trains both
    assert apply_server_update(model, RecordDict({"arrays": ArrayRecord(client_sd(1))}))["trains"] is None
    assert not model.get_submodule("base_model.model.fc1").lora_A["default"].weight.requires_grad
    both = next(iter(strategy("fedmomentum").configure_train(
        1, ArrayRecord(global_adapter(90)), ConfigRecord(), Nodes([1]))))
    assert apply_server_update(model, both)["trains"] == ["A", "B"]
    assert all(prm.requires_grad for n, prm in model.named_parameters() if ".lora_" in n)


def test_example_app_clients_train_only_the_factor_the_round_says(task_identity):
    """The example ClientApp on an in-process grid, rolora for 2 rounds: each round aggregates
    (rolora refuses replies whose frozen factor differs), A is unchanged by round 1, B by round 2."""
    from flower_grid import InProcessGrid
    if str(EXAMPLE) not in sys.path:
        sys.path.insert(0, str(EXAMPLE))
    from fedmomentum_app import client_app, task
    run_config = {"train.local-steps": 2}
    model = task.build_model()
    strat = FedMomentumStrategy(method="rolora", rank=task.RANK, lora_config=model.peft_config["default"],
                                min_available_nodes=2, min_train_nodes=2, min_evaluate_nodes=2)
    grid = InProcessGrid(client_app.app, {101: {"partition-id": 0, "num-partitions": 2},
                                          202: {"partition-id": 1, "num-partitions": 2}}, run_config)
    g0 = task.adapter_state_dict(model)
    returned = {}
    agg = strat.aggregate_train

    def keep(rnd, replies):
        out = agg(rnd, replies)
        returned[rnd] = None if out[0] is None else out[0].to_torch_state_dict()
        return out

    strat.aggregate_train = keep
    result = strat.start(grid=grid, initial_arrays=ArrayRecord(g0), num_rounds=2,
                         train_config=ConfigRecord({"local-steps": 2}))
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    for key, t in g0.items():
        if ".lora_A." in key:
            torch.testing.assert_close(returned[1][key], t, rtol=0, atol=0)
            assert not torch.equal(returned[2][key], t), key
        else:
            assert not torch.equal(returned[1][key], t), key
            torch.testing.assert_close(returned[2][key], returned[1][key], rtol=0, atol=0)


def test_fedsa_lora_replies_with_own_B_accepted_and_example_clients_keep_their_B(task_identity, monkeypatch):
    """fedsa_lora: the global adapter is A only, the replies carry the clients' own B as well
    (accepted from round 2 on), and the example ClientApp starts round 2 from its own round-1 B."""
    from flower_grid import InProcessGrid
    if str(EXAMPLE) not in sys.path:
        sys.path.insert(0, str(EXAMPLE))
    from fedmomentum_app import client_app, task
    model = task.build_model()
    strat = FedMomentumStrategy(method="fedsa_lora", rank=task.RANK, lora_config=model.peft_config["default"],
                                min_available_nodes=2, min_train_nodes=2, min_evaluate_nodes=2)
    grid = InProcessGrid(client_app.app, {101: {"partition-id": 0, "num-partitions": 2},
                                          202: {"partition-id": 1, "num-partitions": 2}}, {})
    started, replied, sent = {}, {}, {}
    train = task.train

    def recording_train(m, data, **kw):
        b = {n: prm.detach().clone() for n, prm in m.named_parameters() if ".lora_B." in n}
        started.setdefault(int(data.sum()), []).append(b)
        return train(m, data, **kw)

    monkeypatch.setattr(task, "train", recording_train)
    send = grid.send_and_receive

    def recording_send(messages, **kw):
        messages = list(messages)
        out = send(messages, **kw)
        for msg, rep in zip(messages, out):
            if msg.metadata.message_type == "train":
                sent.setdefault(msg.metadata.dst_node_id, []).append(set(msg.content["arrays"].keys()))
                replied.setdefault(msg.metadata.dst_node_id, []).append(
                    rep.content["arrays"].to_torch_state_dict())
        return out

    grid.send_and_receive = recording_send
    result = strat.start(grid=grid, initial_arrays=ArrayRecord(task.adapter_state_dict(model)), num_rounds=2,
                         train_config=ConfigRecord({"local-steps": 2}))
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    assert strat.round_nodes[2]["aggregated"] == [101, 202]
    for node in (101, 202):
        assert not any(".lora_B." in k for k in sent[node][1])        # round 2: A only
        assert any(".lora_B." in k for k in replied[node][1])         # the node's own B came back
    # round 2 started from each node's own round-1 B (matched by the node's data fingerprint)
    assert len(started) == 2
    for starts in started.values():
        assert len(starts) == 2
        node = next(n for n in (101, 202) if all(
            torch.equal(v, replied[n][0][k.replace(".default", "")]) for k, v in starts[1].items()))
        assert node in (101, 202)


# ----------------------------------------------------------------------------- (e) static options

@pytest.mark.parametrize("method, options, words", [
    ("rolora", {"lam": 0.5}, ["'rolora'", "'lam'", "'round'"]),            # unknown key: what it accepts
    ("fedmomentum", {"lam": 0.5}, ["'fedmomentum'", "no options"]),
    ("flexlora", {"client_ranks": [2, 3]}, ["'flexlora'", "client_ranks", "own rank"]),
    ("hetlora", {"client_ranks": [2, 3]}, ["'hetlora'", "client_ranks"]),
    ("rolora", {"round": 3}, ["'rolora'", "'round'", "server_round"]),
    ("fedrot_lora", {"reference": {}}, ["'fedrot_lora'", "'reference'"]),
    ("fedrot_lora", {"lam": 2.0}, ["'fedrot_lora'", "'lam'", "[0, 1]"]),  # bad value
])
def test_bad_static_options_raise_at_construction(method, options, words):
    with pytest.raises(ValueError) as e:
        FedMomentumStrategy(method=method, method_options=options)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_good_static_options_and_aggregate_kwargs_conflict():
    strat = FedMomentumStrategy(method="fedrot_lora", method_options={"lam": 1})
    assert strat.method_options == {"lam": 1.0}
    assert FedMomentumStrategy(method="rolora").method_options == {}
    with pytest.raises(ValueError, match="method_options="):
        FedMomentumStrategy(method="fedrot_lora", aggregate_kwargs={"method_options": {"lam": 0.1}})


def test_example_app_runs_ilora_with_its_initialisation_on_server_and_clients(task_identity):
    """ilora's init trait in the example app: the server initialises its model before sending the
    initial adapter (B = Q[:, :r], not PEFT's zeros), every client does the same to its fresh
    base, so after each round the clients' effective weights equal the server's view (with only
    one side initialised they would differ by s·B0·A0)."""
    from flower_grid import InProcessGrid
    if str(EXAMPLE) not in sys.path:
        sys.path.insert(0, str(EXAMPLE))
    from fedmomentum_app import client_app, config, server_app, task
    run_config = {"strategy.method": "ilora", "strategy.residual": "server", "num-server-rounds": 2,
                  "train.local-steps": 2, "strategy.min-nodes": 2}
    cfg = config.parse_run_config(run_config)
    grid = InProcessGrid(client_app.app, {101: {"partition-id": 0, "num-partitions": 2},
                                          202: {"partition-id": 1, "num-partitions": 2}}, run_config)
    sent = {}
    start = FedMomentumStrategy.start

    def spy(self, *, grid, initial_arrays, **kw):
        sent["initial"] = initial_arrays.to_torch_state_dict()
        return start(self, grid=grid, initial_arrays=initial_arrays, **kw)

    FedMomentumStrategy.start = spy
    try:
        strat, result = server_app.run(grid, cfg, check=True, strategy_cls=server_app.CheckedFedMomentum)
    finally:
        FedMomentumStrategy.start = start
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    for key, t in sent["initial"].items():
        if ".lora_B." in key:
            assert float(t.norm()) > 0, key
            torch.testing.assert_close(t.T @ t, torch.eye(t.shape[1]), atol=1e-5, rtol=0)
    assert sorted(strat.max_abs_diff) == [1, 2]
    assert max(strat.max_abs_diff.values()) < 1e-5, strat.max_abs_diff
