"""Model-level aggregation: PEFT key grouping, per-client scalings, the loop over modules.

Pure torch (no peft / transformers / safetensors imports): the PEFT folder handling lives in
``fedmomentum.peft``. The pieces, each importable on its own so streaming and distributed
drivers can reuse them:

1. :func:`group_lora_keys` splits one client's keys into LoRA modules (:class:`LoraKeys`) and
   other tensors.
2. :func:`plan_modules` turns the K clients' *shapes* (no tensors needed) and adapter configs
   into a :class:`ModelPlan`: one :class:`ModuleSpec` per adapted module with its shape, the
   per-client ranks, scalings and key names, plus the non-LoRA keys to average.
3. :func:`aggregate_module` aggregates one module given its client factors (calls
   :func:`fedmomentum_core.methods.aggregate_layer`), returning the new adapter tensors in PEFT
   saved key names, the residual in the base weight's orientation and a :class:`ModuleReport`.
4. :func:`output_config` builds the output adapter_config fields; :func:`run_plan` drives 3 over
   a plan with any tensor loader; :func:`aggregate_state_dicts` is the in-memory entry point
   (``fedmomentum.aggregate``).

Key forms understood (``<m>`` is the module path, e.g.
``base_model.model.model.layers.0.self_attn.q_proj``):

* saved (``get_peft_model_state_dict`` / ``adapter_model.safetensors``):
  ``<m>.lora_A.weight``, ``<m>.lora_B.weight``; Embedding: ``<m>.lora_embedding_A``,
  ``<m>.lora_embedding_B``;
* live (``model.state_dict()`` of a PeftModel): ``<m>.lora_A.<adapter>.weight`` and
  ``<m>.lora_embedding_A.<adapter>`` (one adapter name per client).

The output state dict always uses the saved form.

Orientation: for every module we aggregate ΔW' = Σ_k p_k s_k B_k A_k with B_k = lora_B
(m x r_k) and A_k = lora_A (r_k x n), exactly as PEFT stores them. The base weight is ΔW' for
nn.Linear, ΔW'ᵀ for GPT-2 Conv1D (``fan_in_fan_out=True``) and for nn.Embedding (where
lora_embedding_A is r x num_embeddings and lora_embedding_B is embedding_dim x r). Residuals are
returned in the base weight's orientation, so merging is always ``weight += left @ right``.

Frozen base-layer copies that PEFT saves next to a targeted Embedding's LoRA
(``<module>.base_layer.weight``, ``save_embedding_layers``) are not carried to the output (they
would overwrite a merged residual when the adapter is loaded); they are listed in
``ModelAggregation.skipped_keys``; so are, for a client in the live form (a PeftModel's
``state_dict()``), the non-LoRA keys without the adapter name in them (the frozen base model).
Other non-LoRA tensors (``modules_to_save`` copies, biases trained with ``bias="all"/"lora_only"``,
trainable tokens): averaged FedAvg-style with the normalised client weights p_k (computed in
fp32, returned in the input dtype); every client must hold the key with one shape. Refused with a
ValueError: DoRA magnitude vectors (``lora_magnitude_vector``: they depend on the merged weight's
column norms, so no average is exact), ``lora_B`` biases (``lora_bias=True``) and any other
``lora_*`` tensor that is not an A/B factor, and configs with ``use_dora=True``.

Scalings: s = lora_alpha / r, or lora_alpha / √r with ``use_rslora``; ``rank_pattern`` and
``alpha_pattern`` override r and lora_alpha per module with PEFT's own rule (the first pattern
key ``key`` in dict order for which ``re.match(rf"(.*\\.)?({key})$", module)`` matches, where
``module`` is the path without the ``base_model.model.`` prefix). ``configs=None`` means s_k = 1
for every client (ΔW = Σ p_k B_k A_k) and the output config gets ``lora_alpha = r``.
"""
from __future__ import annotations

import contextlib
import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch

from . import profiling as _profiling
from .methods import METHODS, aggregate_layer
from .planner import choose_solver
from .solvers import release_workspace as _release_workspace
from .types import LowRank

__all__ = [
    "PEFT_PREFIX", "LoraKeys", "ModuleSpec", "ModelPlan", "ModuleReport", "ModuleResult",
    "ModelAggregation", "group_lora_keys", "relative_module_name", "peft_pattern_key",
    "client_scaling", "config_dict", "plan_modules", "aggregate_module", "output_config",
    "run_plan", "aggregate_state_dicts", "format_report",
]

#: the prefix PEFT puts in front of the base model's module paths in saved adapter keys
PEFT_PREFIX = "base_model.model."

_SAVED = re.compile(r"^(?P<mod>.+)\.(?P<which>lora_A|lora_B)\.weight$")
_LIVE = re.compile(r"^(?P<mod>.+)\.(?P<which>lora_A|lora_B)\.(?P<adapter>[^.]+)\.weight$")
_EMB_SAVED = re.compile(r"^(?P<mod>.+)\.(?P<which>lora_embedding_A|lora_embedding_B)$")
_EMB_LIVE = re.compile(r"^(?P<mod>.+)\.(?P<which>lora_embedding_A|lora_embedding_B)\.(?P<adapter>[^.]+)$")
_REFUSED = re.compile(r"(^|\.)lora_[A-Za-z_]+(\.|$)")


