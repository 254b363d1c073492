"""Per-round files the app writes when the run config sets ``output-dir`` (off by default).

Layout (``<out>`` = ``output-dir``)::

    <out>/server/run.json                    the parsed run config and the LoRA scale s = alpha/r
    <out>/server/base-initial.safetensors    base weight of every adapted module, keyed by module
    <out>/server/round-003/replies/node-<id>.safetensors   each train reply's adapter
    <out>/server/round-003/round.json        weights ("num-examples") of the replies, node ids
                                             sent / aggregated / failed / missing, metrics
    <out>/server/round-003/global.safetensors   the round's global adapter (if aggregated)
    <out>/server/round-003/residual.safetensors the round's residual (<module>.residual_left/right)
    <out>/server/done.json                   written last, when the ServerApp finished
    <out>/clients/node-<id>/round-003-train.safetensors     a client's effective weights after
    <out>/clients/node-<id>/round-003-evaluate.safetensors  apply_server_update (base + merged
                                                            residuals + s·B·A), + .json beside

Every file is written to a temporary sibling and renamed, so a reader never sees half a file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None) -> None:
    sd = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _atomic(Path(path), lambda p: save_file(sd, str(p), metadata={k: str(v) for k, v in (meta or {}).items()}))


def save_json(path: Path, obj: Any) -> None:
    def write(p: Path) -> None:
        p.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str))
    _atomic(Path(path), write)


def round_dir(out: str | Path, server_round: int) -> Path:
    return Path(out) / "server" / f"round-{server_round:03d}"


def client_dir(out: str | Path, node_id: int) -> Path:
    return Path(out) / "clients" / f"node-{node_id}"
