"""Every PEFT naming and scaling rule, in one place.

Used by the adapter-folder path (:mod:`fedmomentum.peft`), the state-dict path
(``fedmomentum.aggregate``), the Flower strategy (:mod:`fedmomentum.flower`) and the torchrun
path (:mod:`fedmomentum.distributed`). No tensors are read here.

Key forms (``<m>`` is the module path, e.g. ``base_model.model.model.layers.0.self_attn.q_proj``):

* saved (``get_peft_model_state_dict`` / ``adapter_model.safetensors``):
  ``<m>.lora_A.weight``, ``<m>.lora_B.weight``; Embedding: ``<m>.lora_embedding_A``,
  ``<m>.lora_embedding_B``;
* live (``model.state_dict()`` of a PeftModel): ``<m>.lora_A.<adapter>.weight`` and
  ``<m>.lora_embedding_A.<adapter>`` (one adapter name per client).

Refused (ValueError naming the client): DoRA magnitude vectors (``lora_magnitude_vector``),
``lora_B`` biases (``lora_bias=True``) and any other ``lora_*`` tensor that is not an A/B factor,
and configs with ``use_dora=True``.

Scalings, exactly as PEFT computes ``lora_layer.scaling[adapter]``: s = lora_alpha / r, or
lora_alpha / √r with ``use_rslora``; r and lora_alpha default to PEFT's 8 and 8; ``rank_pattern``
and ``alpha_pattern`` override them per module with PEFT's ``get_pattern_key`` rule: the first
pattern key ``key`` in dict order with ``re.match(rf"(.*\\.)?({key})$", module)``, where ``module``
is the path without the ``base_model.model.`` prefix (so a key such as ``q_proj|v_proj`` or
``layers.0.*`` works as in PEFT). ``configs=None`` means s_k = 1 for every client.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

__all__ = [
    "PEFT_PREFIX", "DEFAULT_R", "DEFAULT_ALPHA", "LoraKeys", "group_lora_keys", "relative_module_name",
    "module_path_candidates", "weight_key_candidates", "parse_saved_key", "live_key", "adapter_pairs",
    "peft_pattern_key", "pattern_value", "config_dict", "module_rank_alpha", "lora_scaling",
    "client_scaling", "output_config", "natural_key",
]

#: the prefix PEFT puts in front of the base model's module paths in saved adapter keys
PEFT_PREFIX = "base_model.model."
#: LoraConfig's defaults for ``r`` and ``lora_alpha`` (peft.LoraConfig)
DEFAULT_R = 8
DEFAULT_ALPHA = 8

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


def pattern_value(pattern: Optional[Mapping[str, Any]], module: str, default):
    """``pattern[key]`` for the key :func:`peft_pattern_key` picks for ``module``, else ``default``."""
    key = peft_pattern_key((pattern or {}).keys(), relative_module_name(module))
    return default if key is None else pattern[key]


def module_path_candidates(module: str) -> tuple[str, ...]:
    """Paths under which ``module`` (a saved-key module path, with or without
    ``base_model.model.``) may live in a model: as given, inside the base model, and inside a
    PeftModel (one or two prefixes)."""
    rel = relative_module_name(module)
    return tuple(dict.fromkeys((module, rel, PEFT_PREFIX + rel, PEFT_PREFIX + PEFT_PREFIX + rel)))


def weight_key_candidates(module: str) -> tuple[str, ...]:
    """State-dict keys that may hold ``module``'s base weight (plain model or PeftModel)."""
    rel = relative_module_name(module)
    return tuple(dict.fromkeys((rel + ".weight", module + ".base_layer.weight",
                                rel + ".base_layer.weight", module + ".weight")))


def parse_saved_key(key: str) -> Optional[tuple[str, str]]:
    """``(module, "A" | "B")`` for a saved-form LoRA factor key (``<m>.lora_A.weight`` or
    ``<m>.lora_embedding_A``), None for anything else."""
    for rx in (_SAVED, _EMB_SAVED):
        mt = rx.match(key)
        if mt:
            return mt.group("mod"), mt.group("which")[-1]
    return None


