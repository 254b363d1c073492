"""Model shapes without weights: every LoRA-targetable linear of a decoder from its config.

A transformers-style ``config.json`` (or its dict) is parsed here directly (no ``transformers``
import in core; ``fedmomentum.shapes`` also accepts a ``PretrainedConfig``). Built-in table:
``llama-8b``, ``llama-70b``, ``llama-405b``, ``qwen2.5-72b``, ``mistral-7b`` with the numbers of
their published config.json files.

Shapes follow the base module's ``nn.Linear.weight``: ``(m, n) = (out_features, in_features)``,
so PEFT's ``lora_B`` is m x r and ``lora_A`` is r x n.

>>> s = model_shapes("llama-70b")
>>> [(t.name, t.m, t.n) for t in s.layer_modules(0)][:2]
[('model.layers.0.self_attn.q_proj', 8192, 8192), ('model.layers.0.self_attn.k_proj', 1024, 8192)]
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

__all__ = ["BUILTIN_CONFIGS", "DEFAULT_TARGETS", "ModuleShape", "ModelShapes", "model_shapes",
           "parse_config", "builtin_names"]

#: short target names -> (module path inside a decoder layer)
_TARGET_PATHS = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
    "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
}
#: default LoRA targets: every linear of a llama-style decoder layer
DEFAULT_TARGETS: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")

_LLAMA3_COMMON = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "attention_bias": False, "mlp_bias": False, "bos_token_id": 128000, "eos_token_id": 128001,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128256,
    "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True,
}

#: The published config.json numbers (Llama-3.1 8B/70B/405B, Qwen2.5-72B, Mistral-7B-v0.1).
BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-8b": {**_LLAMA3_COMMON, "hidden_size": 4096, "intermediate_size": 14336,
                 "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                 "head_dim": 128},
    "llama-70b": {**_LLAMA3_COMMON, "hidden_size": 8192, "intermediate_size": 28672,
                  "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
                  "head_dim": 128},
    "llama-405b": {**_LLAMA3_COMMON, "hidden_size": 16384, "intermediate_size": 53248,
                   "num_hidden_layers": 126, "num_attention_heads": 128, "num_key_value_heads": 8,
                   "head_dim": 128},
    "qwen2.5-72b": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
                    "hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 152064,
                    "max_position_embeddings": 32768, "max_window_layers": 80, "rms_norm_eps": 1e-06,
                    "rope_theta": 1000000.0, "sliding_window": 131072, "use_sliding_window": False,
                    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 151643,
                    "eos_token_id": 151643, "initializer_range": 0.02, "attention_dropout": 0.0,
                    "use_cache": True},
    "mistral-7b": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_act": "silu",
                   "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
                   "max_position_embeddings": 32768, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
                   "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
                   "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.02, "use_cache": True},
}


def builtin_names() -> list[str]:
    """Names accepted by :func:`model_shapes` without a config file."""
    return sorted(BUILTIN_CONFIGS)


@dataclass(frozen=True)
class ModuleShape:
    """One LoRA-targetable linear: ``name`` is its module path (PEFT's, before ``.lora_A``),
    ``kind`` the short target name (q, k, v, o, gate, up, down), ``(m, n)`` = (out, in)."""

    name: str
    kind: str
    layer: int
    m: int
    n: int

    def lora_shapes(self, r: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(lora_B shape, lora_A shape) at rank r: (m, r) and (r, n)."""
        return (self.m, r), (r, self.n)


@dataclass(frozen=True)
class ModelShapes:
    """The targetable linears of a decoder-only model, derived from its config."""

    model: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    targets: tuple[str, ...] = DEFAULT_TARGETS
    config: dict = field(default_factory=dict, compare=False, repr=False)

    def kind_shape(self, kind: str) -> tuple[int, int]:
        """(out, in) of target ``kind`` in every layer."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        table = {"q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q),
                 "gate": (i, h), "up": (i, h), "down": (h, i)}
        return table[kind]

    def layer_modules(self, layer: int) -> list[ModuleShape]:
        """The target modules of decoder layer ``layer`` (0-based), in ``targets`` order."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"model {self.model!r} has {self.num_layers} layers; layer {layer} "
                             "does not exist")
        out = []
        for kind in self.targets:
            m, n = self.kind_shape(kind)
            out.append(ModuleShape(f"model.layers.{layer}.{_TARGET_PATHS[kind]}", kind, layer, m, n))
        return out

    def modules(self, layers: Optional[int] = None) -> Iterator[ModuleShape]:
        """Every target module of the first ``layers`` layers (default all), layer by layer."""
        n = self.num_layers if layers is None else min(int(layers), self.num_layers)
        for layer in range(n):
            yield from self.layer_modules(layer)

    @property
    def modules_per_layer(self) -> int:
        return len(self.targets)

    def lora_parameters(self, r: int, layers: Optional[int] = None) -> int:
        """Number of LoRA parameters (B and A) of one client at rank r."""
        return sum((t.m + t.n) * r for t in self.modules(layers))


