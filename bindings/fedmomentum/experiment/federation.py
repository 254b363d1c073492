"""Experiment federation: the config, one (method, seed) run's server and clients, the training loop.

Method behaviour is read from the registry's traits (``fedmomentum_core.get_method``), never from
method names: which factors clients train in a round (``trains_in(round)``: FFA-LoRA and FedSVD B
only, RoLoRA B in odd rounds and A in even ones), whether a client keeps its own B (FedSA-LoRA),
the method's options (``round``: the server round, 1-based; ``reference``: the global adapter the
round started from, for FedRot-LoRA; other options keep their defaults) and a round-0
initialisation (``init``: ILoRA's QR initialisation of the global adapter and base)."""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from fedmomentum_core import get_method

from ..peft.merge import initialise_method_

_OPT_STATES = ("reset", "kept")


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
        from fedmomentum_core import METHODS
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

        from fedmomentum_core import METHODS

        config.validate()
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
        self.model, self.train_data, self.test_data = model, train, test
        self.clients = [np.asarray(c) for c in client_indices]
        self.method, self.cfg, self.seed = method, config, seed
        self.traits = get_method(method)  # what the method does: asked, never compared by name
        self.lora: dict[str, Any] = {n: mod for n, mod in model.named_modules()
                                     if isinstance(mod, LoraLayer) and "default" in mod.lora_A}
        if not self.lora:
            raise ValueError("the model has no LoRA modules")
        self.head_params = {n: p for n, p in model.named_parameters()
                            if "modules_to_save" in n and p.requires_grad}
        self.client_B: dict[int, dict[str, torch.Tensor]] = {}  # fedsa_lora: each client's own B
        if self.traits.init is not None:  # the method's round-0 initialisation (ILoRA's QR):
            initialise_method_(model, method)  # adapter and base become (B, A, W0 − s·B·A)
        self.init_B = {n: B for n, (B, _) in self.adapter().items()}  # PEFT's B = 0 (or the init's)
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

    def _trainable(self, rnd: int) -> list[nn.Parameter]:
        """The parameters clients train in round ``rnd``: the LoRA factors the method trains then
        (``trains_in(rnd)``; the others frozen) and the head."""
        trains = self.traits.trains_in(rnd)
        params = []
        for n, m in self.lora.items():
            a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
            a.requires_grad_("A" in trains)
            b.requires_grad_("B" in trains)
            params += ([a] if "A" in trains else []) + ([b] if "B" in trains else [])
        return params + list(self.head_params.values())

    def method_options(self, rnd: int, reference: Optional[dict] = None) -> Optional[dict]:
        """The options the method declares that the loop knows (``MethodSpec.loop_options``):
        ``round`` (the server round) and ``reference`` (the global adapter the round started from,
        module -> (B, A)); None when the method takes neither."""
        return self.traits.loop_options(rnd, reference) or None

    def _client_seed(self, rnd: int, k: int) -> int:
        return (self.seed * 1_000_003 + rnd * 10_007 + k) % (2 ** 31)

    # -- one client
    def local_train(self, k: int, rnd: int, server_adapter, server_head) -> ClientUpdate:
        """Client k: start from the server's adapter and head, take E AdamW steps, return factors."""
        ad = dict(server_adapter)
        if self.traits.keeps_client_B:  # the client's own B (PEFT's init until it has trained)
            own = self.client_B.get(k, self.init_B)
            ad = {n: (own[n], A) for n, (_, A) in ad.items()}
        self._set_adapter(ad)
        self._set_head(server_head)
        params = self._trainable(rnd)
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
        if self.traits.keeps_client_B:
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

    def aggregate(self, updates: Sequence[ClientUpdate], rnd: int,
                  reference: Optional[dict] = None) -> tuple[float, float]:
        """Aggregate every LoRA module with the method; returns (seconds, mean energy_kept).
        ``reference``: the global adapter the round started from (module -> (B, A)), given to
        methods that take it (:meth:`method_options`)."""
        import fedmomentum as fm

        w = [float(u.num_examples) for u in updates]
        tot = sum(w)
        t0 = time.perf_counter()
        new: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        energies = []
        to_merge: dict[str, Any] = {}
        mo = self.method_options(rnd, reference)
        for n, mod in self.lora.items():
            s = self.scaling(n)
            r = mod.lora_A["default"].weight.shape[0]
            res = fm.aggregate_lora([u.lora[n][0] for u in updates], [u.lora[n][1] for u in updates], w,
                                    rank=r, scalings=s, method=self.method, solver=self.cfg.solver,
                                    generator=self.gen, name=n, method_options=mo)
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
            if not self.traits.defers_residual or rnd % self.cfg.merge_every == 0:
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
        secs, energy = self.aggregate(updates, rnd, reference=server_adapter)
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


