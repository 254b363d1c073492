"""Flower integration: FedMomentum aggregation inside a Flower (>= 1.21, Message API) server.

Install with the ``fedmomentum[flower]`` extra. This is the only module of the library that
imports ``flwr``; the core never does.

Server side::

    strategy = FedMomentumStrategy(method="fedmomentum", rank=8, lora_config=peft_config,
                                   residual="ship", min_available_nodes=3)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(adapter_state_dict),
                            num_rounds=10)

Client side (inside a ``ClientApp`` train/evaluate function)::

    model = build_peft_model()                       # fresh base + LoRA, or a kept model
    apply_server_update(model, msg.content, state=context.state)

Wire format
-----------
* The clients' replies carry one :class:`~flwr.app.ArrayRecord` with the LoRA adapter in PEFT
  *saved* key names (``base_model.model.<path>.lora_A.weight`` / ``.lora_B.weight``, what
  ``peft.get_peft_model_state_dict`` returns) and one :class:`~flwr.app.MetricRecord` holding
  the ``"num-examples"`` weight (``weighted_by_key``), exactly like for ``FedAvg``.
* The strategy returns the new adapter as the round's ``ArrayRecord`` and, in the train
  ``MetricRecord``, the clients' weighted metrics plus:

  ``aggregation-seconds``
      wall time of ``fedmomentum.aggregate`` for the whole adapter;
  ``energy-kept``
      mean over modules of ‖top-r‖²/‖ΔW‖² (fraction of the exact update carried by the new
      adapter; the rest is in the residual). Methods that do not compute it (``fedit``,
      ``fedsa_lora``: NaN per module) are skipped; when no module has a finite value the entry
      is NaN;
  ``residual-rank``, ``residual-bytes``
      total rank and fp32 size of this round's residual factors (the downlink of ``"ship"``);
  ``num-clients``, ``dropped-replies``, ``missing-replies``
      replies aggregated, replies dropped (error or invalid) and sampled nodes that did not reply
      before the round's timeout (dropouts; their ids are logged and kept in ``round_nodes``).
      The aggregation weights are renormalised over the replies aggregated.
* Failures follow Flower's settings: ``accept_failures`` (aggregate what arrived, or skip the
  round) and the ``min_*_nodes`` sampling minimums of ``FedAvg``, plus ``min_train_replies``.

Methods (every name in ``fedmomentum.METHODS``)
-----------------------------------------------
* Round numbering: round t of the method is Flower's ``server_round`` t (the first round is 1).
  Methods whose options name them get ``round=server_round`` and ``reference=`` the global
  adapter that round started from (what ``configure_train`` sent, as ``{module: (B, A)}`` with
  the saved-key module names) from the strategy; the user's static options (``lam``) go in
  ``method_options=``. RoLoRA's round 1 trains B with A shared, which is right for PEFT's
  initialisation (B = 0); FedRot-LoRA rotates from round 1 on towards the adapter of the round
  before (round 1: the initial adapter).
* Every train message carries a :class:`~flwr.app.ConfigRecord` under
  :data:`TRAIN_FACTORS_KEY` (``"fedmomentum-train"``): ``{"factors": ["A", "B"] | ["B"] | ["A"],
  "round": server_round, "method": name}``, the factors the method's clients train this round
  (``MethodSpec.trains_in``: ``["B"]`` for ffa_lora and fedsvd, alternating for rolora).
  :func:`apply_server_update` sets ``requires_grad`` of the adapter's ``lora_A`` / ``lora_B``
  parameters from it; the client's optimizer must take only parameters with ``requires_grad``.
* Methods with the ``per_client`` trait (flexlora, hetlora: clients of different ranks): each
  node whose reply was aggregated in the latest round is sent its own adapter (its own rank,
  rescaled to the LoRA scale of that node's config, plus the global non-LoRA entries) in the
  next train and evaluate messages, instead of the global one. Nodes not aggregated in the
  latest round (new, sampled out, dropped) get the global adapter (rank ``rank``, at the
  aggregate's scale ``last_aggregation.config``; FlexLoRA's global adapter's leading r_k
  components are its top-r_k truncation). The strategy's returned ``ArrayRecord`` is always the
  global adapter. A reply whose LoRA rank differs from ``lora_config``'s ``r`` is read with
  ``lora_config`` at the reply's rank (same ``lora_alpha`` / ``use_rslora``).
* Methods whose clients keep their own B (``keeps_client_B``: fedsa_lora): the global adapter
  holds ``lora_A`` only; replies may carry the client's own ``lora_B`` as well (accepted without
  a shape reference). :func:`apply_server_update` loads A and leaves B as it is, so a client that
  builds a fresh model every message must keep its own B itself (the example app keeps it in
  ``context.state``).

* ``residual="ship"``: the residual of round t (per module a :class:`~fedmomentum.LowRank` in the
  orientation of the module's ``weight``: ``weight += left @ right``) is sent in the following
  train (and evaluate) messages as one ``ArrayRecord`` per round under the RecordDict key
  ``f"{RESIDUAL_RECORD_PREFIX}{t}"``, with keys ``<module>.residual_left`` /
  ``<module>.residual_right`` (the ``residual.safetensors`` key format). A node is sent every
  round it has not yet acknowledged (a valid reply to a message carrying it), so nodes that skip
  rounds catch up; a node that answers with an error is sent every round again. Every message
  also carries ``RESIDUAL_INDEX_KEY`` (the list of rounds shipped so far), so
  :func:`apply_server_update` refuses to train on a stale base (a node that restarted without
  its state) instead of silently diverging. It merges each round at most once per model.
* ``residual="server"``: clients never see residuals; the server merges them into its own copy
  of the base weights (``base=``), exported by :meth:`FedMomentumStrategy.merged_state_dict`.
  With ``base=`` given, ``"ship"`` keeps that server copy as well.
"""
from __future__ import annotations

import math
import time
from collections import Counter
from logging import ERROR, INFO, WARNING
from typing import Any, Iterable, Mapping, Optional, Union

import torch

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

import fedmomentum
from fedmomentum_core import SOLVERS, LowRank, get_method
from fedmomentum_core.validate import all_finite

