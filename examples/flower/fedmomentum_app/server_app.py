"""The Flower ServerApp: FedMomentumStrategy on the tiny LoRA model.

``app`` is the component named in ``pyproject.toml`` (``flwr run``): it reads the run config
(:mod:`.config`; a bad value stops the run here, before any client is sent a message), builds the
strategy and runs it. ``make_server_app(...)`` builds the same app from Python arguments for an
in-process ``run_simulation`` and returns the strategy it ran (tests, ``run_simulation.py``).

The strategy is ``FedMomentumStrategy`` plus two example-only additions: evaluate replies carry
each client's effective weights, compared against the server's own
``merged_state_dict(include_adapter=True)`` (logged per round), and with ``output-dir`` set every
round's replies, global adapter and residual are written to disk (:mod:`.artifacts`).
"""
from __future__ import annotations

from dataclasses import asdict, replace
from logging import INFO, WARNING
from pathlib import Path
from typing import Iterable, Optional

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

import fedmomentum
from fedmomentum.flower import FedMomentumStrategy, weight_key
from fedmomentum.peft import initialise_method_

from . import artifacts, task
from .config import KEYS, AppConfig, parse_run_config


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
        if got and self._base is not None:
            self.effective[server_round] = got
            server = self.merged_state_dict(include_adapter=True)
            diff = 0.0
            for sd in got.values():
                for name, w in sd.items():
                    ref = server[weight_key(name, server)].to(torch.float32)
                    diff = max(diff, float((w - ref).abs().max()))
            self.max_abs_diff[server_round] = diff
            log(INFO, "round %d: max |client effective weight - server base+residuals+s*B*A| = "
                "%.2e over %d clients", server_round, diff, len(got))
        return super().aggregate_evaluate(server_round, replies)


class ArtifactFedMomentum(CheckedFedMomentum):
    """CheckedFedMomentum that writes each round's inputs and outputs under ``output_dir``."""

    def __init__(self, *, output_dir: str = "", **kwargs):
        super().__init__(**kwargs)
        self.output_dir = output_dir

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if not self.output_dir:
            return arrays, metrics
        where = artifacts.round_dir(self.output_dir, server_round)
        weights = {}
        for m in replies:
            if m.has_error() or self.arrayrecord_key not in m.content.array_records:
                continue
            node = m.metadata.src_node_id
            artifacts.save_tensors(where / "replies" / f"node-{node}.safetensors",
                                   m.content.array_records[self.arrayrecord_key].to_torch_state_dict())
            mr = next((r for r in m.content.metric_records.values() if self.weighted_by_key in r), {})
            weights[str(node)] = mr.get(self.weighted_by_key)
        if arrays is not None:
            artifacts.save_tensors(where / "global.safetensors", arrays.to_torch_state_dict())
            res = self.residual_history().get(server_round, {})
            sd = {}
            for name, lr in res.items():
                sd[name + ".residual_left"] = lr.left
                sd[name + ".residual_right"] = lr.right
            if sd:   # no file: this round left no residual (e.g. one reply, rank <= r)
                artifacts.save_tensors(where / "residual.safetensors", sd)
        artifacts.save_json(where / "round.json", {
            "weights": weights, "nodes": self.round_nodes.get(server_round, {}),
            "aggregated": arrays is not None,
            "metrics": dict(metrics) if metrics is not None else None})
        return arrays, metrics


def build_strategy(cfg: AppConfig, model, strategy_cls=None) -> FedMomentumStrategy:
    """The strategy for run config ``cfg``: FlowerTune's ``strategy.*`` keys map one to one."""
    strategy_cls = strategy_cls or ArtifactFedMomentum
    kwargs = dict(
        method=cfg.method, rank=cfg.lora_r, solver=cfg.solver, residual=cfg.residual,
        lora_config=model.peft_config["default"], base=model,   # as in FLOWERTUNE.md
        accept_failures=cfg.accept_failures,
        fraction_train=cfg.fraction_train, fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_nodes, min_evaluate_nodes=cfg.min_nodes,
        min_available_nodes=cfg.min_nodes)
    if issubclass(strategy_cls, ArtifactFedMomentum):
        kwargs["output_dir"] = cfg.output_dir
    return strategy_cls(**kwargs)


def run(grid: Grid, cfg: AppConfig, *, check: bool = True, strategy_cls=None):
    """Run ``cfg.num_server_rounds`` rounds; returns ``(strategy, result)``."""
    model = task.build_model(r=cfg.lora_r, alpha=cfg.lora_alpha)
    if fedmomentum.METHODS[cfg.method].init is not None:  # e.g. ilora: the clients do the same
        initialise_method_(model, cfg.method)
    strategy = build_strategy(cfg, model, strategy_cls)
    if cfg.output_dir:
        out = Path(cfg.output_dir) / "server"
        artifacts.save_json(out / "run.json", {**asdict(cfg), "scale": cfg.lora_alpha / cfg.lora_r,
                                               "fedmomentum-file": fedmomentum.__file__})
        artifacts.save_tensors(out / "base-initial.safetensors",
                               {name: mod.get_base_layer().weight for name, mod in model.named_modules()
                                if hasattr(mod, "get_base_layer") and hasattr(mod, "lora_A")})
        artifacts.save_tensors(out / "global-initial.safetensors", task.adapter_state_dict(model))
    result = strategy.start(
        grid=grid, initial_arrays=ArrayRecord(task.adapter_state_dict(model)),
        num_rounds=cfg.num_server_rounds, timeout=cfg.round_timeout,
        train_config=ConfigRecord({"local-steps": cfg.local_steps}),
        evaluate_config=ConfigRecord({"report-effective-weights": check}))
    for r in range(1, cfg.num_server_rounds + 1):
        if r not in result.train_metrics_clientapp:
            log(WARNING, "round %d: not aggregated (no usable replies); the adapter of the round "
                "before was kept", r)
    if cfg.output_dir:
        artifacts.save_json(Path(cfg.output_dir) / "server" / "done.json", {
            "rounds": cfg.num_server_rounds,
            "aggregated-rounds": sorted(result.train_metrics_clientapp),
            "max-abs-diff": strategy.max_abs_diff if hasattr(strategy, "max_abs_diff") else {}})
    return strategy, result


# ----------------------------------------------------------------------------- the component

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """``flwr run``'s entry point: the run config decides everything (see ``pyproject.toml``)."""
    cfg = parse_run_config(context.run_config)   # ValueError before any client is contacted
    log(INFO, "fedmomentum app: %s", cfg)
    run(grid, cfg)


def make_server_app(rounds: int = 2, clients: int = 3, *, method: str = "fedmomentum",
                    rank: Optional[int] = None, solver: str = "auto", residual: str = "ship",
                    local_steps: int = 5, check: bool = True, strategy_cls=None):
    """Build a ServerApp from Python arguments; returns ``(app, holder)`` with
    ``holder["strategy"]`` and ``holder["result"]`` filled in once the app has run.
    ``strategy_cls`` (default :class:`CheckedFedMomentum`) may be a subclass."""
    cfg = parse_run_config({})
    cfg = replace(cfg, num_server_rounds=rounds, method=method, solver=solver, residual=residual,
                  local_steps=local_steps, min_nodes=clients,
                  lora_r=task.RANK if rank is None else rank)
    cfg = parse_run_config({k: getattr(cfg, f) for k, (f, _) in KEYS.items()})  # flwr run's checks
    server_app = ServerApp()
    holder: dict = {}

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        holder["strategy"], holder["result"] = run(grid, cfg, check=check,
                                                   strategy_cls=strategy_cls or CheckedFedMomentum)

    return server_app, holder
