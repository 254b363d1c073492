"""The Flower ServerApp: FedMomentumStrategy on the tiny LoRA model.

``make_server_app(...)`` returns the ``ServerApp`` and the strategy it runs (so a script or a
test can read the strategy after the run). The strategy is ``FedMomentumStrategy`` plus one
example-only addition: with ``check=True`` evaluate replies carry each client's effective
weights, compared against the server's own ``merged_state_dict(include_adapter=True)``.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp

import task
from fedmomentum.flower import FedMomentumStrategy, weight_key


class CheckedFedMomentum(FedMomentumStrategy):
    """FedMomentumStrategy that also records the clients' effective weights after each round
    and their largest distance to the server's aggregate (``max_abs_diff[round]``)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.effective: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
        self.max_abs_diff: dict[int, float] = {}

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Optional[MetricRecord]:
        replies = list(replies)
        got = {}
        for m in replies:
            if not m.has_error() and "effective" in m.content.array_records:
                got[m.metadata.src_node_id] = m.content.array_records["effective"].to_torch_state_dict()
        if got:
            self.effective[server_round] = got
            server = self.merged_state_dict(include_adapter=True)
            diff = 0.0
            for sd in got.values():
                for name, w in sd.items():
                    ref = server[weight_key(name, server)].to(torch.float32)
                    diff = max(diff, float((w - ref).abs().max()))
            self.max_abs_diff[server_round] = diff
        return super().aggregate_evaluate(server_round, replies)


def make_server_app(rounds: int = 2, clients: int = 3, *, method: str = "fedmomentum",
                    rank: Optional[int] = None, solver: str = "auto", residual: str = "ship",
                    local_steps: int = 5, check: bool = True, strategy_cls=None):
    """Build the ServerApp; returns ``(app, holder)`` with ``holder["strategy"]`` and
    ``holder["result"]`` filled in once the app has run. ``strategy_cls`` (default
    :class:`CheckedFedMomentum`) may be a subclass, e.g. one that records more."""
    strategy_cls = strategy_cls or CheckedFedMomentum
    app = ServerApp()
    holder: dict = {}

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        model = task.build_model()
        strategy = strategy_cls(
            method=method, rank=rank, solver=solver, residual=residual,
            lora_config=task.lora_config(), base=model,
            fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=clients,
            min_evaluate_nodes=clients, min_available_nodes=clients)
        holder["strategy"] = strategy
        holder["result"] = strategy.start(
            grid=grid, initial_arrays=ArrayRecord(task.adapter_state_dict(model)), num_rounds=rounds,
            train_config=ConfigRecord({"local-steps": local_steps}),
            evaluate_config=ConfigRecord({"report-effective-weights": check}))

    return app, holder