# ----------------------------------------------------------------------------- keys

@dataclass(frozen=True)
class LoraKeys:
    """One client's key names for one LoRA module."""

    module: str          #: module path as in the keys, before ``.lora_A``
    a_key: str
    b_key: str
    embedding: bool      #: lora_embedding_A/B (an nn.Embedding)
    adapter: Optional[str] = None  #: the adapter name of the live form, None for the saved form


def group_lora_keys(keys: Iterable[str], *, client: str = "client 0") -> tuple[dict[str, LoraKeys], list[str]]:
    """Group one client's state-dict keys into LoRA modules.

    Returns ``(modules, other_keys)``: ``modules`` maps the module path to its :class:`LoraKeys`;
    ``other_keys`` are the non-LoRA keys (averaged by :func:`run_plan`). Raises ValueError naming
    ``client`` for a module with lora_A but no lora_B (or the reverse), for more than one live
    adapter name, and for refused keys (DoRA magnitude vectors, lora_B biases, other ``lora_*``).
    """
    found: dict[str, dict[str, str]] = {}
    emb: dict[str, bool] = {}
    adapters: set[str] = set()
    other: list[str] = []
    for key in keys:
        mt = None
        for rx, is_emb in ((_SAVED, False), (_EMB_SAVED, True), (_LIVE, False), (_EMB_LIVE, True)):
            mt = rx.match(key)
            if mt:
                break
        if mt is None:
            if "lora_magnitude_vector" in key:
                raise ValueError(f"{client}: key {key!r} is a DoRA magnitude vector; DoRA adapters are "
                                 "not supported (the magnitude depends on the merged weight, so it "
                                 "cannot be aggregated exactly)")
            if _REFUSED.search(key):
                raise ValueError(f"{client}: key {key!r} is a LoRA tensor other than the A/B factors "
                                 "(e.g. a lora_B bias from lora_bias=True); not supported")
            other.append(key)
            continue
        mod, which = mt.group("mod"), mt.group("which")
        adapter = mt.groupdict().get("adapter")
        if adapter is not None:
            adapters.add(adapter)
        slot = "A" if which.endswith("A") else "B"
        d = found.setdefault(mod, {})
        if slot in d:
            raise ValueError(f"{client}: module {mod!r} has two lora_{slot} keys ({d[slot]!r} and {key!r})")
        d[slot] = key
        emb[mod] = is_emb
    if len(adapters) > 1:
        raise ValueError(f"{client}: state dict holds several adapters {sorted(adapters)}; pass one "
                         "adapter per client (e.g. get_peft_model_state_dict(model, adapter_name=...))")
    out: dict[str, LoraKeys] = {}
    for mod, d in found.items():
        if "A" not in d or "B" not in d:
            have, miss = ("A", "B") if "A" in d else ("B", "A")
            raise ValueError(f"{client}: module {mod!r} has lora_{have} ({d[have]!r}) but no lora_{miss}")
        out[mod] = LoraKeys(mod, d["A"], d["B"], emb[mod], next(iter(adapters)) if adapters else None)
    return out, other


def relative_module_name(module: str) -> str:
    """The module path inside the base model (PEFT's ``current_key``): strips ``base_model.model.``."""
    return module[len(PEFT_PREFIX):] if module.startswith(PEFT_PREFIX) else module


