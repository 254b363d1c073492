"""examples/flower/FLOWERTUNE.md: what a FlowerTune LLM user changes to use FedMomentumStrategy.

The documented server snippet is executed as written (strategy from the run config, LoRA
config and base from the template's ``init_model``), the app's ClientApp (which makes the
documented ``apply_server_update`` call) trains a tiny Llama on two in-process nodes for two
rounds, and every client's effective weights must equal the server's
``merged_state_dict(include_adapter=True)``. The run-config keys the document adds must be the
app's, with the same defaults."""
from __future__ import annotations

import re
import sys

import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("peft")

from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict  # noqa: E402

from flower_grid import InProcessGrid  # noqa: E402
from test_flower import task_identity  # noqa: E402,F401  (fixture)
from test_flower_app import APP, pyproject_run_config  # noqa: E402

if str(APP) not in sys.path:
    sys.path.insert(0, str(APP))
from fedmomentum_app import client_app, task  # noqa: E402

DOC = (APP / "FLOWERTUNE.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC, flags=re.S)


def test_doc_snippets_match_the_app():
    py = blocks("python")
    client_line = "apply_server_update(model, msg.content, state=context.state)"
    assert any(client_line in b for b in py)
    assert client_line in (APP / "fedmomentum_app" / "client_app.py").read_text()
    toml = blocks("toml")[0]
    run_config = pyproject_run_config()
    for line in toml.strip().splitlines():
        key, value = [x.strip() for x in line.split("#")[0].split("=", 1)]
        assert key in run_config, key
        assert run_config[key] == value.strip('"'), (key, run_config[key], value)
    for key in ("model.lora.peft-lora-r", "model.lora.peft-lora-alpha",
                "strategy.fraction-train", "strategy.fraction-evaluate"):
        assert key in run_config                  # the FlowerTune keys the doc relies on


def test_documented_swap_runs_exact_on_a_tiny_llama(task_identity):  # noqa: F811
    server_snippet = next(b for b in blocks("python") if "FedMomentumStrategy(" in b)
    run_config = {**pyproject_run_config(), "train.local-steps": 2}
    init_model = task.build_model(r=run_config["model.lora.peft-lora-r"],
                                  alpha=run_config["model.lora.peft-lora-alpha"])
    ns = {"context": Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                             run_config=run_config),
          "init_model": init_model, "fraction_train": 1.0, "fraction_evaluate": 1.0}
    exec(server_snippet, ns)                                          # noqa: S102 - the doc, as written
    strategy = ns["strategy"]
    grid = InProcessGrid(client_app.app, {101: {"partition-id": 0, "num-partitions": 2},
                                          202: {"partition-id": 1, "num-partitions": 2}}, run_config)
    replies = []
    send = grid.send_and_receive
    grid.send_and_receive = lambda messages, **kw: replies.append(out := send(messages, **kw)) or out
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(task.adapter_state_dict(init_model)),
                            num_rounds=2, train_config=ConfigRecord({"local-steps": 2}),
                            evaluate_config=ConfigRecord({"report-effective-weights": True}))
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    assert result.train_metrics_clientapp[2]["residual-rank"] > 0    # something was shipped
    last_eval = replies[-1]
    server = strategy.merged_state_dict(include_adapter=True)
    assert len(last_eval) == 2
    for msg in last_eval:
        eff = msg.content.array_records["effective"].to_torch_state_dict()
        for name, w in eff.items():
            ref = server[f"{name}.base_layer.weight"].to(torch.float32)
            assert float((w - ref).abs().max()) <= 1e-5 * max(1.0, float(ref.abs().max())), name
