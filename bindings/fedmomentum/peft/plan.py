"""Planning a PEFT aggregation: which modules, their shapes, client ranks and scalings.

* :func:`plan_modules` turns the K clients' ``{key: shape}`` (no tensors) and adapter configs into
  a :class:`ModelPlan`: one :class:`ModuleSpec` per adapted module, plus the non-LoRA keys to
  average (``modules_to_save`` copies, biases, trainable tokens) and the keys deliberately skipped
  (frozen ``<module>.base_layer.*`` copies PEFT saves for targeted Embeddings; for a live-form
  client the frozen base model).
* :func:`plan_adapters` does the same for K adapter folders from their configs and safetensors
  headers only (:class:`AdapterPlan`).
* :func:`aggregate_plan` runs a plan through the engine
  (:func:`fedmomentum_core.plan.run_plan`) and adds the output adapter config;
  :func:`aggregate_state_dicts` is the in-memory entry point (``fedmomentum.aggregate``).

Orientation: ΔW' = Σ_k p_k s_k B_k A_k with B_k = lora_B (m x r_k) and A_k = lora_A (r_k x n),
exactly as PEFT stores them. The base weight is ΔW' for nn.Linear, ΔW'ᵀ for GPT-2 Conv1D
(``fan_in_fan_out=True``) and for nn.Embedding (lora_embedding_A is r x num_embeddings and
lora_embedding_B is embedding_dim x r). Naming and scaling rules: :mod:`fedmomentum.peft.rules`.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from fedmomentum_core import get_method
from fedmomentum_core.plan import (LayerSpec, ModelAggregation, ModuleResult, aggregate_module,
                                   check_method_residual, run_plan)

from . import io as _io
from .rules import (LoraKeys, client_scaling, config_dict, group_lora_keys, natural_key, output_config,
                    relative_module_name)

__all__ = ["RESIDUAL_MODES", "check_adapter_args", "check_adapter_paths", "ModuleSpec", "ModelPlan", "AdapterPlan", "plan_modules", "plan_adapters", "aggregate_plan",
           "aggregate_adapter_module", "aggregate_state_dicts", "normalise_weights", "out_use_rslora"]


@dataclass(frozen=True)
class ModuleSpec(LayerSpec):
    """One adapted PEFT module across the K clients (shapes only; no tensors).

    Fields of :class:`~fedmomentum_core.plan.LayerSpec`: ``name`` (module path as in client 0's
    keys, before ``.lora_A``), ``kind`` ("linear", "conv1d" for fan_in_fan_out, "embedding"),
    ``m`` (lora_B rows), ``n`` (lora_A columns), ``ranks``, ``scalings``; then the PEFT parts.
    """

    alphas: tuple[float, ...]
    keys: tuple[LoraKeys, ...]  #: per client
    use_rslora: tuple[bool, ...]

    @property
    def rel_name(self) -> str:
        """The path inside the base model (what rank_pattern/target_modules match)."""
        return relative_module_name(self.name)

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


def normalise_weights(weights, K: int) -> list[float]:
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
    p = normalise_weights(weights, K)
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
            missing = sorted(ref_mods - mods, key=natural_key)
            extra = sorted(mods - ref_mods, key=natural_key)
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
    for mod in sorted(ref_mods, key=natural_key):
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
                     tuple(sorted(skipped, key=natural_key)))





def out_use_rslora(plan: ModelPlan) -> bool:
    """The output adapter uses rsLoRA only when every client did."""
    return all(c.get("use_rslora", False) if c else False for c in plan.configs)


def aggregate_plan(plan: ModelPlan, load_factors, load_other=None, *, rank: Optional[int] = None,
                   method: str = "fedmomentum", adapter_note: bool = False, **kwargs) -> ModelAggregation:
    """Run ``plan`` through :func:`fedmomentum_core.plan.run_plan` (same keyword arguments:
    solver, residual, progress, profile, on_module, keep_residuals, max_memory, layer options) and
    fill the output adapter config (:func:`fedmomentum.peft.rules.output_config`; with
    ``adapter_note`` the note an A-only adapter carries)."""
    def make_config(results):
        return output_config(plan, results, rank=rank, base=plan.configs[0],
                             method=method if adapter_note else None)

    return run_plan(plan, load_factors, load_other, rank=rank, method=method,
                    out_use_rslora=out_use_rslora(plan), make_config=make_config, **kwargs)


# ----------------------------------------------------------------------------- adapter folders

#: what ``aggregate_adapters(residual=...)`` accepts
RESIDUAL_MODES = ("save", "merge", "discard")


def check_adapter_args(adapter_dirs, out_dir, *, residual: str, method: str, base_model=None,
                       merged_out=None) -> None:
    """The argument checks of the adapter-folder path that read no file (identical on every rank of
    the torchrun path): ValueError/TypeError naming the argument."""
    if isinstance(adapter_dirs, (str, os.PathLike)):
        raise TypeError("adapter_dirs must be a sequence of K adapter folders, got a single path")
    if residual not in RESIDUAL_MODES:
        raise ValueError(f"residual must be one of {list(RESIDUAL_MODES)}, got {residual!r}")
    if residual == "merge":
        if base_model is None or merged_out is None:
            raise ValueError("residual='merge' needs base_model (a transformers model folder) and "
                             "merged_out (where the merged model is written)")
    elif merged_out is not None or base_model is not None:
        raise ValueError(f"base_model / merged_out are only used with residual='merge' (got residual={residual!r})")
    if get_method(method).residual == "whole" and residual == "discard":
        raise ValueError(f"method {method!r} puts the whole update in the residual and restarts the adapter; "
                         "residual='discard' would drop the whole update (use 'save' or 'merge')")


def check_adapter_paths(out_dir, *, residual: str, base_model=None, merged_out=None) -> None:
    """The checks of :func:`check_adapter_args` that look at the file system (``residual="merge"``:
    ``base_model`` is a transformers folder, ``merged_out`` differs from ``out_dir``)."""
    if residual == "merge":
        if not (Path(base_model) / "config.json").is_file():
            raise ValueError(f"base_model {str(base_model)!r} is not a transformers model folder (no config.json)")
        if Path(merged_out).resolve() == Path(out_dir).resolve():
            raise ValueError("merged_out and out_dir must be different folders")


@dataclass(frozen=True)
class AdapterPlan:
    """:func:`plan_adapters`'s result: the model plan plus where each client's tensors live."""

    dirs: tuple[Path, ...]
    files: tuple[Path, ...]       #: adapter_model.safetensors per client
    plan: ModelPlan

    @property
    def modules(self) -> tuple[ModuleSpec, ...]:
        return self.plan.modules


def plan_adapters(adapter_dirs: Sequence[_io.PathLike], weights=None) -> AdapterPlan:
    """Plan an aggregation of K adapter folders from their configs and safetensors headers only.

    Raises ValueError naming the client folder (and the module) for a missing folder or config, a
    corrupt safetensors file, a client missing a module or adapting other modules, different base
    shapes, and configs that disagree with the tensors (see :func:`plan_modules`).
    """
    if isinstance(adapter_dirs, (str, os.PathLike)):
        raise TypeError("adapter_dirs must be a sequence of K adapter folders, got a single path")
    dirs = tuple(Path(d) for d in adapter_dirs)
    if not dirs:
        raise ValueError("no adapter folders given")
    names = [str(d) for d in dirs]
    configs = [_io.read_adapter_config(d) for d in dirs]
    files = tuple(d / _io.ADAPTER_WEIGHTS for d in dirs)
    shapes = [_io.read_header(f, n) for f, n in zip(files, names)]
    plan = plan_modules(shapes, configs, weights, client_names=names)
    return AdapterPlan(dirs, files, plan)


def aggregate_adapter_module(aplan: AdapterPlan, spec: ModuleSpec, *, rank: Optional[int] = None,
                             method: str = "fedmomentum", solver: str = "auto",
                             residual: str = "factored", handles: Optional[Sequence[Any]] = None,
                             **layer_kwargs) -> ModuleResult:
    """Read and aggregate one module of an :class:`AdapterPlan` (see
    :func:`fedmomentum_core.plan.aggregate_module` for the result)."""
    t0 = time.perf_counter()
    B, A = _io.load_module_factors(aplan, spec, handles)
    return aggregate_module(spec, B, A, aplan.plan.p, rank=rank, method=method, solver=solver,
                            residual=residual, out_use_rslora=out_use_rslora(aplan.plan),
                            clients=aplan.plan.clients, read_seconds=time.perf_counter() - t0,
                            **layer_kwargs)


# ----------------------------------------------------------------------------- state dicts

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
    check_method_residual(method, residual)
    plan = plan_modules([{k: tuple(t.shape) for k, t in sd.items()} for sd in sds], configs, weights,
                        client_names=client_names)

    def load(spec: ModuleSpec):
        return ([sds[k][lk.b_key] for k, lk in enumerate(spec.keys)],
                [sds[k][lk.a_key] for k, lk in enumerate(spec.keys)])

    def load_other(key: str):
        return [sd[key] for sd in sds]

    return aggregate_plan(plan, load, load_other, rank=rank, method=method, solver=solver, residual=residual,
                          progress=progress, profile=profile, **layer_kwargs)