def adapter_pairs(state_dict: Mapping[str, Any], *, where: str = "adapter") -> dict[str, tuple[Any, Any]]:
    """module -> ``(lora_B, lora_A)`` of a saved-form adapter state dict (``<m>.lora_A.weight`` /
    ``<m>.lora_B.weight``, ``<m>.lora_embedding_A`` / ``_B``), module names as in the saved keys
    (what the aggregation names its layers: the ``reference`` dict of fedrot_lora). Non-LoRA keys
    are ignored. ValueError naming ``where`` when a factor has no partner or there is no pair."""
    found: dict[str, dict[str, Any]] = {}
    for key, t in state_dict.items():
        mod = parse_saved_key(key)
        if mod is not None:
            found.setdefault(mod[0], {})[mod[1]] = (key, t)
    pairs = {}
    for mod, fac in found.items():
        if set(fac) != {"A", "B"}:
            have, = fac.values()
            raise ValueError(f"{where}: {have[0]} has no matching lora_{'B' if 'A' in fac else 'A'} factor")
        pairs[mod] = (fac["B"][1], fac["A"][1])
    if not pairs:
        raise ValueError(f"{where}: no lora_A/lora_B pairs")
    return pairs


def live_key(key: str, adapter_name: str) -> str:
    """Saved key -> live key (``lora_A.weight`` -> ``lora_A.<name>.weight``; embeddings:
    ``lora_embedding_A`` -> ``lora_embedding_A.<name>``)."""
    if key.endswith(".weight"):
        return f"{key[:-len('.weight')]}.{adapter_name}.weight"
    return f"{key}.{adapter_name}"


def natural_key(s: str):
    """Sort key that orders ``layers.2`` before ``layers.10``."""
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


def module_rank_alpha(config: Mapping, module: str) -> tuple[Any, Any, Optional[str]]:
    """``(r, lora_alpha, rank_pattern key or None)`` of ``module`` under ``config`` (PEFT's rule
    and defaults; values as found, not converted)."""
    rel = relative_module_name(module)
    rp = config.get("rank_pattern") or {}
    ap = config.get("alpha_pattern") or {}
    rk = peft_pattern_key(rp.keys(), rel)
    ak = peft_pattern_key(ap.keys(), rel)
    r = rp[rk] if rk is not None else config.get("r", DEFAULT_R)
    alpha = ap[ak] if ak is not None else config.get("lora_alpha", DEFAULT_ALPHA)
    return r, alpha, rk


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's LoRA scale: α/r, or α/√r with rsLoRA."""
    return float(alpha / math.sqrt(rank) if use_rslora else alpha / rank)


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
    r_cfg, alpha, rk = module_rank_alpha(config, module)
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
    return lora_scaling(alpha, rank, rs), alpha, rs


# ----------------------------------------------------------------------------- output config

def _nice(x: float):
    return int(round(x)) if abs(x - round(x)) < 1e-9 * max(1.0, abs(x)) else float(x)


def output_config(plan, results: Sequence, *, rank: Optional[int] = None,
                  base: Optional[dict] = None, method: Optional[str] = None) -> dict:
    """The output adapter_config fields, consistent with the written factors.

    ``r`` = ``rank`` when given, else the most common output rank; ``lora_alpha`` the most common
    output alpha; modules that differ get ``rank_pattern`` / ``alpha_pattern`` entries keyed by their
    full path inside the base model (checked against PEFT's matching rule; regex-escaped if a plain
    path would match another module). ``use_rslora`` is True only when every client used it.
    ``target_modules`` is client 0's when every client has the same, else the sorted list of the
    adapted module paths. Other fields are copied from ``base`` (client 0's config). With
    ``method`` given (the adapter-folder path), a method whose clients keep their own B gets a
    ``fedmomentum_note`` saying how to load the A-only adapter.
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
        target = sorted(rels, key=natural_key)
    rs = bool(results) and all(res.out_use_rslora for res in results)
    cfg.update(r=g_r, lora_alpha=g_alpha, use_rslora=rs, rank_pattern=rank_pattern,
               alpha_pattern=alpha_pattern, target_modules=target)
    cfg.setdefault("peft_type", "LORA")
    if method is not None:
        from fedmomentum_core import get_method
        if get_method(method).keeps_client_B:
            cfg["fedmomentum_note"] = (f"{method}: lora_A only; clients keep their own lora_B "
                                       "(load with set_peft_model_state_dict)")
    return cfg