def peft_pattern_key(pattern_keys: Iterable[str], module: str) -> Optional[str]:
    """PEFT's ``get_pattern_key`` rule: the first key with ``re.match(rf"(.*\\.)?({key})$", module)``,
    or None when no key matches (``module`` without the ``base_model.model.`` prefix)."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


# ----------------------------------------------------------------------------- configs

def config_dict(config: Any, *, client: str = "client 0") -> Optional[dict]:
    """An adapter config as a plain dict: accepts None, a dict, or an object with ``to_dict()``
    (a peft ``LoraConfig``) or ``__dict__``."""
    if config is None:
        return None
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return dict(config.to_dict())
    if hasattr(config, "__dict__"):
        return dict(vars(config))
    raise TypeError(f"{client}: config must be a dict or a LoraConfig, got {type(config).__name__}")


def client_scaling(config: Optional[dict], module: str, rank: int, *, client: str = "client 0"
                   ) -> tuple[float, float, bool]:
    """``(s, alpha, use_rslora)`` of one client at one module.

    ``module`` is the module path (with or without ``base_model.model.``); ``rank`` the rank of its
    lora_A. Uses ``rank_pattern``/``alpha_pattern`` with PEFT's matching rule; raises ValueError
    naming the client and module when the config's r disagrees with the tensors.
    """
    if config is None:
        return 1.0, float(rank), False
    if config.get("use_dora"):
        raise ValueError(f"{client}: adapter_config has use_dora=True; DoRA adapters are not supported")
    rel = relative_module_name(module)
    rp = config.get("rank_pattern") or {}
    ap = config.get("alpha_pattern") or {}
    rk = peft_pattern_key(rp.keys(), rel)
    ak = peft_pattern_key(ap.keys(), rel)
    r_cfg = rp[rk] if rk is not None else config.get("r", 8)
    alpha = ap[ak] if ak is not None else config.get("lora_alpha", 8)
    try:
        r_cfg, alpha = int(r_cfg), float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"{client}: module {module!r}: adapter_config r={r_cfg!r}, lora_alpha={alpha!r} "
                         "must be numbers") from None
    if r_cfg != rank:
        src = f"rank_pattern[{rk!r}]" if rk is not None else "r"
        raise ValueError(f"{client}: module {module!r}: adapter_config says {src} = {r_cfg} but its "
                         f"lora_A has {rank} rows; the config does not match the weights")
    rs = bool(config.get("use_rslora", False))
    s = alpha / math.sqrt(rank) if rs else alpha / rank
    return float(s), alpha, rs


# ----------------------------------------------------------------------------- plan

@dataclass(frozen=True)
class ModuleSpec:
    """One adapted module across the K clients (shapes only; no tensors)."""

    name: str                 #: module path as in client 0's keys (before ``.lora_A``)
    kind: str                 #: "linear", "conv1d" (fan_in_fan_out) or "embedding"
    m: int                    #: rows of ΔW' = B @ A (lora_B rows)
    n: int                    #: columns of ΔW' (lora_A columns)
    ranks: tuple[int, ...]    #: r_k per client
    scalings: tuple[float, ...]  #: s_k per client
    alphas: tuple[float, ...]
    keys: tuple[LoraKeys, ...]  #: per client
    use_rslora: tuple[bool, ...]

    @property
    def rel_name(self) -> str:
        """The path inside the base model (what rank_pattern/target_modules match)."""
        return relative_module_name(self.name)

    @property
    def transpose(self) -> bool:
        """True when the base weight is ΔW'ᵀ (Conv1D fan_in_fan_out, Embedding)."""
        return self.kind != "linear"

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.n, self.m) if self.transpose else (self.m, self.n)

    def out_keys(self) -> tuple[str, str]:
        """Saved-form (A key, B key) of the output adapter."""
        if self.kind == "embedding":
            return f"{self.name}.lora_embedding_A", f"{self.name}.lora_embedding_B"
        return f"{self.name}.lora_A.weight", f"{self.name}.lora_B.weight"


@dataclass(frozen=True)
class ModelPlan:
    """What :func:`run_plan` needs: modules, client names and weights, the non-LoRA keys."""

    clients: tuple[str, ...]
    p: tuple[float, ...]           #: normalised weights
    configs: tuple[Optional[dict], ...]
    modules: tuple[ModuleSpec, ...]
    other_keys: tuple[tuple[str, ...], ...] = ()   #: per client, same order (matching names)
    other_shapes: tuple[tuple[int, ...], ...] = ()
    #: keys not carried to the output: ``<lora module>.base_layer.*`` copies of frozen base weights
    #: that PEFT saves for targeted Embedding layers (``save_embedding_layers``)
    skipped_keys: tuple[str, ...] = ()

    @property
    def K(self) -> int:
        return len(self.clients)


def _normalise_weights(weights, K: int) -> list[float]:
    if weights is None:
        return [1.0 / K] * K
    if isinstance(weights, torch.Tensor):
        weights = weights.detach().cpu().reshape(-1).tolist()
    try:
        w = [float(v) for v in weights]
    except (TypeError, ValueError):
        raise TypeError(f"weights must be a sequence of {K} numbers, got {weights!r}") from None
    if len(w) != K:
        raise ValueError(f"expected {K} weights (one per client), got {len(w)}")
    for k, v in enumerate(w):
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"weights[{k}] (client {k}) is {v}; weights must be finite and >= 0")
    tot = sum(w)
    if tot <= 0:
        raise ValueError("all weights are zero; at least one client needs a positive weight")
    return [v / tot for v in w]