from .peft import merge as _merge
from .peft import rules as _rules

__all__ = ["FedMomentumStrategy", "apply_server_update", "RESIDUAL_RECORD_PREFIX",
           "RESIDUAL_INDEX_KEY", "MERGED_THROUGH_ATTR", "TRAIN_FACTORS_KEY", "residual_records",
           "weight_key"]

#: RecordDict key prefix of the per-round residual ArrayRecords (``...-round-3``).
RESIDUAL_RECORD_PREFIX = "fedmomentum-residual-round-"
#: RecordDict key of the ConfigRecord ``{"rounds": [...]}`` listing every residual round the
#: server has shipped so far: a client must hold all of them (else its base is stale).
RESIDUAL_INDEX_KEY = "fedmomentum-residual-index"
#: attribute set on a client model: the last server round whose residual it has merged.
MERGED_THROUGH_ATTR = "fedmomentum_merged_through"
#: RecordDict key of the train messages' ConfigRecord ``{"factors": [...], "round": t,
#: "method": name}``: the LoRA factors the clients train this round (see apply_server_update).
TRAIN_FACTORS_KEY = "fedmomentum-train"
#: method options the strategy sets itself every round (from Flower's server_round and the
#: adapter configure_train sent); a user may not fix them in ``method_options``
_ROUND_OPTIONS = ("round", "reference")
#: method options indexed by client position, which Flower re-draws every round
_PER_CLIENT_OPTIONS = ("client_ranks",)
_LEFT, _RIGHT = ".residual_left", ".residual_right"
_RESIDUAL_MODES = ("ship", "server")


class _BadReply(Exception):
    """A reply that cannot be aggregated (dropped with a warning)."""


# ----------------------------------------------------------------------------- helpers

def _module_of(key: str) -> Optional[tuple[str, str]]:
    """``(module, "A" | "B")`` of a saved-form LoRA factor key, else None (:mod:`fedmomentum.peft.rules`)."""
    return _rules.parse_saved_key(key)


def _module_scaling(cfg: Optional[Mapping], module: str, rank: int) -> float:
    """The LoRA scale PEFT applies to ``module`` under adapter config ``cfg`` (one rule:
    :func:`fedmomentum.peft.rules.client_scaling`; ``cfg`` empty or None: scale 1)."""
    return _rules.client_scaling(dict(cfg) if cfg else None, module, int(rank), client="adapter")[0]


def weight_key(module: str, keys: Iterable[str]) -> Optional[str]:
    """The base-weight key of adapter module path ``module`` in a (plain or PEFT) state dict, or None."""
    keys = set(keys)
    return next((c for c in _rules.weight_key_candidates(module) if c in keys), None)


_weight_key = weight_key  # the name examples used before it was public


def _resolve_weight(model: torch.nn.Module, module: str) -> torch.Tensor:
    """The base ``weight`` parameter of ``module`` in a live model (PeftModel or plain)."""
    w = _merge.find_base_weight(dict(model.named_modules()), module)
    if w is None:
        raise ValueError(f"residual for module {module!r}: no such module with a weight in "
                         f"{type(model).__name__}")
    return w


def residual_records(residuals: Mapping[str, LowRank]) -> ArrayRecord:
    """One round's residuals as an ArrayRecord (keys ``<module>.residual_left`` / ``_right``)."""
    sd: dict[str, torch.Tensor] = {}
    for name, lr in residuals.items():
        sd[name + _LEFT] = lr.left.detach().to("cpu", torch.float32).contiguous()
        sd[name + _RIGHT] = lr.right.detach().to("cpu", torch.float32).contiguous()
    return ArrayRecord(sd)


def _parse_residual_record(rec: ArrayRecord, where: str) -> dict[str, LowRank]:
    sd = rec.to_torch_state_dict()
    out: dict[str, LowRank] = {}
    for key in sd:
        if key.endswith(_LEFT):
            name = key[: -len(_LEFT)]
            if name + _RIGHT not in sd:
                raise ValueError(f"{where}: {key!r} has no matching {name + _RIGHT!r}")
            out[name] = LowRank(sd[key], sd[name + _RIGHT])
        elif not key.endswith(_RIGHT):
            raise ValueError(f"{where}: unexpected key {key!r} (expected <module>{_LEFT} / "
                             f"<module>{_RIGHT})")
        elif key[: -len(_RIGHT)] + _LEFT not in sd:
            raise ValueError(f"{where}: {key!r} has no matching left factor")
    return out


def _residual_blocks(content: RecordDict) -> dict[int, dict[str, LowRank]]:
    blocks: dict[int, dict[str, LowRank]] = {}
    for key in list(content.keys()):
        if key.startswith(RESIDUAL_RECORD_PREFIX):
            try:
                rnd = int(key[len(RESIDUAL_RECORD_PREFIX):])
            except ValueError as e:
                raise ValueError(f"bad residual record key {key!r}") from e
            rec = content[key]
            if not isinstance(rec, ArrayRecord):
                raise TypeError(f"record {key!r} is a {type(rec).__name__}, expected ArrayRecord")
            blocks[rnd] = _parse_residual_record(rec, key)
    return blocks


# ----------------------------------------------------------------------------- client side

_FACTOR_ATTRS = {"A": ("lora_A", "lora_embedding_A"), "B": ("lora_B", "lora_embedding_B")}


def _train_factors(content: RecordDict) -> Optional[list[str]]:
    """The factors ``content[TRAIN_FACTORS_KEY]`` says to train (checked), or None when absent."""
    if TRAIN_FACTORS_KEY not in content:
        return None
    rec = content[TRAIN_FACTORS_KEY]
    if not isinstance(rec, ConfigRecord):
        raise TypeError(f"record {TRAIN_FACTORS_KEY!r} is a {type(rec).__name__}, expected ConfigRecord")
    factors = rec.get("factors")
    if isinstance(factors, str):
        factors = [factors]
    if not isinstance(factors, list) or not factors or not set(factors) <= {"A", "B"}:
        raise ValueError(f"record {TRAIN_FACTORS_KEY!r}: 'factors' must be a non-empty list of 'A' / "
                         f"'B', got {factors!r}")
    return sorted(set(factors))


