"""The model and data of the Flower example: a tiny Llama built from a config, PEFT LoRA, and
synthetic next-token data (each client its own token distribution). No downloads."""
from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB, HIDDEN, LAYERS, SEQ = 64, 32, 2, 16
RANK, ALPHA = 4, 8
TARGETS = ["q_proj", "v_proj", "up_proj"]


def lora_config(r: int = RANK, alpha: float = ALPHA) -> LoraConfig:
    """The adapter every client trains (and the server aggregates with)."""
    return LoraConfig(r=int(r), lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGETS,
                      init_lora_weights=True)


def build_model(seed: int = 0, r: int = RANK, alpha: float = ALPHA):
    """A fresh base model + LoRA adapter; identical on the server and every client (same seed)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=SEQ, tie_word_embeddings=False)
    base = LlamaForCausalLM(cfg)
    return get_peft_model(base, lora_config(r, alpha))


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """The adapter in PEFT saved key names (what clients send)."""
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def client_data(partition: int, num_partitions: int, n: int = 64) -> torch.Tensor:
    """``n`` synthetic sequences: a noisy cyclic walk through the vocabulary with a client-specific
    stride, so clients disagree (non-IID) but each has something learnable."""
    g = torch.Generator().manual_seed(1000 + partition)
    stride = 1 + partition % 7
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    seq = (start + stride * torch.arange(SEQ)) % VOCAB
    noise = torch.rand(n, SEQ, generator=g) < 0.1
    return torch.where(noise, torch.randint(0, VOCAB, (n, SEQ), generator=g), seq)


def loss_on(model, data: torch.Tensor) -> float:
    """Mean next-token loss on ``data`` (no gradient)."""
    model.eval()
    with torch.no_grad():
        return float(model(input_ids=data, labels=data).loss)


def train(model, data: torch.Tensor, steps: int = 5, lr: float = 5e-2, batch: int = 16) -> float:
    """A few AdamW steps on the trainable LoRA parameters (``requires_grad``: a factor the
    round freezes, set by ``apply_server_update``, is left as it is); returns the mean loss."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(int(data.sum()))
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, data.shape[0], (batch,), generator=g)
        out = model(input_ids=data[idx], labels=data[idx])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    return sum(losses) / len(losses)


def effective_weights(model, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Per adapted module: base weight (with every merged residual) + s·B·A, via PEFT's own
    ``get_delta_weight``; keyed by the module path of the adapter keys."""
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "get_delta_weight") and adapter_name in getattr(mod, "lora_A", {}):
            w = mod.get_base_layer().weight.detach().to(torch.float32)
            out[name] = w + mod.get_delta_weight(adapter_name).detach().to(torch.float32)
    return out