def plan_modules(client_shapes: Sequence[Mapping[str, Sequence[int]]],
                 configs: Optional[Sequence[Any]] = None, weights=None, *,
                 client_names: Optional[Sequence[str]] = None) -> ModelPlan:
    """Plan a model aggregation from each client's ``{key: shape}`` and adapter config.

    No tensor is read. Raises ValueError naming the client and the module for: a module missing
    in a client (or present only in it), factors of different shapes (different base models),
    inconsistent ``fan_in_fan_out``, a config whose r disagrees with the tensors, refused keys,
    non-LoRA keys that differ across clients, and a client with no LoRA module at all.
    """
    K = len(client_shapes)
    if K == 0:
        raise ValueError("no clients: pass at least one adapter")
    names = [f"client {k}" for k in range(K)] if client_names is None else [str(c) for c in client_names]
    if len(names) != K:
        raise ValueError(f"{len(names)} client names for {K} clients")
    if configs is None:
        cfgs: list[Optional[dict]] = [None] * K
    elif isinstance(configs, Mapping) or hasattr(configs, "to_dict"):
        cfgs = [config_dict(configs, client=names[k]) for k in range(K)]
    else:
        cfgs = [config_dict(c, client=names[k]) for k, c in enumerate(configs)]
        if len(cfgs) != K:
            raise ValueError(f"expected {K} configs (one per client), got {len(cfgs)}")
    p = _normalise_weights(weights, K)
    groups = []
    others = []
    skipped: set[str] = set()
    for k, shapes in enumerate(client_shapes):
        g, o = group_lora_keys(shapes.keys(), client=names[k])
        if not g:
            raise ValueError(f"{names[k]}: no LoRA factors found (expected keys like "
                             "'<module>.lora_A.weight' / '<module>.lora_B.weight')")
        groups.append(g)
        # PEFT saves the frozen base layer of a targeted Embedding (save_embedding_layers): a copy of
        # the base weight, not an update. It is not written to the output (loading it would undo a
        # merged residual); the base model provides it.
        keep = [key for key in o if not any(key.startswith(f"{mod}.base_layer.") for mod in g)]
        live = next(iter(g.values())).adapter
        if live is not None:
            # live form (a PeftModel's state_dict()): only tensors of this adapter (modules_to_save.<name>,
            # trainable tokens) are the client's; the rest is the frozen base model
            keep = [key for key in keep if f".{live}." in f".{key}."]
        others.append(keep)
        skipped.update(key for key in o if key not in others[-1])
    ref_mods = set(groups[0])
    for k in range(1, K):
        mods = set(groups[k])
        if mods != ref_mods:
            missing = sorted(ref_mods - mods, key=_natural_key)
            extra = sorted(mods - ref_mods, key=_natural_key)
            if missing:
                raise ValueError(f"{names[k]}: has no LoRA factors for module {missing[0]!r} (present in "
                                 f"{names[0]}; {len(missing)} module(s) missing in all); the clients "
                                 "must adapt the same modules (same target_modules)")
            raise ValueError(f"{names[k]}: has LoRA factors for module {extra[0]!r}, which {names[0]} "
                             f"does not adapt ({len(extra)} extra module(s)); the clients must adapt "
                             "the same modules (same target_modules)")
    fifo = [bool(c.get("fan_in_fan_out", False)) if c else False for c in cfgs]
    if len(set(fifo)) > 1:
        k = fifo.index(not fifo[0])
        raise ValueError(f"{names[k]}: adapter_config fan_in_fan_out={fifo[k]} but {names[0]} has "
                         f"{fifo[0]}; the clients must share one base model layout")
    specs = []
    for mod in sorted(ref_mods, key=_natural_key):
        keys = tuple(groups[k][mod] for k in range(K))
        ranks, scal, alphas, rsl = [], [], [], []
        m = n = None
        for k, lk in enumerate(keys):
            if lk.embedding != keys[0].embedding:
                raise ValueError(f"{names[k]}: module {mod!r} is {'an Embedding' if lk.embedding else 'a Linear'} "
                                 f"LoRA but {'not' if lk.embedding else 'an Embedding'} in {names[0]}")
            a_shape = tuple(int(v) for v in client_shapes[k][lk.a_key])
            b_shape = tuple(int(v) for v in client_shapes[k][lk.b_key])
            if len(a_shape) != 2 or len(b_shape) != 2:
                raise ValueError(f"{names[k]}: module {mod!r}: lora_A {a_shape} and lora_B {b_shape} must be "
                                 "2-D (Conv LoRA is not supported)")
            if a_shape[0] != b_shape[1]:
                raise ValueError(f"{names[k]}: module {mod!r}: lora_A is {a_shape} but lora_B is {b_shape}: "
                                 "the LoRA rank must match")
            if m is None:
                m, n = b_shape[0], a_shape[1]
            elif (b_shape[0], a_shape[1]) != (m, n):
                raise ValueError(f"{names[k]}: module {mod!r}: lora_B @ lora_A is {b_shape[0]} x {a_shape[1]} "
                                 f"but {m} x {n} in {names[0]}: the clients were trained on base models "
                                 "with different shapes")
            r = a_shape[0]
            if r < 1:
                raise ValueError(f"{names[k]}: module {mod!r}: LoRA rank is 0")
            s, alpha, rs = client_scaling(cfgs[k], mod, r, client=names[k])
            ranks.append(r)
            scal.append(s)
            alphas.append(alpha)
            rsl.append(rs)
        kind = "embedding" if keys[0].embedding else ("conv1d" if fifo[0] else "linear")
        specs.append(ModuleSpec(mod, kind, m, n, tuple(ranks), tuple(scal), tuple(alphas), keys, tuple(rsl)))
    # non-LoRA keys: matched by name, same shape in every client
    ref_other = sorted(others[0])
    for k in range(1, K):
        if set(others[k]) != set(ref_other):
            diff = sorted(set(others[k]) ^ set(ref_other))
            raise ValueError(f"{names[k]}: non-LoRA key {diff[0]!r} is in one of {names[k]}, {names[0]} but "
                             "not the other; all clients must hold the same non-LoRA tensors")
    oshapes = []
    for key in ref_other:
        s0 = tuple(int(v) for v in client_shapes[0][key])
        for k in range(1, K):
            sk = tuple(int(v) for v in client_shapes[k][key])
            if sk != s0:
                raise ValueError(f"{names[k]}: non-LoRA tensor {key!r} has shape {sk}, expected {s0} "
                                 f"(as in {names[0]})")
        oshapes.append(s0)
    return ModelPlan(tuple(names), tuple(p), tuple(cfgs), tuple(specs),
                     tuple(tuple(ref_other) for _ in range(K)), tuple(oshapes),
                     tuple(sorted(skipped, key=_natural_key)))


