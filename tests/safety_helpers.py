"""Synthetic PEFT adapter folders and a float64 oracle for the data-safety tests (no transformers).

* :func:`make_adapter` writes ``adapter_model.safetensors`` + ``adapter_config.json`` with seeded
  LoRA factors for a few modules (keys as ``PeftModel.save_pretrained`` writes them).
* :func:`reference_delta` is Σ_k p_k s_k B_k A_k per module in float64, read from the files.
* :func:`output_delta` is s·B·A + residual per module in float64, read from an output folder.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Optional, Sequence

import torch

MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj")
SHAPES = {"q_proj": (16, 16), "down_proj": (16, 24)}  # (out, in)
PREFIX = "base_model.model."


def module_shape(name: str) -> tuple[int, int]:
    return SHAPES[name.rsplit(".", 1)[-1]]


def make_adapter(d: Path, seed: int, *, r: int = 4, alpha: float = 8, use_rslora: bool = False,
                 base: str = "tiny-base", dtype: torch.dtype = torch.float32, modules: Sequence[str] = MODULES,
                 extra_config: Optional[dict] = None) -> Path:
    from safetensors.torch import save_file

    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in modules:
        m, n = module_shape(name)
        sd[f"{PREFIX}{name}.lora_A.weight"] = (torch.randn(r, n, generator=g) / math.sqrt(n)).to(dtype)
        sd[f"{PREFIX}{name}.lora_B.weight"] = (torch.randn(m, r, generator=g) * 0.3).to(dtype)
    save_file(sd, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": use_rslora,
           "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}), "lora_dropout": 0.0,
           "bias": "none", "fan_in_fan_out": False, "base_model_name_or_path": base,
           "rank_pattern": {}, "alpha_pattern": {}, "task_type": "CAUSAL_LM"}
    cfg.update(extra_config or {})
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d


def _pattern(patterns: dict, name: str, default):
    for key, val in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", name):
            return val
    return default


def _scale(cfg: dict, name: str) -> float:
    r = _pattern(cfg.get("rank_pattern"), name, cfg["r"])
    a = _pattern(cfg.get("alpha_pattern"), name, cfg["lora_alpha"])
    return a / math.sqrt(r) if cfg.get("use_rslora") else a / r


def reference_delta(dirs: Sequence[Path], weights: Optional[Sequence[float]] = None) -> dict[str, torch.Tensor]:
    """{module: Σ_k p_k s_k B_k A_k} in float64 (module names without the PEFT prefix)."""
    from safetensors.torch import load_file

    w = [1.0] * len(dirs) if weights is None else [float(x) for x in weights]
    p = [x / sum(w) for x in w]
    acc: dict[str, torch.Tensor] = {}
    for pk, d in zip(p, dirs):
        sd = load_file(str(Path(d) / "adapter_model.safetensors"))
        cfg = json.loads((Path(d) / "adapter_config.json").read_text())
        for k, a in sd.items():
            if not k.endswith(".lora_A.weight"):
                continue
            name = k[len(PREFIX): -len(".lora_A.weight")]
            b = sd[k.replace("lora_A", "lora_B")]
            dw = pk * _scale(cfg, name) * (b.double() @ a.double())
            acc[name] = acc[name] + dw if name in acc else dw
    return acc


def output_delta(out: Path) -> dict[str, torch.Tensor]:
    """{module: s·B·A + residual} in float64 from an output adapter folder."""
    from safetensors.torch import load_file

    out = Path(out)
    sd = load_file(str(out / "adapter_model.safetensors"))
    cfg = json.loads((out / "adapter_config.json").read_text())
    res = load_file(str(out / "residual.safetensors")) if (out / "residual.safetensors").exists() else {}
    got: dict[str, torch.Tensor] = {}
    for k, a in sd.items():
        if not k.endswith(".lora_A.weight"):
            continue
        name = k[len(PREFIX): -len(".lora_A.weight")]
        b = sd[k.replace("lora_A", "lora_B")]
        dw = _scale(cfg, name) * (b.double() @ a.double())
        left = res.get(f"{PREFIX}{name}.residual_left")
        if left is not None:
            dw = dw + left.double() @ res[f"{PREFIX}{name}.residual_right"].double()
        got[name] = dw
    return got


def max_rel_err(got: dict, ref: dict) -> float:
    assert set(got) == set(ref), (sorted(got), sorted(ref))
    return max(float((got[k] - ref[k]).norm() / max(ref[k].norm(), 1e-30)) for k in ref)


def listing(root: Path) -> list[str]:
    """Every path under root (relative, sorted), to compare before/after."""
    out = []
    for dp, dn, fn in os.walk(root):
        for n in dn + fn:
            out.append(os.path.relpath(os.path.join(dp, n), root))
    return sorted(out)