def _factor_params(model: torch.nn.Module, adapter_name: str) -> dict[str, list[torch.nn.Parameter]]:
    """``{"A": [...], "B": [...]}``: the parameters of adapter ``adapter_name``'s ``lora_A`` /
    ``lora_B`` (and ``lora_embedding_A`` / ``_B``) in every LoRA layer of ``model``."""
    out: dict[str, list[torch.nn.Parameter]] = {"A": [], "B": []}
    for mod in model.modules():
        for side, attrs in _FACTOR_ATTRS.items():
            for attr in attrs:
                holder = getattr(mod, attr, None)
                if not isinstance(holder, (torch.nn.ModuleDict, torch.nn.ParameterDict)) \
                        or adapter_name not in holder:
                    continue
                obj = holder[adapter_name]
                out[side].extend(obj.parameters() if isinstance(obj, torch.nn.Module) else [obj])
    return out


def apply_server_update(model: torch.nn.Module, record: Union[RecordDict, Message], *,
                        state: Optional[RecordDict] = None, adapter_name: str = "default",
                        arrays_key: str = "arrays") -> dict:
    """Merge the server's shipped residuals into ``model``'s base weights, then load the adapter.

    Every residual round found in ``record`` (and in ``state``, see below) that ``model`` has not
    merged yet (rounds above ``getattr(model, MERGED_THROUGH_ATTR, 0)``) is added to the base
    ``weight`` of its module (``weight += left @ right``, fp32 accumulation); then the new
    adapter ``record[arrays_key]`` (PEFT saved keys) is loaded with
    ``peft.set_peft_model_state_dict``.

    Two ways to use it, both exact:

    * keep one model across rounds (``state=None``): each residual is merged once, the model
      remembers the last merged round in the attribute ``MERGED_THROUGH_ATTR``;
    * build a fresh base model every message (the usual stateless Flower ``ClientApp``) and pass
      ``state=context.state``: the residual rounds received so far are kept in the node's state
      (fp32 factors, (m+n)·t per module and round) and all of them are merged into the fresh base.

    When the message carries :data:`TRAIN_FACTORS_KEY` (train messages of
    :class:`FedMomentumStrategy`), the adapter's ``lora_A`` / ``lora_B`` parameters get
    ``requires_grad`` True for the factors the method trains this round and False for the frozen
    one (ffa_lora and fedsvd freeze A; rolora alternates); the client's optimizer must take only
    parameters with ``requires_grad`` (``[p for p in model.parameters() if p.requires_grad]``).
    Without that record ``requires_grad`` is left as it is.

    Everything is checked (module names, shapes, adapter keys) before anything is modified; on
    error a ValueError/TypeError names the module or key and the model is left untouched.

    Args:
        model: a ``peft.PeftModel`` (or any module whose adapted modules expose ``weight`` or
            ``base_layer.weight``; then only residuals can be applied).
        record: the train/evaluate message (or its ``content``) from :class:`FedMomentumStrategy`.
        state: the node's ``context.state`` (optional, see above).
        adapter_name: the PEFT adapter to load into.
        arrays_key: the RecordDict key of the adapter (the strategy's ``arrayrecord_key``).

    Returns:
        ``{"merged_rounds": [...], "residual_rank": int, "adapter_loaded": bool, "trains": [...]
        or None}`` (``trains``: the factors left trainable, None when the message did not say).
    """
    content = record.content if isinstance(record, Message) else record
    if not isinstance(content, RecordDict):
        raise TypeError(f"record must be a flwr Message or RecordDict, got {type(record).__name__}")
    incoming = _residual_blocks(content)
    stored = _residual_blocks(state) if state is not None else {}
    blocks = {**stored, **incoming}
    through = int(getattr(model, MERGED_THROUGH_ATTR, 0))
    todo = sorted(r for r in blocks if r > through)
    if RESIDUAL_INDEX_KEY in content:
        index = content[RESIDUAL_INDEX_KEY]
        if not isinstance(index, ConfigRecord):
            raise TypeError(f"record {RESIDUAL_INDEX_KEY!r} is a {type(index).__name__}, "
                            "expected ConfigRecord")
        rounds = index.get("rounds", [])
        missing = sorted(int(r) for r in (rounds if isinstance(rounds, list) else [rounds])
                         if int(r) > through and int(r) not in blocks)
        if missing:
            raise ValueError(
                f"stale base: the server has shipped residual round(s) {missing} that this model "
                f"has not merged and that are neither in the message nor in state= (a node "
                f"restarted without its context.state?); the server ships every round again "
                f"after this error reply")

    # --- check everything first
    plan: list[tuple[torch.Tensor, LowRank]] = []
    for rnd in todo:
        for name, lr in blocks[rnd].items():
            w = _resolve_weight(model, name)
            if tuple(w.shape) != lr.shape:
                raise ValueError(f"round {rnd} residual for {name!r} is {lr.shape[0]} x {lr.shape[1]} "
                                 f"but the module weight is {tuple(w.shape)}")
            plan.append((w, lr))
    adapter = None
    if arrays_key in content:
        rec = content[arrays_key]
        if not isinstance(rec, ArrayRecord):
            raise TypeError(f"record {arrays_key!r} is a {type(rec).__name__}, expected ArrayRecord")
        adapter = rec.to_torch_state_dict()
        live = dict(model.state_dict())
        for key, t in adapter.items():
            if _module_of(key) is None:
                continue  # non-LoRA entries (modules_to_save, ...): left to PEFT
            live_key = _rules.live_key(key, adapter_name)
            if live_key not in live:
                raise ValueError(f"adapter key {key!r}: the model has no {live_key!r} "
                                 f"(is it a PeftModel with adapter {adapter_name!r}?)")
            if tuple(live[live_key].shape) != tuple(t.shape):
                raise ValueError(f"adapter key {key!r} has shape {tuple(t.shape)}, the model's "
                                 f"{live_key!r} is {tuple(live[live_key].shape)}")

    trains = _train_factors(content)
    factor_params = None
    if trains is not None:
        factor_params = _factor_params(model, adapter_name)
        if not factor_params["A"] and not factor_params["B"]:
            raise ValueError(f"record {TRAIN_FACTORS_KEY!r}: the model has no LoRA factors of adapter "
                             f"{adapter_name!r} to train or freeze (is it a PeftModel?)")

    # --- apply
    if factor_params is not None:
        for side, params in factor_params.items():
            for prm in params:
                prm.requires_grad_(side in trains)
    with torch.no_grad():
        for w, lr in plan:
            fedmomentum.merge_residual_(w.data, lr)
        if adapter is not None:
            from peft import set_peft_model_state_dict
            set_peft_model_state_dict(model, adapter, adapter_name=adapter_name)
    if todo:
        setattr(model, MERGED_THROUGH_ATTR, max(todo))
    if state is not None:
        for rnd in incoming:
            key = f"{RESIDUAL_RECORD_PREFIX}{rnd}"
            if key not in state:
                state[key] = content[key]
    return {"merged_rounds": todo,
            "residual_rank": sum(lr.rank for _, lr in plan),
            "adapter_loaded": adapter is not None,
            "trains": trains}


