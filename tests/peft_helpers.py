"""Builders for tests with real transformers + peft objects (built from configs, no downloads).

Reusable by other test files::

    from peft_helpers import build_llama_base, build_clients, reference_model, logits

* :func:`build_llama_base` / :func:`build_gpt2_base` save a tiny random model folder.
* :func:`build_clients` saves K PEFT adapter folders on that base with seeded, non-zero LoRA
  weights (PEFT initialises B to zero; we perturb A and B with a seeded generator), each with its
  own LoraConfig kwargs (rank, alpha, rsLoRA, rank_pattern, ...).
* :func:`reference_model` is the independent oracle: the base model with Σ_k p_k ΔW_k merged in
  float64, ΔW_k taken from PEFT's own ``LoraLayer.get_delta_weight`` (so PEFT's scaling and
  orientation rules are the reference, not ours).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama_config(hidden: int = 64, layers: int = 2, vocab: int = 128, intermediate: int = 128,
                      heads: int = 4, kv_heads: int = 2):
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, vocab_size=vocab,
                       intermediate_size=intermediate, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, max_position_embeddings=64,
                       tie_word_embeddings=False)


def tiny_gpt2_config(hidden: int = 32, layers: int = 2, vocab: int = 100, heads: int = 2):
    from transformers import GPT2Config
    return GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, vocab_size=vocab, n_positions=64)


def _save_model(config, path: Path, seed: int):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32).eval()
    model.save_pretrained(str(path))
    return path


def build_llama_base(path: Path, seed: int = 0, **config_kwargs) -> Path:
    """Save a tiny random LlamaForCausalLM (hidden 64, 2 layers by default) to ``path``."""
    return _save_model(tiny_llama_config(**config_kwargs), Path(path), seed)


def build_gpt2_base(path: Path, seed: int = 0, **config_kwargs) -> Path:
    """Save a tiny random GPT2LMHeadModel (Conv1D layers) to ``path``."""
    return _save_model(tiny_gpt2_config(**config_kwargs), Path(path), seed)


def load_base(path: Path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def build_clients(base_dir: Path, root: Path, configs: Sequence[dict], seed: int = 0,
                  scale: float = 0.3) -> list[Path]:
    """Save one PEFT adapter folder per LoraConfig kwargs dict in ``configs`` under ``root``
    (``root/c0``, ``root/c1``, ...), LoRA A and B filled with seeded random values."""
    from peft import LoraConfig, get_peft_model

    root = Path(root)
    dirs = []
    for k, kw in enumerate(configs):
        base = load_base(base_dir)
        kw = dict(kw)
        kw.setdefault("target_modules", LLAMA_TARGETS)
        kw.setdefault("lora_dropout", 0.0)
        model = get_peft_model(base, LoraConfig(**kw))
        g = torch.Generator().manual_seed(1000 * seed + k)
        with torch.no_grad():
            for name, prm in model.named_parameters():
                if "lora_" in name:
                    prm.copy_(torch.randn(prm.shape, generator=g) * scale / max(1, prm.shape[-1]) ** 0.5)
        d = root / f"c{k}"
        model.save_pretrained(str(d))
        dirs.append(d)
    return dirs


def reference_model(base_dir: Path, client_dirs: Sequence[Path], weights: Optional[Sequence[float]] = None):
    """The base model with W += Σ_k p_k ΔW_k (fp64 accumulation), ΔW_k from PEFT's get_delta_weight."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    K = len(client_dirs)
    w = [1.0] * K if weights is None else [float(x) for x in weights]
    p = [x / sum(w) for x in w]
    acc: dict[str, torch.Tensor] = {}
    for pk, d in zip(p, client_dirs):
        pm = PeftModel.from_pretrained(load_base(base_dir), str(d))
        for name, mod in pm.base_model.model.named_modules():
            if isinstance(mod, LoraLayer):
                dw = mod.get_delta_weight("default").to(torch.float64) * pk
                acc[name] = acc[name] + dw if name in acc else dw
    ref = load_base(base_dir)
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for name, dw in acc.items():
            w_ = mods[name].weight
            w_.copy_((w_.to(torch.float64) + dw).to(w_.dtype))
    return ref


def input_ids(vocab: int = 100, batch: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.to(torch.float64)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())
