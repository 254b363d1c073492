"""Experiment driver: every (method, seed) of a config, and ``convergence.csv``."""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from torch import nn

from .data import TextDataset, dirichlet_split, load_bbc_news, stratified_split
from .federation import ExperimentConfig, Federation
from .model import _bert_parts, build_federated_model, encode_prefix, load_encoder


#: The columns of ``convergence.csv``, in order.
CSV_COLUMNS = ("method", "round", "seed", "train_loss", "eval_accuracy", "eval_loss",
               "aggregation_seconds", "energy_kept")


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