# ----------------------------------------------------------------------------- server side

class FedMomentumStrategy(FedAvg):
    """Flower ``FedAvg`` whose ``aggregate_train`` runs ``fedmomentum.aggregate`` on LoRA adapters.

    Args:
        method: one of ``fedmomentum.METHODS`` (default ``"fedmomentum"``).
        rank: output adapter rank (default: the clients' rank, see ``fedmomentum.aggregate``).
        solver: ``"auto"``, ``"exact"``, ``"randomized"`` or ``"dense"``.
        residual: ``"ship"`` (residual factors go to the clients in the next messages, merged by
            :func:`apply_server_update`) or ``"server"`` (kept and merged into the server's copy
            of the base, ``base=`` required; see :meth:`merged_state_dict`).
        lora_config: the clients' adapter config (peft ``LoraConfig`` or dict with r, lora_alpha,
            use_rslora, rank_pattern, alpha_pattern, ...): gives the LoRA scalings.
        base: the base model (``nn.Module``, e.g. the PeftModel before training, or a state dict)
            the server keeps a copy of and merges residuals into. Required for ``"server"``.
        aggregate_kwargs: extra keyword arguments for ``fedmomentum.aggregate`` (not
            ``method_options``: use the argument below).
        method_options: the method's static options (``MethodSpec.options``), e.g.
            ``{"lam": 0.7}`` for fedrot_lora; checked here (ValueError naming the method and what
            it accepts). ``round`` and ``reference`` are not given here: the strategy passes
            ``round=server_round`` and ``reference=`` the adapter the round started from. Nor is
            ``client_ranks`` (it is indexed by client position, which Flower re-draws every round):
            each node keeps its own rank (the rank of its reply).
        accept_failures: Flower's failure setting (as in the legacy ``FedAvg``): with ``True``
            (default) a round is aggregated over the replies that arrived, their weights
            renormalised over them; with ``False`` a round in which any sampled node failed (error
            reply, invalid reply, or no reply before the round's timeout) is not aggregated and
            the previous adapter is kept.
        min_train_replies: fewest valid train replies a round needs to be aggregated (default 1);
            below it the previous adapter is kept. Sampling waits for ``min_available_nodes``
            / ``min_train_nodes`` connected nodes as in ``FedAvg``.
        **fedavg_kwargs: ``FedAvg``'s arguments (fraction_train, min_available_nodes,
            weighted_by_key, arrayrecord_key, train_metrics_aggr_fn, ...).

    Attributes:
        last_aggregation: the ``fedmomentum.ModelAggregation`` of the latest round (or None).
        method_options: the static method options (checked, normalised).
        node_adapters: ``{node id: adapter state dict}``, per-client methods only: the adapter
            each node aggregated in the latest round gets in the next messages (see the module
            docstring, "Methods").
        round_metrics: ``{round: {"aggregation-seconds": ..., "energy-kept": ..., ...}}``.
        round_nodes: ``{round: {"sent": [...], "aggregated": [...], "failed": [...],
            "missing": [...]}}``: node ids of the train messages, of the replies aggregated, of
            the error/invalid replies and of the nodes that did not reply (dropouts).
    """

    def __init__(self, *, method: str = "fedmomentum", rank: Optional[int] = None,
                 solver: str = "auto", residual: str = "ship", lora_config: Any = None,
                 base: Union[torch.nn.Module, Mapping[str, torch.Tensor], None] = None,
                 aggregate_kwargs: Optional[dict] = None, accept_failures: bool = True,
                 min_train_replies: int = 1, method_options: Optional[Mapping] = None,
                 **fedavg_kwargs: Any) -> None:
        super().__init__(**fedavg_kwargs)
        self._spec = get_method(method)  # ValueError naming the choices for an unknown method
        self.method_options = self._static_options(self._spec, method_options)
        if "method_options" in (aggregate_kwargs or {}):
            raise ValueError("pass the method's options as method_options=, not in aggregate_kwargs")
        if solver != "auto" and solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; choose auto or one of {sorted(SOLVERS)}")
        if residual not in _RESIDUAL_MODES:
            raise ValueError(f"residual must be one of {_RESIDUAL_MODES}, got {residual!r}")
        if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
            raise ValueError(f"rank must be a positive int or None, got {rank!r}")
        if residual == "server" and base is None:
            raise ValueError("residual='server' needs base= (the base model or its state dict) "
                             "to merge the residuals into")
        self.method, self.rank, self.solver, self.residual = method, rank, solver, residual
        if lora_config is not None and not isinstance(lora_config, Mapping) and not hasattr(lora_config, "to_dict"):
            raise TypeError(f"lora_config must be a peft LoraConfig, a dict or None, got {type(lora_config).__name__}")
        self.lora_config = _rules.config_dict(lora_config, client="lora_config") or {}
        self.aggregate_kwargs = dict(aggregate_kwargs or {})
        self._base: Optional[dict[str, torch.Tensor]] = None
        if base is not None:
            sd = base.state_dict() if isinstance(base, torch.nn.Module) else base
            if not isinstance(sd, Mapping):
                raise TypeError(f"base must be an nn.Module or a state dict, got {type(base).__name__}")
            self._base = {k: v.detach().clone() for k, v in sd.items()
                          if isinstance(v, torch.Tensor) and ".lora_" not in k}
        if not isinstance(accept_failures, bool):
            raise TypeError(f"accept_failures must be a bool, got {accept_failures!r}")
        if not isinstance(min_train_replies, int) or isinstance(min_train_replies, bool) \
                or min_train_replies < 1:
            raise ValueError(f"min_train_replies must be an int >= 1, got {min_train_replies!r}")
        self.accept_failures, self.min_train_replies = accept_failures, min_train_replies
        self._residual_rounds: dict[int, dict[str, LowRank]] = {}
        self._acked: dict[int, int] = {}      # node -> last residual round it confirmed
        self._pending: dict[int, int] = {}    # node -> last residual round in its open message
        self._expected: Optional[dict[str, tuple[int, ...]]] = None
        self._adapter: Optional[dict[str, torch.Tensor]] = None
        self._adapter_config: dict = dict(self.lora_config)
        self.last_aggregation = None
        self.round_metrics: dict[int, dict[str, float]] = {}
        self.round_nodes: dict[int, dict[str, list[int]]] = {}
        self._sent: dict[tuple[str, int], list[Message]] = {}  # (train|evaluate, round) -> messages
        self._reply_nodes: dict[int, int] = {}  # id(reply) -> node, for the replies being aggregated
        self._round_start: dict[int, ArrayRecord] = {}  # round -> the adapter configure_train sent
        self.node_adapters: dict[int, dict[str, torch.Tensor]] = {}

    @staticmethod
    def _static_options(spec, given: Optional[Mapping]) -> dict:
        """The user's ``method_options`` checked against the method (the registry's own check and
        message), without the options the strategy sets every round."""
        if given is None:
            return {}
        if not isinstance(given, Mapping):
            raise TypeError(f"method_options must be a dict (option name -> value), got {type(given).__name__}")
        for key in given:
            if spec.takes(key) and key in _ROUND_OPTIONS:
                raise ValueError(
                    f"method {spec.name!r}: method_options[{key!r}] is set by FedMomentumStrategy every "
                    f"round (round = Flower's server_round, reference = the adapter the round started "
                    f"from); leave it out")
            if spec.takes(key) and key in _PER_CLIENT_OPTIONS:
                raise ValueError(
                    f"method {spec.name!r}: method_options[{key!r}] is not supported with Flower: it is "
                    f"indexed by client position, and which node is the k-th reply changes every round; "
                    f"each node keeps its own rank (the rank of the adapter it replies with)")
        probe = dict(given)
        if spec.takes("round"):
            probe["round"] = 0   # a placeholder for the check only; the strategy passes server_round
        resolved = spec.resolve_options(probe)   # unknown keys, bad values: ValueError naming the method
        return {k: resolved[k] for k in given}

    def _round_options(self, server_round: int, start: Optional[ArrayRecord]) -> Optional[dict]:
        """The ``method_options`` of round ``server_round``: the static ones, plus ``round`` and
        ``reference`` (``start``: the adapter configure_train sent; without it the latest global
        adapter) when the method takes them (``MethodSpec.loop_options``). None for a method
        without options."""
        if not self._spec.options:
            return None
        ref = None
        if self._spec.takes("reference"):
            sd = start.to_torch_state_dict() if start is not None else self._adapter
            if sd is not None:
                ref = _rules.adapter_pairs(
                    sd, where=f"round {server_round}'s reference (the adapter configure_train sent)")
        return {**self.method_options, **self._spec.loop_options(server_round, ref)}

    # ---------------------------------------------------------------- logging
    def summary(self) -> None:
        """Log the configuration (FedAvg's summary plus the FedMomentum options)."""
        super().summary()
        log(INFO, "\t└──> FedMomentum: method=%s rank=%s solver=%s residual=%s "
            "accept_failures=%s min_train_replies=%d method_options=%s", self.method, self.rank,
            self.solver, self.residual, self.accept_failures, self.min_train_replies,
            self.method_options)

    # ---------------------------------------------------------------- messages out
    def _attach_residuals(self, messages: Iterable[Message], through: int) -> list[Message]:
        messages = list(messages)
        if self.residual != "ship" or not self._residual_rounds:
            return messages
        index = [r for r in sorted(self._residual_rounds) if r <= through]
        for msg in messages:
            node = msg.metadata.dst_node_id
            rounds = [r for r in index if self._acked.get(node, 0) < r]
            content = RecordDict(dict(msg.content.items()))
            if index:
                content[RESIDUAL_INDEX_KEY] = ConfigRecord({"rounds": list(index)})
            for r in rounds:
                content[f"{RESIDUAL_RECORD_PREFIX}{r}"] = residual_records(self._residual_rounds[r])
            msg.content = content
            if rounds:
                self._pending[node] = max(rounds)
        return messages

    def _nack(self, node: int) -> None:
        """A node answered with an error: it may have lost its residuals (restart without its
        state); ship it every round again next time (merging is idempotent per round)."""
        self._acked.pop(node, None)
        self._pending.pop(node, None)

    def _reply_node(self, msg: Message, by_id: Mapping[str, int]) -> int:
        """The node a reply answers for: its source, or, for an error the SuperLink wrote on the
        node's behalf (node unavailable, message expired), the instruction's destination."""
        return by_id.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)

    def _missing(self, kind: str, server_round: int, replies: list[Message]) -> list[int]:
        """Sampled nodes whose reply did not arrive, logged; error replies the SuperLink
        produced for a node are attributed to that node (``_reply_node``)."""
        self._reply_nodes = {}
        msgs = self._sent.pop((kind, server_round), None)
        if msgs is None:
            return []
        sent = [m.metadata.dst_node_id for m in msgs]
        by_id = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs if m.metadata.message_id}
        self._reply_nodes = {id(m): self._reply_node(m, by_id) for m in replies}
        got = set(self._reply_nodes.values())
        missing = sorted(n for n in sent if n not in got)
        if missing:
            log(WARNING, "aggregate_%s: round %d: no reply from node(s) %s (%d of %d sampled "
                "nodes missing: dropped out or past the round timeout)", kind, server_round,
                missing, len(missing), len(sent))
        return missing

    def _ack(self, replies: Iterable[Message]) -> None:
        for msg in replies:
            node = msg.metadata.src_node_id
            if node in self._pending:
                self._acked[node] = max(self._acked.get(node, 0), self._pending.pop(node))

    def _attach_method(self, messages: Iterable[Message], server_round: Optional[int]) -> list[Message]:
        """Each message gets its own content (FedAvg's share one RecordDict); per-client methods:
        a node aggregated in the latest round gets its own adapter; train messages
        (``server_round`` given) get the :data:`TRAIN_FACTORS_KEY` record."""
        messages = list(messages)
        factors = None
        if server_round is not None:
            factors = ConfigRecord({"factors": sorted(self._spec.trains_in(server_round)),
                                    "round": int(server_round), "method": self.method})
        for msg in messages:
            own = self.node_adapters.get(msg.metadata.dst_node_id)
            if factors is None and own is None:
                continue
            content = RecordDict(dict(msg.content.items()))
            if own is not None and self.arrayrecord_key in content:
                content[self.arrayrecord_key] = ArrayRecord(own)
            if factors is not None:
                content[TRAIN_FACTORS_KEY] = factors
            msg.content = content
        return messages

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """FedAvg's train messages, plus the residual rounds each node has not acknowledged, the
        factors to train (:data:`TRAIN_FACTORS_KEY`) and, for per-client methods, each node's own
        adapter."""
        self._expected = {k: tuple(v.shape) for k, v in arrays.items()}
        if self._spec.takes("reference"):
            self._round_start = {server_round: arrays}   # the reference of this round's aggregation
        msgs = self._attach_method(super().configure_train(server_round, arrays, config, grid),
                                   server_round)
        msgs = self._attach_residuals(msgs, server_round - 1)
        self._sent[("train", server_round)] = msgs
        return msgs

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """FedAvg's evaluate messages, plus residual rounds up to this one (exact evaluation);
        per-client methods: each node its own adapter, as for training."""
        msgs = self._attach_method(super().configure_evaluate(server_round, arrays, config, grid), None)
        msgs = self._attach_residuals(msgs, server_round)
        self._sent[("evaluate", server_round)] = msgs
        return msgs

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Optional[MetricRecord]:
        """FedAvg's evaluate aggregation; valid replies also acknowledge shipped residuals."""
        replies = list(replies)
        self._missing("evaluate", server_round, replies)
        for m in replies:
            if m.has_error():
                self._nack(self._reply_nodes.get(id(m), m.metadata.src_node_id))
        self._reply_nodes = {}
        self._ack(m for m in replies if not m.has_error())
        return super().aggregate_evaluate(server_round, replies)

    # ---------------------------------------------------------------- replies in
    def _check_reply(self, msg: Message, ref: Optional[dict[str, tuple[int, ...]]]):
        content = msg.content
        arrays = content.array_records
        if self.arrayrecord_key in arrays:
            rec = arrays[self.arrayrecord_key]
        elif len(arrays) == 1:
            rec = next(iter(arrays.values()))
        else:
            raise _BadReply(f"expected one ArrayRecord (key {self.arrayrecord_key!r}), "
                            f"found {sorted(arrays)}")
        weight = None
        metrics = None
        for mr in content.metric_records.values():
            if self.weighted_by_key in mr:
                weight, metrics = mr[self.weighted_by_key], mr
                break
        if weight is None:
            raise _BadReply(f"no MetricRecord with {self.weighted_by_key!r}")
        if isinstance(weight, list) or not math.isfinite(float(weight)) or float(weight) <= 0:
            raise _BadReply(f"{self.weighted_by_key!r} is {weight!r}; expected a positive number")
        keys = set(rec.keys())
        own_b: set[str] = set()
        if ref is not None and self._spec.keeps_client_B:
            # fedsa_lora: the global adapter has no lora_B; each client replies with its own B
            ref_a = {m[0] for m in map(_module_of, ref) if m is not None and m[1] == "A"}
            own_b = {k for k in keys - set(ref)
                     if (m := _module_of(k)) is not None and m[1] == "B" and m[0] in ref_a}
        if ref is not None and keys - own_b != set(ref):
            missing, extra = sorted(set(ref) - keys), sorted(keys - set(ref))
            raise _BadReply(f"adapter keys differ: missing {missing[:3]}{'...' if len(missing) > 3 else ''}"
                            f", unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
        try:
            sd = rec.to_torch_state_dict()
        except Exception as e:  # noqa: BLE001 - corrupt payloads of any kind
            raise _BadReply(f"cannot read arrays: {e}") from e
        modules: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in sd.items():
            mod = _module_of(key)
            if not t.dtype.is_floating_point:
                raise _BadReply(f"{key!r} has dtype {t.dtype}; expected a floating dtype")
            if not all_finite(t):
                raise _BadReply(f"{key!r} has non-finite values")
            if ref is not None and mod is None and tuple(t.shape) != ref[key]:
                raise _BadReply(f"{key!r} has shape {tuple(t.shape)}, expected {ref[key]}")
            if mod is None:
                continue
            if t.dim() != 2:
                raise _BadReply(f"{key!r} is {tuple(t.shape)}; expected a 2-D LoRA factor")
            if ref is not None and key not in own_b:
                want = ref[key]
                dim = 1 if mod[1] == "A" else 0  # n of A (r x n), m of B (m x r): ranks may differ
                if len(want) != 2 or want[dim] != t.shape[dim]:
                    raise _BadReply(f"{key!r} has shape {tuple(t.shape)}, expected {'m' if dim == 0 else 'n'}"
                                    f" = {want[dim] if len(want) == 2 else want}")
            modules.setdefault(mod[0], {})[mod[1]] = t
        for name, pair in modules.items():
            if "A" in pair and "B" in pair and pair["B"].shape[1] != pair["A"].shape[0]:
                raise _BadReply(f"{name}: lora_B is {tuple(pair['B'].shape)} but lora_A is "
                                f"{tuple(pair['A'].shape)} (ranks differ)")
        ranks = {name: int(pair["A"].shape[0]) for name, pair in modules.items() if "A" in pair}
        return sd, float(weight), metrics, self._reply_config(ranks)

    def _reply_config(self, ranks: Mapping[str, int]) -> Optional[dict]:
        """The adapter config a reply with LoRA ranks ``ranks`` (module -> rank) is read with:
        ``lora_config`` when its ranks agree, else ``lora_config`` at the reply's one rank (same
        lora_alpha / alpha_pattern / use_rslora: a client of another rank, as for FlexLoRA)."""
        cfg = self.lora_config
        if not cfg:
            return None
        try:
            off = {m: r for m, r in ranks.items() if int(_rules.module_rank_alpha(cfg, m)[0]) != r}
        except (TypeError, ValueError):
            return cfg   # a malformed config: the aggregation's own check names it
        if not off:
            return cfg
        mine = set(ranks.values())
        if len(mine) == 1 and not any(_rules.module_rank_alpha(cfg, m)[2] is not None for m in ranks):
            return {**cfg, "r": mine.pop()}
        name, r = next(iter(off.items()))
        raise _BadReply(f"{name}: LoRA rank {r} differs from lora_config's "
                        f"{_rules.module_rank_alpha(cfg, name)[0]} and the reply's ranks are not one "
                        f"rank outside rank_pattern ({sorted(mine)}); cannot tell its LoRA scale")

    def _valid_replies(self, replies: list[Message]):
        good, dropped = [], 0
        candidates = []
        for msg in replies:
            if msg.has_error():
                node = self._reply_nodes.get(id(msg), msg.metadata.src_node_id)
                log(WARNING, "aggregate_train: dropping error reply for node %s: %s",
                    node, msg.error.reason)
                self._nack(node)
                dropped += 1
            elif not msg.has_content():
                log(WARNING, "aggregate_train: dropping empty reply from node %s",
                    msg.metadata.src_node_id)
                dropped += 1
            else:
                candidates.append(msg)
        ref = self._expected
        if ref is None and candidates:  # no configure_train seen: majority key set, first shapes
            sets = Counter(frozenset(next(iter(m.content.array_records.values()), {}).keys())
                           for m in candidates if m.content.array_records)
            if sets:
                keyset = sets.most_common(1)[0][0]
                for m in candidates:
                    recs = m.content.array_records
                    rec = recs.get(self.arrayrecord_key) or (next(iter(recs.values())) if recs else None)
                    if rec is not None and frozenset(rec.keys()) == keyset:
                        ref = {k: tuple(v.shape) for k, v in rec.items()}
                        break
        for msg in candidates:
            try:
                good.append((msg,) + self._check_reply(msg, ref))
            except _BadReply as e:
                log(WARNING, "aggregate_train: dropping reply from node %s: %s",
                    msg.metadata.src_node_id, e)
                dropped += 1
        return good, dropped

    def _aggregate(self, states: list[dict[str, torch.Tensor]], weights: list[float],
                   configs: Optional[list] = None, method_options: Optional[dict] = None):
        kwargs = dict(self.aggregate_kwargs)
        if method_options is not None:
            kwargs["method_options"] = method_options
        if configs is None or all(c is None for c in configs):
            configs = self.lora_config or None
        return fedmomentum.aggregate(states, weights, configs=configs,
                                     method=self.method, rank=self.rank, solver=self.solver,
                                     **kwargs)

    def _own_adapters(self, agg, nodes: list[int], configs: list) -> dict[int, dict[str, torch.Tensor]]:
        """Per-client methods: node -> its own adapter (``agg.per_client[k]`` for the k-th reply,
        rescaled from the aggregate's LoRA scale to the one of that node's config, plus the global
        non-LoRA entries)."""
        out_scale = {r.name: float(r.out_scaling) for r in agg.report}
        others = {k: v.detach().cpu().clone() for k, v in agg.state_dict.items() if _module_of(k) is None}
        adapters: dict[int, dict[str, torch.Tensor]] = {}
        for node, own, cfg in zip(nodes, agg.per_client, configs):
            ranks = {}
            for key, t in own.items():
                mod = _module_of(key)
                if mod is not None and mod[1] == "A":
                    ranks[mod[0]] = int(t.shape[0])
            sd = dict(others)
            for key, t in own.items():
                mod = _module_of(key)
                t = t.detach().cpu()
                if mod is not None and mod[0] in out_scale and mod[0] in ranks:
                    # s_node·B'A' = out_scale·BA: both factors by √(out_scale / s_node)
                    ratio = out_scale[mod[0]] / _module_scaling(cfg, mod[0], ranks[mod[0]])
                    if ratio != 1.0:
                        if ratio > 0:
                            t = (t.to(torch.float64) * math.sqrt(ratio)).to(t.dtype)
                        elif mod[1] == "B":
                            t = (t.to(torch.float64) * ratio).to(t.dtype)
                sd[key] = t.contiguous().clone()
            adapters[int(node)] = sd
        return adapters

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        """Aggregate the clients' LoRA adapters with ``fedmomentum.aggregate``.

        Replies with an error, no content, missing/extra adapter keys, wrong shapes, non-finite
        values or no positive ``weighted_by_key`` metric are dropped with a logged warning. With
        no reply left, returns ``(None, None)`` like ``FedAvg``. A failure inside the aggregation
        itself is logged and also gives ``(None, None)`` (the previous adapter is kept).
        """
        replies = list(replies)
        start = self._round_start.pop(server_round, None)
        missing = self._missing("train", server_round, replies)
        good, dropped = self._valid_replies(replies)
        node_of = self._reply_nodes
        src = [node_of.get(id(m), m.metadata.src_node_id) for m in replies]
        aggregated = [node_of.get(id(m), m.metadata.src_node_id) for m, *_ in good]
        self.round_nodes[server_round] = {
            "sent": sorted(set(src) | set(missing)),
            "aggregated": sorted(aggregated),
            "failed": sorted(n for n in src if n not in aggregated),
            "missing": missing}
        self._reply_nodes = {}
        log(INFO, "aggregate_train: %d replies aggregated, %d dropped, %d missing", len(good),
            dropped, len(missing))
        if not good:
            return None, None
        if not self.accept_failures and (dropped or missing):
            log(WARNING, "aggregate_train: round %d not aggregated (accept_failures=False): %d "
                "failed and %d missing replies; keeping the previous adapter", server_round,
                dropped, len(missing))
            return None, None
        if len(good) < self.min_train_replies:
            log(WARNING, "aggregate_train: round %d not aggregated: %d valid replies, "
                "min_train_replies=%d; keeping the previous adapter", server_round, len(good),
                self.min_train_replies)
            return None, None
        self._ack(m for m, *_ in good)
        states = [sd for _, sd, _, _, _ in good]
        weights = [w for _, _, w, _, _ in good]
        configs = [c for *_, c in good]
        t0 = time.perf_counter()
        try:
            agg = self._aggregate(states, weights, configs, self._round_options(server_round, start))
        except (ValueError, TypeError) as e:
            log(ERROR, "aggregate_train: round %d aggregation failed, keeping the previous "
                "adapter: %s", server_round, e)
            return None, None
        seconds = time.perf_counter() - t0
        residuals = {k: v.to("cpu", torch.float32) for k, v in (agg.residuals or {}).items()
                     if v is not None and v.rank > 0}
        if self._base is not None:
            self._merge_into_base(residuals)
        if self.residual == "ship" and residuals:
            self._residual_rounds[server_round] = residuals
        self._adapter = {k: v.detach().clone() for k, v in agg.state_dict.items()}
        self._adapter_config = {**self.lora_config, **dict(getattr(agg, "config", None) or {})}
        self.last_aggregation = agg
        self.node_adapters = {}
        if self._spec.per_client and agg.per_client:
            try:
                self.node_adapters = self._own_adapters(agg, aggregated, configs)
            except (ValueError, TypeError) as e:   # every node gets the global adapter instead
                log(ERROR, "aggregate_train: round %d: per-client adapters not kept, every node "
                    "gets the global adapter: %s", server_round, e)

        energies = [float(r.energy_kept) for r in agg.report
                    if r.energy_kept is not None and math.isfinite(float(r.energy_kept))]
        extra = {
            "aggregation-seconds": float(seconds),
            "energy-kept": float(sum(energies) / len(energies)) if energies else float("nan"),
            "residual-rank": int(sum(lr.rank for lr in residuals.values())),
            "residual-bytes": int(sum(lr.nbytes for lr in residuals.values())),
            "num-clients": len(good),
            "dropped-replies": int(dropped),
            "missing-replies": len(missing),
        }
        self.round_metrics[server_round] = extra
        try:
            metrics = self.train_metrics_aggr_fn([m.content for m, *_ in good], self.weighted_by_key)
        except Exception as e:  # noqa: BLE001 - a user metrics function must not kill the round
            log(WARNING, "aggregate_train: client metrics not aggregated: %s", e)
            metrics = MetricRecord()
        for k, v in extra.items():
            metrics[k] = v
        return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in agg.state_dict.items()}), metrics

    # ---------------------------------------------------------------- server copy of the base
    def _merge_into_base(self, residuals: Mapping[str, LowRank]) -> None:
        assert self._base is not None
        plan = []
        for name, lr in residuals.items():
            key = weight_key(name, self._base)
            if key is None:
                raise ValueError(f"residual for module {name!r}: no matching weight in the "
                                 "server's base state dict")
            if tuple(self._base[key].shape) != lr.shape:
                raise ValueError(f"residual for {name!r} is {lr.shape}, base {key!r} is "
                                 f"{tuple(self._base[key].shape)}")
            plan.append((key, lr))
        for key, lr in plan:
            fedmomentum.merge_residual_(self._base[key], lr)

    def residual_history(self) -> dict[int, dict[str, LowRank]]:
        """The residuals of every round the server still ships (``"ship"`` mode), by round."""
        return dict(self._residual_rounds)

    def merged_state_dict(self, include_adapter: bool = False) -> dict[str, torch.Tensor]:
        """The server's copy of the base weights with every round's residual merged in.

        Args:
            include_adapter: also fold the current adapter in (``weight += s·B·A`` in the
                orientation of the weight: transposed for ``fan_in_fan_out`` / Conv1D), giving
                the effective weights a client ends the round with.

        Returns:
            A new dict (clones) keyed like ``base``, without LoRA entries.
        """
        if self._base is None:
            raise ValueError("no base copy on the server: construct the strategy with base=")
        out = {k: v.clone() for k, v in self._base.items()}
        if include_adapter and self._adapter:
            pairs: dict[str, dict[str, torch.Tensor]] = {}
            for key, t in self._adapter.items():
                mod = _module_of(key)
                if mod is not None:
                    pairs.setdefault(mod[0], {})[mod[1]] = t
            for name, p in pairs.items():
                if "A" not in p or "B" not in p:
                    continue
                key = weight_key(name, out)
                if key is None:
                    raise ValueError(f"adapter module {name!r}: no matching weight in base")
                # the scale PEFT applies when it loads this adapter with its config
                s = _module_scaling(self._adapter_config, name, int(p["A"].shape[0]))
                delta = s * (p["B"].to(torch.float64) @ p["A"].to(torch.float64))
                w = out[key]
                fan_in_fan_out = bool(self._adapter_config.get("fan_in_fan_out", False))
                if tuple(w.shape) == tuple(delta.shape) and not fan_in_fan_out:
                    pass
                elif tuple(w.shape) == tuple(delta.T.shape):
                    delta = delta.T
                else:
                    raise ValueError(f"adapter module {name!r}: s·B·A is {tuple(delta.shape)}, "
                                     f"weight {key!r} is {tuple(w.shape)}")
                out[key] = (w.to(torch.float64) + delta).to(w.dtype)
        return out
