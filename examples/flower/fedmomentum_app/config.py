"""The app's run config (``[tool.flwr.app.config]`` in ``pyproject.toml``), checked in one place.

Key names follow Flower's FlowerTune LLM template (``num-server-rounds``, ``model.lora.*``,
``strategy.*``, ``train.*``) so that a FlowerTune app takes the ``strategy.*`` keys below as they
are. ``parse_run_config`` runs first thing in the ServerApp: a bad value stops the run before any
message is sent to a client, with one message naming every bad key.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import fedmomentum
from fedmomentum_core import SOLVERS

RESIDUAL_MODES = ("ship", "server")


@dataclass(frozen=True)
class AppConfig:
    num_server_rounds: int = 2
    lora_r: int = 4
    lora_alpha: float = 8.0
    method: str = "fedmomentum"
    solver: str = "auto"
    residual: str = "ship"
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_nodes: int = 2
    accept_failures: bool = True
    round_timeout: float = 600.0
    local_steps: int = 5
    learning_rate: float = 5e-2
    output_dir: str = ""


# run-config key -> (AppConfig field, expected python types)
KEYS: dict[str, tuple[str, tuple[type, ...]]] = {
    "num-server-rounds": ("num_server_rounds", (int,)),
    "model.lora.peft-lora-r": ("lora_r", (int,)),
    "model.lora.peft-lora-alpha": ("lora_alpha", (int, float)),
    "strategy.method": ("method", (str,)),
    "strategy.solver": ("solver", (str,)),
    "strategy.residual": ("residual", (str,)),
    "strategy.fraction-train": ("fraction_train", (int, float)),
    "strategy.fraction-evaluate": ("fraction_evaluate", (int, float)),
    "strategy.min-nodes": ("min_nodes", (int,)),
    "strategy.accept-failures": ("accept_failures", (bool,)),
    "strategy.round-timeout": ("round_timeout", (int, float)),
    "train.local-steps": ("local_steps", (int,)),
    "train.learning-rate": ("learning_rate", (int, float)),
    "output-dir": ("output_dir", (str,)),
}


def parse_run_config(run_config: Mapping[str, Any]) -> AppConfig:
    """``context.run_config`` -> :class:`AppConfig`; ``ValueError`` listing every bad key.

    Unknown keys are ignored (Flower apps may add their own); a missing key takes the default.
    """
    errors: list[str] = []
    values: dict[str, Any] = {}
    for key, (field, types) in KEYS.items():
        if key not in run_config:
            continue
        v = run_config[key]
        ok = isinstance(v, types) and not (bool not in types and isinstance(v, bool))
        if not ok:
            errors.append(f"{key} = {v!r}: expected {' or '.join(t.__name__ for t in types)}")
            continue
        values[field] = float(v) if float in types and not isinstance(v, bool) else v
    cfg = AppConfig(**values)

    if cfg.num_server_rounds < 1:
        errors.append(f"num-server-rounds = {cfg.num_server_rounds}: must be >= 1")
    if cfg.lora_r < 1:
        errors.append(f"model.lora.peft-lora-r = {cfg.lora_r}: the LoRA rank must be >= 1")
    if not cfg.lora_alpha > 0:
        errors.append(f"model.lora.peft-lora-alpha = {cfg.lora_alpha}: must be > 0")
    if cfg.method not in fedmomentum.METHODS:
        errors.append(f"strategy.method = {cfg.method!r}: unknown method; choose one of "
                      f"{sorted(fedmomentum.METHODS)}")
    if cfg.solver != "auto" and cfg.solver not in SOLVERS:
        errors.append(f"strategy.solver = {cfg.solver!r}: choose auto or one of {sorted(SOLVERS)}")
    if cfg.residual not in RESIDUAL_MODES:
        errors.append(f"strategy.residual = {cfg.residual!r}: choose one of {list(RESIDUAL_MODES)}")
    for key, v in (("strategy.fraction-train", cfg.fraction_train),
                   ("strategy.fraction-evaluate", cfg.fraction_evaluate)):
        if not 0.0 <= v <= 1.0:
            errors.append(f"{key} = {v}: must be in [0, 1]")
    if cfg.min_nodes < 1:
        errors.append(f"strategy.min-nodes = {cfg.min_nodes}: must be >= 1")
    if not cfg.round_timeout > 0:
        errors.append(f"strategy.round-timeout = {cfg.round_timeout}: must be > 0 seconds")
    if cfg.local_steps < 1:
        errors.append(f"train.local-steps = {cfg.local_steps}: must be >= 1")
    if not cfg.learning_rate > 0:
        errors.append(f"train.learning-rate = {cfg.learning_rate}: must be > 0")
    if errors:
        raise ValueError("bad run config (pyproject.toml [tool.flwr.app.config] or --run-config):\n  "
                         + "\n  ".join(errors))
    return cfg