# ----------------------------------------------------------------------------- results

@dataclass
class ModuleReport:
    """What happened at one module (``fedmomentum.ModelAggregation.report`` rows)."""

    name: str
    shape: tuple[int, int]      #: (m, n) of ΔW' = B @ A (lora_B rows, lora_A columns)
    ranks: tuple[int, ...]      #: per client
    rank: int                   #: output rank
    solver: str
    seconds: float              #: aggregation time (excludes reading the factors)
    energy_kept: float          #: ‖top-r‖² / ‖ΔW‖² (nan for methods that do not compute it)
    method: str = "fedmomentum"
    kind: str = "linear"
    out_scaling: float = 1.0
    residual_rank: int = 0      #: 0 when there is none or it was discarded
    residual: str = "factored"  #: "factored", "discarded" (energy in energy_dropped) or "none"
    energy_dropped: float = 0.0
    exact: bool = True
    read_seconds: float = 0.0   #: time to load this module's client factors
    info: dict = field(default_factory=dict)
    #: with ``profile=True`` (see :mod:`fedmomentum_core.profiling`): modelled FLOPs, bytes read +
    #: written, and the peak memory growth while this module was read and aggregated; else None
    flops: Optional[float] = None
    bytes: Optional[int] = None
    peak_memory_bytes: Optional[int] = None


@dataclass
class ModuleResult:
    """:func:`aggregate_module`'s output for one module."""

    tensors: dict[str, torch.Tensor]   #: saved-form adapter keys -> new factors (input dtype)
    residual: Optional[LowRank]        #: base-weight orientation, scalings included
    report: ModuleReport
    out_alpha: float
    out_use_rslora: bool


@dataclass
class ModelAggregation:
    """A model-level aggregation (``fedmomentum.aggregate`` / ``fedmomentum.peft.aggregate_adapters``).

    Attributes:
        state_dict: the new adapter in PEFT saved key names (``…lora_A.weight``/``…lora_B.weight``,
            ``…lora_embedding_A/B``) plus the averaged non-LoRA tensors, in the input dtype: what
            ``set_peft_model_state_dict`` / ``save_pretrained`` expect. ``fedsa_lora`` gives A only.
        residuals: module path -> :class:`LowRank` in the orientation of that base module's
            ``weight`` (merge with ``weight += left @ right``), scalings included, compute dtype
            (fp32 by default). Empty when the residual was discarded or the method has none.
        report: one :class:`ModuleReport` per module, in module order.
        config: the output adapter_config fields (r, lora_alpha, use_rslora, rank_pattern,
            alpha_pattern, target_modules, … copied from client 0 otherwise).
        method: the method used; ``residual_mode``: "factored", "discarded" or "none".
    """

    state_dict: dict[str, torch.Tensor]
    residuals: dict[str, LowRank]
    report: list[ModuleReport]
    config: dict
    method: str = "fedmomentum"
    residual_mode: str = "factored"
    seconds: float = 0.0
    profile: bool = False
    #: input keys deliberately not carried over (frozen base-layer copies, see :class:`ModelPlan`)
    skipped_keys: list = field(default_factory=list)

    def summary(self) -> str:
        """The closing table the CLI prints."""
        return format_report(self)


