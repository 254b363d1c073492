"""Dropouts, in process, on real flwr Messages: a sampled node that never replies is logged by
id and left out (weights renormalised over the replies that arrived), Flower's failure settings
(``accept_failures``, ``min_train_replies``) are followed, and a node that comes back later gets
every residual it missed, so its next update starts from the current global weights. A node that
comes back with the same id but without its state is refused by ``apply_server_update`` (stale
base) and is sent everything again in the next round.

The real processes version (SuperLink, SuperNodes, SIGKILL) is tests/test_flower_deployment.py."""
from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("peft")

from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict  # noqa: E402

from fedmomentum.flower import (  # noqa: E402
    RESIDUAL_INDEX_KEY, RESIDUAL_RECORD_PREFIX, FedMomentumStrategy, apply_server_update)
from test_flower import (MODULES, R, S, client_sd, dense_sum, effective, lora_cfg,  # noqa: E402
                         task_identity, tiny_peft)

from flower_grid import Nodes  # noqa: E402

__all__ = ["task_identity"]   # the fixture, imported for pytest


def strategy(**kw) -> FedMomentumStrategy:
    base = tiny_peft()
    return FedMomentumStrategy(rank=R, solver="exact", lora_config=lora_cfg(), base=base,
                               min_available_nodes=1, min_train_nodes=1, **kw)


def train_round(strat, rnd, nodes, replies_from, seeds, arrays=None, errors=()):
    """configure_train for ``nodes``, replies from ``replies_from`` (seeded adapters, weights
    10·node), error replies from ``errors``; returns (messages, arrays, metrics)."""
    arrays = arrays if arrays is not None else ArrayRecord(client_sd(99))
    msgs = list(strat.configure_train(rnd, arrays, ConfigRecord(), Nodes(nodes)))
    replies = []
    for m in msgs:
        node = m.metadata.dst_node_id
        if node in errors:
            replies.append(Message(Error(code=1, reason="client crashed"), reply_to=m))
        elif node in replies_from:
            content = RecordDict({"arrays": ArrayRecord(client_sd(seeds[node])),
                                  "metrics": MetricRecord({"num-examples": 10 * node})})
            replies.append(Message(content, reply_to=m))
    new, metrics = strat.aggregate_train(rnd, replies)
    return msgs, new, metrics


def test_missing_node_logged_and_weights_renormalised(task_identity, caplog):
    strat = strategy()
    seeds = {1: 11, 2: 12, 3: 13}
    with caplog.at_level(logging.INFO, logger="flwr"):
        _, arrays, metrics = train_round(strat, 1, [1, 2, 3], replies_from=[1, 3], seeds=seeds)
    assert "round 1: no reply from node(s) [2]" in caplog.text
    assert metrics["missing-replies"] == 1 and metrics["num-clients"] == 2
    assert strat.round_nodes[1] == {"sent": [1, 2, 3], "aggregated": [1, 3], "failed": [],
                                    "missing": [2]}
    ref = dense_sum([client_sd(11), client_sd(13)], [10, 30])     # p = 1/4, 3/4: over arrivals
    sd = arrays.to_torch_state_dict()
    res = strat.residual_history().get(1, {})
    for name, delta in ref.items():
        got = S * (sd[f"{name}.lora_B.weight"].double() @ sd[f"{name}.lora_A.weight"].double())
        if name in res:
            got = got + res[name].to_dense(torch.float64)
        assert float((got - delta).abs().max()) <= 1e-5 * max(1.0, float(delta.abs().max()))


def test_accept_failures_false_and_min_replies_keep_previous(task_identity, caplog):
    seeds = {1: 11, 2: 12, 3: 13}
    strat = strategy(accept_failures=False)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        _, arrays, metrics = train_round(strat, 1, [1, 2, 3], replies_from=[1, 3], seeds=seeds)
    assert (arrays, metrics) == (None, None)
    assert "accept_failures=False" in caplog.text
    _, arrays, _ = train_round(strat, 2, [1, 2, 3], replies_from=[1, 2, 3], seeds=seeds)
    assert arrays is not None                          # no failure: aggregated
    _, arrays, _ = train_round(strat, 3, [1, 2, 3], replies_from=[1, 2], seeds=seeds, errors=[3])
    assert arrays is None                              # an error reply is a failure too

    strat = strategy(min_train_replies=3)
    _, arrays, _ = train_round(strat, 1, [1, 2, 3], replies_from=[1, 3], seeds=seeds)
    assert arrays is None
    with pytest.raises(ValueError, match="min_train_replies"):
        strategy(min_train_replies=0)
    with pytest.raises(TypeError, match="accept_failures"):
        strategy(accept_failures="no")