def _normalise_targets(targets: Optional[Sequence[str]]) -> tuple[str, ...]:
    if targets is None:
        return DEFAULT_TARGETS
    if isinstance(targets, str):
        targets = [t for t in targets.split(",") if t.strip()]
    out = []
    for t in targets:
        key = str(t).strip()
        key = key[:-5] if key.endswith("_proj") else key
        if key not in _TARGET_PATHS:
            raise ValueError(f"unknown target module {t!r}; choose from {list(DEFAULT_TARGETS)} "
                             "(or their *_proj names)")
        if key not in out:
            out.append(key)
    if not out:
        raise ValueError("target modules must not be empty")
    return tuple(out)


def _positive_int(cfg: Mapping, key: str, where: str) -> int:
    if key not in cfg or cfg[key] is None:
        raise ValueError(f"{where}: config has no {key!r} (needed for the linear shapes; keys present: "
                         f"{sorted(cfg)[:20]})")
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{where}: config {key!r} must be a positive int, got {v!r}")
    return v


def parse_config(config: Mapping[str, Any], *, name: Optional[str] = None,
                 targets: Optional[Sequence[str]] = None) -> ModelShapes:
    """:class:`ModelShapes` of a llama-style decoder (llama, mistral, qwen2/3, gemma, ...) from a
    transformers config dict. A multimodal config's ``text_config`` is used when present."""
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict (a config.json's contents), got {type(config).__name__}")
    cfg = dict(config)
    if "hidden_size" not in cfg and isinstance(cfg.get("text_config"), Mapping):
        cfg = dict(cfg["text_config"])
    where = f"model {name!r}" if name else "config"
    h = _positive_int(cfg, "hidden_size", where)
    i = _positive_int(cfg, "intermediate_size", where)
    layers = _positive_int(cfg, "num_hidden_layers", where)
    heads = _positive_int(cfg, "num_attention_heads", where)
    kv = cfg.get("num_key_value_heads")
    kv = heads if kv is None else kv
    if isinstance(kv, bool) or not isinstance(kv, int) or kv < 1 or heads % kv:
        raise ValueError(f"{where}: num_key_value_heads must be a positive divisor of "
                         f"num_attention_heads={heads}, got {kv!r}")
    hd = cfg.get("head_dim")
    if hd is None:
        if h % heads:
            raise ValueError(f"{where}: hidden_size {h} is not divisible by num_attention_heads {heads} "
                             "and the config gives no head_dim")
        hd = h // heads
    if isinstance(hd, bool) or not isinstance(hd, int) or hd < 1:
        raise ValueError(f"{where}: head_dim must be a positive int, got {hd!r}")
    label = name or str(cfg.get("_name_or_path") or cfg.get("model_type") or "config")
    return ModelShapes(model=label, hidden_size=h, intermediate_size=i, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv, head_dim=hd,
                       targets=_normalise_targets(targets), config=copy.deepcopy(dict(config)))


def model_shapes(model: Union[str, os.PathLike, Mapping[str, Any]], *,
                 targets: Optional[Sequence[str]] = None) -> ModelShapes:
    """Shapes of ``model``: a built-in name (:func:`builtin_names`), a path to a config.json (or
    to a folder holding one), a config dict, or any object with ``to_dict()`` (``PretrainedConfig``).

    ``targets`` defaults to q, k, v, o, gate, up, down (``*_proj`` names accepted).
    """
    if isinstance(model, Mapping):
        return parse_config(model, targets=targets)
    if hasattr(model, "to_dict") and not isinstance(model, (str, os.PathLike)):
        return parse_config(model.to_dict(), name=getattr(model, "_name_or_path", None) or None,
                            targets=targets)
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a built-in name, a config.json path or a config dict, got "
                        f"{type(model).__name__}")
    key = os.fspath(model)
    if key.lower() in BUILTIN_CONFIGS:
        return parse_config(BUILTIN_CONFIGS[key.lower()], name=key.lower(), targets=targets)
    path = key
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"model {key!r} is neither a built-in ({', '.join(builtin_names())}) nor an "
                         "existing config.json file or folder")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{key}: not valid JSON ({e})") from None
    return parse_config(cfg, name=(cfg.get("_name_or_path") if isinstance(cfg, dict) else None) or key,
                        targets=targets)
