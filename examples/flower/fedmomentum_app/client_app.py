"""The Flower ClientApp: train / evaluate the tiny LoRA model on local synthetic data.

Every message builds a fresh base model (as Flower ClientApps usually do) and calls
``fedmomentum.flower.apply_server_update(model, msg.content, state=context.state)``, which merges
every residual round the server has shipped so far into the base weights and loads the new
adapter. That one call is the whole client-side change from a FedAvg LoRA app. For methods whose
clients train one factor (ffa_lora and fedsvd: B; rolora: B in odd rounds, A in even ones) the
train message says which (``fedmomentum.flower.TRAIN_FACTORS_KEY``) and the same call freezes
the other one (``requires_grad=False``); :func:`.task.train` optimises only parameters with
``requires_grad``. For methods whose clients keep their own B (fedsa_lora: the server sends
lora_A only), the node keeps its trained lora_B in ``context.state`` and puts it back after
``apply_server_update``. For methods with a round-0 initialisation (ilora), every fresh base
model gets it first (``fedmomentum.peft.initialise_method_``), as the server's model did.

Node config (``flower-supernode --node-config "..."``; in the simulation Flower sets both):
``partition-id`` and ``num-partitions`` pick this node's data. Two more keys exist for the
dropout drill of the tests: ``pause-round`` / ``pause-seconds`` make the node wait (after
writing ``<output-dir>/clients/node-<id>/round-<t>-paused``) before training in that round, so
that a test can kill the SuperNode in the middle of the round.
"""
from __future__ import annotations

import time

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from peft import set_peft_model_state_dict

import fedmomentum
from fedmomentum.flower import TRAIN_FACTORS_KEY, apply_server_update
from fedmomentum.peft import initialise_method_

from . import artifacts, task
from .config import parse_run_config

app = ClientApp()

#: context.state key of this node's own LoRA factors (methods whose clients keep their own B)
OWN_FACTORS_KEY = "fedmomentum-app-own-factors"


def _keeps_own_B(msg: Message) -> bool:
    rec = msg.content.get(TRAIN_FACTORS_KEY) if TRAIN_FACTORS_KEY in msg.content else None
    spec = fedmomentum.METHODS.get(rec.get("method")) if isinstance(rec, ConfigRecord) else None
    return bool(spec is not None and spec.keeps_client_B)


def _restore_own_factors(model, msg: Message, context: Context) -> None:
    """Put back this node's kept factors that the message's adapter does not carry."""
    own = context.state.get(OWN_FACTORS_KEY) if OWN_FACTORS_KEY in context.state else None
    if not isinstance(own, ArrayRecord):
        return
    sent = set(msg.content["arrays"].keys()) if "arrays" in msg.content.array_records else set()
    missing = {k: v for k, v in own.to_torch_state_dict().items() if k not in sent}
    if missing:
        set_peft_model_state_dict(model, missing)


def _setup(msg: Message, context: Context):
    cfg = parse_run_config(context.run_config)
    model = task.build_model(r=cfg.lora_r, alpha=cfg.lora_alpha)
    if fedmomentum.METHODS[cfg.method].init is not None:
        # the method's round-0 initialisation of the base (deterministic: the server did the same
        # to its copy before sending the initial adapter), before the shipped residuals are merged
        initialise_method_(model, cfg.method)
    info = apply_server_update(model, msg.content, state=context.state)
    _restore_own_factors(model, msg, context)
    part = int(context.node_config.get("partition-id", 0))
    parts = int(context.node_config.get("num-partitions", 1))
    return cfg, model, task.client_data(part, parts), info


def _record(cfg, msg: Message, context: Context, kind: str, model, info) -> None:
    """With ``output-dir`` set: this client's effective weights after apply_server_update."""
    if not cfg.output_dir:
        return
    rnd = int(msg.content["config"].get("server-round", 0))
    where = artifacts.client_dir(cfg.output_dir, context.node_id)
    meta = {"node-id": context.node_id, "server-round": rnd, "kind": kind,
            "partition-id": int(context.node_config.get("partition-id", 0)),
            "merged-rounds": info["merged_rounds"], "trains": info.get("trains")}
    artifacts.save_tensors(where / f"round-{rnd:03d}-{kind}.safetensors", task.effective_weights(model))
    artifacts.save_json(where / f"round-{rnd:03d}-{kind}.json", meta)


def _maybe_pause(cfg, msg: Message, context: Context) -> None:
    rnd = int(msg.content["config"].get("server-round", 0))
    if int(context.node_config.get("pause-round", 0)) != rnd:
        return
    if cfg.output_dir:
        artifacts.save_json(artifacts.client_dir(cfg.output_dir, context.node_id)
                            / f"round-{rnd:03d}-paused", {"node-id": context.node_id})
    time.sleep(float(context.node_config.get("pause-seconds", 30)))


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local LoRA training; replies with the adapter (PEFT saved keys) and num-examples."""
    cfg, model, data, info = _setup(msg, context)
    _record(cfg, msg, context, "train", model, info)
    _maybe_pause(cfg, msg, context)
    steps = int(msg.content["config"].get("local-steps", cfg.local_steps))
    loss = task.train(model, data, steps=steps, lr=cfg.learning_rate)
    adapter = task.adapter_state_dict(model)
    if _keeps_own_B(msg):
        context.state[OWN_FACTORS_KEY] = ArrayRecord({k: v for k, v in adapter.items()
                                                      if ".lora_B." in k})
    content = RecordDict({
        "arrays": ArrayRecord(adapter),
        "metrics": MetricRecord({"train-loss": loss, "num-examples": int(data.shape[0])}),
    })
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Local loss of the global model. With config ``report-effective-weights`` the reply also
    carries this client's effective weights (base + merged residuals + s·B·A) to check exactness."""
    cfg, model, data, info = _setup(msg, context)
    _record(cfg, msg, context, "evaluate", model, info)
    content = RecordDict({"metrics": MetricRecord({"eval-loss": task.loss_on(model, data),
                                                   "num-examples": int(data.shape[0])})})
    if bool(msg.content["config"].get("report-effective-weights", False)):
        content["effective"] = ArrayRecord({k: v.contiguous() for k, v in
                                            task.effective_weights(model).items()})
    return Message(content=content, reply_to=msg)
