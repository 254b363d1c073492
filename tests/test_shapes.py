"""Model shapes without weights, checked against the linears transformers builds from the same config."""
from __future__ import annotations

import json

import pytest
import torch

from fedmomentum_core.shapes import BUILTIN_CONFIGS, DEFAULT_TARGETS, builtin_names, model_shapes

transformers = pytest.importorskip("transformers")

_PATHS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
          "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def _meta_layer_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of every linear of decoder layer 0, from a transformers model built on the meta
    device from ``cfg`` with one layer (no weights allocated)."""
    cfg = dict(cfg, num_hidden_layers=1)
    conf = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(conf)
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers.0."):
            out[name] = tuple(mod.weight.shape)
    return out


def test_builtin_names():
    assert builtin_names() == sorted(["llama-8b", "llama-70b", "llama-405b", "qwen2.5-72b", "mistral-7b"])


@pytest.mark.parametrize("name", sorted(BUILTIN_CONFIGS))
def test_builtin_shapes_match_transformers(name):
    s = model_shapes(name)
    ref = _meta_layer_shapes(BUILTIN_CONFIGS[name])
    mods = s.layer_modules(0)
    assert [t.kind for t in mods] == list(DEFAULT_TARGETS)
    assert {t.name: (t.m, t.n) for t in mods} == ref  # every linear of the layer, same shapes
    assert s.num_layers == BUILTIN_CONFIGS[name]["num_hidden_layers"]


@pytest.mark.parametrize("name,hidden,inter,layers,kv", [
    ("llama-8b", 4096, 14336, 32, 8), ("llama-70b", 8192, 28672, 80, 8),
    ("llama-405b", 16384, 53248, 126, 8), ("qwen2.5-72b", 8192, 29568, 80, 8),
    ("mistral-7b", 4096, 14336, 32, 8)])
def test_builtin_numbers(name, hidden, inter, layers, kv):
    s = model_shapes(name)
    assert (s.hidden_size, s.intermediate_size, s.num_layers, s.num_kv_heads, s.head_dim) == \
        (hidden, inter, layers, kv, 128)
    assert s.kind_shape("k") == (kv * 128, hidden)
    assert s.kind_shape("down") == (hidden, inter)
    assert len(list(s.modules())) == 7 * layers


def test_llama70b_issue_shapes():
    s = model_shapes("llama-70b")
    got = {t.kind: (t.m, t.n) for t in s.layer_modules(79)}
    assert got == {"q": (8192, 8192), "k": (1024, 8192), "v": (1024, 8192), "o": (8192, 8192),
                   "gate": (28672, 8192), "up": (28672, 8192), "down": (8192, 28672)}
    assert s.layer_modules(79)[0].name == "model.layers.79.self_attn.q_proj"
    B, A = s.layer_modules(0)[4].lora_shapes(16)
    assert B == (28672, 16) and A == (16, 8192)


def test_config_sources_agree(tmp_path):
    cfg = {"model_type": "llama", "hidden_size": 96, "intermediate_size": 160, "num_hidden_layers": 3,
           "num_attention_heads": 6, "num_key_value_heads": 2}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    a = model_shapes(cfg)
    b = model_shapes(tmp_path / "config.json")
    c = model_shapes(str(tmp_path))  # a folder holding config.json
    d = model_shapes(transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
    want = [(t.name, t.m, t.n) for t in a.modules()]
    for other in (b, c, d):
        assert [(t.name, t.m, t.n) for t in other.modules()] == want
    assert a.kind_shape("k") == (32, 96) and a.kind_shape("q") == (96, 96)  # head_dim 16, 2 kv heads
    assert _meta_layer_shapes(cfg) == {t.name: (t.m, t.n) for t in a.layer_modules(0)}


def test_head_dim_and_text_config():
    cfg = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32}
    s = model_shapes({"text_config": cfg})
    assert s.kind_shape("q") == (128, 64) and s.kind_shape("o") == (64, 128)
    assert s.kind_shape("v") == (32, 64)


def test_targets_selection():
    s = model_shapes("mistral-7b", targets=["q_proj", "v_proj", "down"])
    assert [t.kind for t in s.layer_modules(0)] == ["q", "v", "down"]
    s2 = model_shapes("mistral-7b", targets="q,v")
    assert len(list(s2.modules(layers=2))) == 4


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="intermediate_size"):
        model_shapes({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4})
    with pytest.raises(ValueError, match="num_key_value_heads"):
        model_shapes({"hidden_size": 64, "intermediate_size": 8, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="neither a built-in"):
        model_shapes("llama-7000b")
    with pytest.raises(ValueError, match="unknown target"):
        model_shapes("llama-8b", targets=["qkv_proj"])
    with pytest.raises(TypeError):
        model_shapes(42)
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        model_shapes(bad)
    with pytest.raises(ValueError, match="80 layers"):
        model_shapes("llama-70b").layer_modules(80)
