"""The Flower ClientApp: train / evaluate the tiny LoRA model on local synthetic data.

Every message builds a fresh base model (as Flower ClientApps usually do) and calls
``fedmomentum.flower.apply_server_update(model, msg.content, state=context.state)``, which merges
every residual round the server has shipped so far into the base weights and loads the new
adapter.
"""
from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import task
from fedmomentum.flower import apply_server_update

app = ClientApp()


def _setup(msg: Message, context: Context):
    model = task.build_model()
    info = apply_server_update(model, msg.content, state=context.state)
    part = int(context.node_config.get("partition-id", 0))
    parts = int(context.node_config.get("num-partitions", 1))
    return model, task.client_data(part, parts), info


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local LoRA training; replies with the adapter (PEFT saved keys) and num-examples."""
    model, data, _ = _setup(msg, context)
    steps = int(msg.content["config"].get("local-steps", 5))
    loss = task.train(model, data, steps=steps)
    content = RecordDict({
        "arrays": ArrayRecord(task.adapter_state_dict(model)),
        "metrics": MetricRecord({"train-loss": loss, "num-examples": int(data.shape[0])}),
    })
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Local loss of the global model. With config ``report-effective-weights`` the reply also
    carries this client's effective weights (base + merged residuals + s·B·A) to check exactness."""
    model, data, _ = _setup(msg, context)
    content = RecordDict({"metrics": MetricRecord({"eval-loss": task.loss_on(model, data),
                                                   "num-examples": int(data.shape[0])})})
    if bool(msg.content["config"].get("report-effective-weights", False)):
        content["effective"] = ArrayRecord({k: v.contiguous() for k, v in
                                            task.effective_weights(model).items()})
    return Message(content=content, reply_to=msg)