def _client_view(msg: Message, state: RecordDict):
    """A stateless ClientApp: fresh base model + apply_server_update(state=context.state)."""
    model = tiny_peft()
    apply_server_update(model, msg.content, state=state)
    return effective(model)


def _server_view(strat):
    merged = strat.merged_state_dict(include_adapter=True)
    return {name: merged[f"{name}.base_layer.weight"].double() for name in MODULES}


def test_node_back_after_dropout_gets_every_missed_residual(task_identity):
    strat = strategy()
    seeds = {1: 11, 2: 12, 3: 13}
    states = {n: RecordDict() for n in (1, 2, 3)}
    _, g1, _ = train_round(strat, 1, [1, 2, 3], replies_from=[1, 2, 3], seeds=seeds)
    assert strat.residual_history()[1]
    # round 2: node 2 receives residual 1, then drops out before replying
    msgs, g2, _ = train_round(strat, 2, [1, 2, 3], replies_from=[1, 3], seeds=seeds, arrays=g1)
    for m in msgs:
        if m.metadata.dst_node_id != 2:
            _client_view(m, states[m.metadata.dst_node_id])
    assert strat.residual_history()[2]
    # round 3: node 2 is back (its message carries rounds 1 and 2), nodes 1, 3 only round 2
    msgs = {m.metadata.dst_node_id: m for m in strat.configure_train(3, g2, ConfigRecord(), Nodes([1, 2, 3]))}
    shipped = {n: sorted(int(k[len(RESIDUAL_RECORD_PREFIX):]) for k in m.content.keys()
                         if k.startswith(RESIDUAL_RECORD_PREFIX)) for n, m in msgs.items()}
    assert shipped == {1: [2], 2: [1, 2], 3: [2]}
    assert all(list(m.content[RESIDUAL_INDEX_KEY]["rounds"]) == [1, 2] for m in msgs.values())
    want = _server_view(strat)                   # base + residuals 1, 2 + s·B2·A2
    for n in (1, 2, 3):
        eff = _client_view(msgs[n], states[n])
        for name in MODULES:
            torch.testing.assert_close(eff[name], want[name], atol=2e-5, rtol=2e-5)


def test_node_back_without_its_state_is_refused_then_resent_everything(task_identity):
    strat = strategy()
    seeds = {1: 11, 2: 12}
    states = {1: RecordDict(), 2: RecordDict()}
    _, g1, _ = train_round(strat, 1, [1, 2], replies_from=[1, 2], seeds=seeds)
    msgs, g2, _ = train_round(strat, 2, [1, 2], replies_from=[1, 2], seeds=seeds, arrays=g1)
    for m in msgs:
        _client_view(m, states[m.metadata.dst_node_id])       # both merged round 1 and replied
    msgs = {m.metadata.dst_node_id: m for m in strat.configure_train(3, g2, ConfigRecord(), Nodes([1, 2]))}
    # node 2 restarted with the same id but an empty state: round 1 is gone
    model = tiny_peft()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"stale base: .*round\(s\) \[1\]"):
        apply_server_update(model, msgs[2].content, state=RecordDict())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # its ClientApp fails, the reply is an error; the strategy ships it everything next round
    replies = [Message(Error(code=1, reason="stale base"), reply_to=msgs[2]),
               Message(RecordDict({"arrays": ArrayRecord(client_sd(21)),
                                   "metrics": MetricRecord({"num-examples": 5})}), reply_to=msgs[1])]
    g3, _ = strat.aggregate_train(3, replies)
    msgs = {m.metadata.dst_node_id: m for m in strat.configure_train(4, g3, ConfigRecord(), Nodes([1, 2]))}
    shipped = sorted(int(k[len(RESIDUAL_RECORD_PREFIX):]) for k in msgs[2].content.keys()
                     if k.startswith(RESIDUAL_RECORD_PREFIX))
    assert shipped == sorted(strat.residual_history())
    eff = _client_view(msgs[2], RecordDict())
    want = _server_view(strat)
    for name in MODULES:
        torch.testing.assert_close(eff[name], want[name], atol=2e-5, rtol=2e-5)