def format_report(agg: ModelAggregation, max_rows: int = 60) -> str:
    """A plain-text table of the per-module report (first ``max_rows`` rows and a total line)."""
    rows = agg.report
    head = f"{'module':<52} {'m x n':>12} {'ranks':>12} {'r':>4} {'solver':>10} {'res.r':>5} {'kept':>8} {'ms':>8}"
    lines = [head, "-" * len(head)]
    for rep in rows[:max_rows]:
        name = rep.name if len(rep.name) <= 52 else "…" + rep.name[-51:]
        ranks = ",".join(str(r) for r in rep.ranks) if len(set(rep.ranks)) > 1 else f"{len(rep.ranks)}x{rep.ranks[0]}"
        kept = "-" if rep.energy_kept != rep.energy_kept else f"{rep.energy_kept:.4f}"
        lines.append(f"{name:<52} {f'{rep.shape[0]}x{rep.shape[1]}':>12} {ranks:>12} {rep.rank:>4} "
                     f"{rep.solver:>10} {rep.residual_rank:>5} {kept:>8} {1e3 * rep.seconds:>8.1f}")
    if len(rows) > max_rows:
        lines.append(f"… {len(rows) - max_rows} more modules")
    tot = sum(r.seconds for r in rows)
    rd = sum(r.read_seconds for r in rows)
    dropped = [r.energy_dropped for r in rows if r.energy_dropped == r.energy_dropped and r.energy_dropped > 0]
    lines.append(f"{len(rows)} modules, method {agg.method}, residual {agg.residual_mode}: "
                 f"{tot:.3f} s aggregating, {rd:.3f} s reading"
                 + (f"; max energy dropped {max(dropped):.3g}" if dropped else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- one module

def _module_out_scaling(spec: ModuleSpec, p: Sequence[float]) -> float:
    """The output scale s at a module: the clients' common s_k, else the p-weighted mean Σ p_k s_k."""
    s = spec.scalings
    if all(abs(v - s[0]) <= 1e-12 * max(1.0, abs(s[0])) for v in s):
        return float(s[0])
    return float(sum(pk * sk for pk, sk in zip(p, s)))


def aggregate_module(spec: ModuleSpec, B: Sequence[torch.Tensor], A: Sequence[torch.Tensor],
                     p: Sequence[float], *, rank: Optional[int] = None, method: str = "fedmomentum",
                     solver: str = "auto", residual: str = "factored", out_use_rslora: bool = False,
                     clients: Optional[Sequence[str]] = None, read_seconds: float = 0.0,
                     **layer_kwargs) -> ModuleResult:
    """Aggregate one module given its K client factors (lora_B, lora_A as stored by PEFT).

    ``rank`` None keeps max r_k; ``residual`` "factored" keeps the tail, "none" drops it (reported
    as "discarded" with its energy for fedmomentum). The output scaling is the clients' common s_k
    or, when they differ, Σ p_k s_k (a scale of B·A only: the product s·B·A is what is aggregated);
    the returned ``out_alpha`` is s·r (s·√r with ``out_use_rslora``). Errors from the layer are
    re-raised as ValueError/TypeError naming the module and the clients' names.
    """
    out_s = _module_out_scaling(spec, p)
    r = rank if rank is not None else max(spec.ranks)
    try:
        res = aggregate_layer(list(B), list(A), list(p), rank=r, scalings=list(spec.scalings),
                              out_scaling=out_s, method=method, solver=solver, residual=residual,
                              name=spec.name, **layer_kwargs)
    except (ValueError, TypeError) as e:
        msg = str(e)
        if clients is not None:
            for k in sorted(range(len(clients)), reverse=True):  # "client 10" before "client 1"
                msg = msg.replace(f"client {k}", f"client {k} ({clients[k]})")
        raise type(e)(msg) from None
    a_key, b_key = spec.out_keys()
    tensors = {a_key: res.A}
    if res.B is not None:
        tensors[b_key] = res.B
    resid = res.residual
    if resid is not None and resid.rank == 0:
        resid = None
    if resid is not None and spec.transpose:
        resid = LowRank(resid.right.T.contiguous(), resid.left.T.contiguous())
    if residual == "none":
        mode = "discarded" if method in ("fedmomentum", "flora", "fedex_lora", "ffa_lora") else "none"
    else:
        mode = "factored" if resid is not None else "none"
    dropped = float(res.energy_dropped)
    if mode == "discarded" and method == "fedmomentum" and res.energy_kept == res.energy_kept:
        dropped = max(0.0, 1.0 - float(res.energy_kept))  # the whole tail was dropped
    r_out = res.rank
    alpha = out_s * (math.sqrt(r_out) if out_use_rslora else r_out)
    rep = ModuleReport(name=spec.name, shape=(spec.m, spec.n), ranks=spec.ranks, rank=r_out,
                       solver=res.solver, seconds=float(res.info.get("seconds", 0.0)),
                       energy_kept=float(res.energy_kept), method=method, kind=spec.kind,
                       out_scaling=out_s, residual_rank=0 if resid is None else resid.rank,
                       residual=mode, energy_dropped=dropped, exact=bool(res.exact),
                       read_seconds=read_seconds,
                       info={k: v for k, v in res.info.items() if k != "seconds"})
    return ModuleResult(tensors, resid, rep, alpha, out_use_rslora)


# ----------------------------------------------------------------------------- config

def _nice(x: float):
    return int(round(x)) if abs(x - round(x)) < 1e-9 * max(1.0, abs(x)) else float(x)


def output_config(plan: ModelPlan, results: Sequence[ModuleResult], *, rank: Optional[int] = None,
                  base: Optional[dict] = None) -> dict:
    """The output adapter_config fields, consistent with the written factors.

    ``r`` = ``rank`` when given, else the most common output rank; ``lora_alpha`` the most common
    output alpha; modules that differ get ``rank_pattern`` / ``alpha_pattern`` entries keyed by their
    full path inside the base model (checked against PEFT's matching rule; regex-escaped if a plain
    path would match another module). ``use_rslora`` is True only when every client used it.
    ``target_modules`` is client 0's when every client has the same, else the sorted list of the
    adapted module paths. Other fields are copied from ``base`` (client 0's config).
    """
    cfg = dict(base or {})
    ranks = [res.report.rank for res in results]
    alphas = [_nice(res.out_alpha) for res in results]
    g_r = rank if rank is not None else (Counter(ranks).most_common(1)[0][0] if ranks else 8)
    g_alpha = Counter(alphas).most_common(1)[0][0] if alphas else g_r
    rels = [res_spec.rel_name for res_spec in plan.modules]
    keys = list(rels)
    for esc in (False, True):
        keys = [re.escape(x) for x in rels] if esc else list(rels)
        if all(peft_pattern_key(keys, rel) == keys[i] for i, rel in enumerate(rels)):
            break
    rank_pattern = {keys[i]: r for i, r in enumerate(ranks) if r != g_r}
    alpha_pattern = {keys[i]: a for i, a in enumerate(alphas) if a != g_alpha}
    tms = [c.get("target_modules") if c else None for c in plan.configs]
    norm = [sorted(t) if isinstance(t, (list, tuple, set)) else t for t in tms]
    if all(t == norm[0] for t in norm) and tms[0] is not None:
        target = sorted(tms[0]) if isinstance(tms[0], (list, tuple, set)) else tms[0]
    else:
        target = sorted(rels, key=_natural_key)
    rs = bool(results) and all(res.out_use_rslora for res in results)
    cfg.update(r=g_r, lora_alpha=g_alpha, use_rslora=rs, rank_pattern=rank_pattern,
               alpha_pattern=alpha_pattern, target_modules=target)
    cfg.setdefault("peft_type", "LORA")
    return cfg


# ----------------------------------------------------------------------------- the loop

FactorLoader = Callable[[ModuleSpec], tuple[list[torch.Tensor], list[torch.Tensor]]]
TensorLoader = Callable[[str], list[torch.Tensor]]


def _check_method_residual(method: str, residual: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    if residual not in ("factored", "none"):
        raise ValueError(f"residual must be 'factored' or 'none', got {residual!r}")


def run_plan(plan: ModelPlan, load_factors: FactorLoader, load_other: Optional[TensorLoader] = None, *,
             rank: Optional[int] = None, method: str = "fedmomentum", solver: str = "auto",
             residual: str = "factored", progress: bool = False, profile: bool = False,
             on_module: Optional[Callable[[ModuleResult], None]] = None, keep_residuals: bool = True,
             max_memory: Union[str, int, None] = None, **layer_kwargs) -> ModelAggregation:
    """Aggregate every module of ``plan``, loading one module's client factors at a time.

    ``load_factors(spec)`` returns ``(B_list, A_list)`` for that module (lora_B, lora_A per client);
    ``load_other(key)`` the K tensors of a non-LoRA key (averaged with p_k). ``on_module`` sees each
    :class:`ModuleResult` as it is produced (e.g. to stream or merge its residual at once);
    ``keep_residuals=False`` then drops each residual after ``on_module`` (memory: one module). With
    ``progress`` a tqdm bar runs over the modules; ``profile`` adds per-module read time and byte
    counts to :class:`ModuleReport.info` (the report is stored either way) and fills the
    report's ``flops``, ``bytes`` and ``peak_memory_bytes`` (:mod:`fedmomentum_core.profiling`).
    ``max_memory`` (e.g. ``"2GB"``) is a budget for the memory this call holds on top of its
    inputs' storage: one module's factors and work at a time plus the outputs kept until the end;
    it is checked from the shapes before anything is read (ValueError naming the module that
    cannot fit, or saying that the kept outputs alone exceed it).
    """
    _check_method_residual(method, residual)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
        raise TypeError(f"rank must be an int or None, got {type(rank).__name__}")
    if max_memory is not None:
        _check_budget(plan, max_memory, rank=rank, solver=solver, residual=residual)
    out_rs = all(c.get("use_rslora", False) if c else False for c in plan.configs)
    t_all = time.perf_counter()
    it: Iterable[ModuleSpec] = plan.modules
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(plan.modules, desc=f"aggregate ({method})", unit="module")
        it = bar
    results: list[ModuleResult] = []
    state: dict[str, torch.Tensor] = {}
    residuals: dict[str, LowRank] = {}
    try:
        for spec in it:
            pm = _profiling.PeakMemory("cpu") if profile else contextlib.nullcontext()
            with pm:
                t0 = time.perf_counter()
                B, A = load_factors(spec)
                t_read = time.perf_counter() - t0
                res = aggregate_module(spec, B, A, plan.p, rank=rank, method=method, solver=solver,
                                       residual=residual, out_use_rslora=out_rs, clients=plan.clients,
                                       read_seconds=t_read, **layer_kwargs)
            if profile:
                res.report.info["input_bytes"] = sum(t.numel() * t.element_size() for t in list(B) + list(A))
                res.report.info["residual_bytes"] = 0 if res.residual is None else res.residual.nbytes
                _attach_profile(res.report, B[0].element_size() if len(B) else 4, pm.delta_bytes,
                                residual == "factored")
            del B, A
            if max_memory is not None:  # a kept scratch buffer is not in the next module's estimate
                _release_workspace()
            state.update(res.tensors)
            if res.residual is not None and keep_residuals:
                residuals[spec.name] = res.residual
            if on_module is not None:
                on_module(res)
            res.residual = None  # kept once, in ``residuals``
            results.append(res)
    finally:
        if bar is not None:
            bar.close()
    if plan.other_keys and plan.other_keys[0]:
        if load_other is None:
            raise ValueError(f"non-LoRA keys {list(plan.other_keys[0])[:3]}… need a loader")
        for key in plan.other_keys[0]:
            ts = load_other(key)
            for k, t in enumerate(ts):
                if not t.dtype.is_floating_point:
                    raise TypeError(f"{plan.clients[k]}: non-LoRA tensor {key!r} has dtype {t.dtype}; only "
                                    "floating tensors can be averaged")
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"{plan.clients[k]}: non-LoRA tensor {key!r} has NaN/Inf entries")
            acc = sum(pk * t.to(torch.float32) for pk, t in zip(plan.p, ts))
            state[key] = acc.to(ts[0].dtype)
    cfg = output_config(plan, results, rank=rank, base=plan.configs[0])
    mode = "factored" if residual == "factored" else "discarded"
    if residual == "factored" and not any(r.report.residual_rank for r in results):
        mode = "none"
    return ModelAggregation(state_dict=state, residuals=residuals, report=[r.report for r in results],
                            config=cfg, method=method, residual_mode=mode,
                            seconds=time.perf_counter() - t_all, profile=profile,
                            skipped_keys=list(plan.skipped_keys))


def _attach_profile(rep: ModuleReport, itemsize: int, peak: int, residual: bool) -> None:
    """Fill ``rep.flops``/``bytes``/``peak_memory_bytes`` and ``rep.info["profile"]`` (the same
    record as ``fedmomentum profile`` writes per module)."""
    rec = _profiling.module_record(rep.name, rep.shape[0], rep.shape[1], rep.ranks, rep.rank,
                                   rep.solver, rep.seconds, rep.energy_kept, itemsize=itemsize,
                                   peak_memory_bytes=peak, residual=residual, kind=rep.kind)
    rep.flops, rep.bytes, rep.peak_memory_bytes = rec.flops, rec.bytes, rec.peak_memory_bytes
    rep.info["profile"] = rec.to_dict()


def _check_budget(plan: ModelPlan, max_memory, *, rank, solver: str, residual: str) -> None:
    """Raise ValueError when ``plan`` cannot run within ``max_memory`` bytes (estimates of
    :func:`fedmomentum_core.profiling.module_memory_bytes`, fp32 factors assumed: conservative)."""
    budget = _profiling.parse_memory(max_memory)
    kept = 0
    worst, worst_name = 0, ""
    for spec in plan.modules:
        r = rank if rank is not None else max(spec.ranks)
        R = sum(spec.ranks)
        r = max(1, min(r, spec.m, spec.n))
        s = solver if solver in ("exact", "randomized", "dense") else choose_solver(spec.m, spec.n, R, r)
        need = _profiling.module_memory_bytes(spec.m, spec.n, spec.ranks, r, s, itemsize=4)
        if need > budget:
            raise ValueError(f"module {spec.name!r} ({spec.m} x {spec.n}, R={R}) alone needs about "
                             f"{_profiling._fmt_bytes(need)} to aggregate but max_memory is "
                             f"{_profiling._fmt_bytes(budget)}; raise max_memory to at least "
                             f"{_profiling._fmt_bytes(need)}")
        if need > worst:
            worst, worst_name = need, spec.name
        kept += (spec.m + spec.n) * r * 4
        if residual == "factored":
            kept += (spec.m + spec.n) * (R + r) * 4
    if worst + kept > budget:
        raise ValueError(f"max_memory {_profiling._fmt_bytes(budget)} is too small for this round: the "
                         f"outputs kept until the end (new adapter + residuals) need about "
                         f"{_profiling._fmt_bytes(kept)} and the largest module ({worst_name}) "
                         f"{_profiling._fmt_bytes(worst)} more; raise max_memory, or discard the residual")


def aggregate_state_dicts(client_state_dicts: Sequence[Mapping[str, torch.Tensor]], weights=None, *,
                          configs=None, rank: Optional[int] = None, method: str = "fedmomentum",
                          solver: str = "auto", residual: str = "factored",
                          client_names: Optional[Sequence[str]] = None, progress: bool = False,
                          profile: bool = False, **layer_kwargs) -> ModelAggregation:
    """In-memory model aggregation (``fedmomentum.aggregate``): K PEFT state dicts (saved or live
    key form) and their adapter configs (dicts or LoraConfig; one for all, K, or None = s_k 1)."""
    if isinstance(client_state_dicts, Mapping):
        raise TypeError("client_state_dicts must be a sequence of K state dicts (one per client), "
                        "got a single mapping")
    sds = list(client_state_dicts)
    for k, sd in enumerate(sds):
        if not isinstance(sd, Mapping):
            raise TypeError(f"client {k}: state dict must be a mapping of str -> Tensor, got {type(sd).__name__}")
        for key, t in sd.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"client {k}: {key!r} is a {type(t).__name__}, not a torch.Tensor")
    _check_method_residual(method, residual)
    plan = plan_modules([{k: tuple(t.shape) for k, t in sd.items()} for sd in sds], configs, weights,
                        client_names=client_names)

    def load(spec: ModuleSpec):
        return ([sds[k][lk.b_key] for k, lk in enumerate(spec.keys)],
                [sds[k][lk.a_key] for k, lk in enumerate(spec.keys)])

    def load_other(key: str):
        return [sd[key] for sd in sds]

    return run_plan(plan, load, load_other, rank=rank, method=method, solver=solver, residual=residual,
                    progress=progress, profile=profile, **layer_kwargs)
