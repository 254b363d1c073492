"""Merging residuals into base weights: a live model (:func:`merge_residuals_`) or a saved
transformers model folder (:func:`merge_base_model`, written atomically)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Mapping, Optional, Union

import torch

from fedmomentum_core.types import LowRank
from fedmomentum_core.validate import all_finite

from .io import PathLike, load_residuals
from .rules import module_path_candidates, relative_module_name

__all__ = ["find_base_weight", "merge_residuals_", "initialise_method_", "load_base_model", "save_model",
           "merge_base_model"]


def find_base_weight(modules: Mapping[str, torch.nn.Module], name: str) -> Optional[torch.Tensor]:
    """The base ``weight`` of module ``name`` (a saved-key module path) in ``modules``
    (``dict(model.named_modules())`` of a plain model or a PeftModel; a LoRA layer's base layer is
    used), or None."""
    for cand in module_path_candidates(name):
        mod = modules.get(cand)
        if mod is None:
            continue
        if hasattr(mod, "get_base_layer"):
            mod = mod.get_base_layer()
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor):
            return w
    return None


def merge_residuals_(model: torch.nn.Module, residuals: Union[Mapping[str, LowRank], PathLike]) -> torch.nn.Module:
    """Merge residuals into a model's base weights in place: ``module.weight += left @ right``.

    ``model`` is a plain transformers model or a PeftModel (LoRA layers' base weights are used);
    ``residuals`` a ``{module: LowRank}`` dict or a path to ``residual.safetensors`` (or its folder).
    Module names may carry the ``base_model.model.`` prefix or not. Every residual is checked
    (module exists, shape equals its weight) before any weight is touched. Returns ``model``.
    """
    from fedmomentum import merge_residual_

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (or PeftModel), got {type(model).__name__}")
    if isinstance(residuals, (str, os.PathLike)):
        residuals = load_residuals(residuals)
    if not isinstance(residuals, Mapping):
        raise TypeError(f"residuals must be a dict of LowRank or a path, got {type(residuals).__name__}")
    modules = dict(model.named_modules())
    todo = []
    for name, lr in residuals.items():
        if not isinstance(lr, LowRank):
            raise TypeError(f"residual for module {name!r} is a {type(lr).__name__}, not a LowRank")
        w = find_base_weight(modules, name)
        if w is None:
            raise ValueError(f"residual for module {name!r}: the model has no such module with a weight "
                             f"(tried {name!r} and {relative_module_name(name)!r})")
        if tuple(w.shape) != lr.shape:
            raise ValueError(f"residual for module {name!r} is {lr.shape[0]} x {lr.shape[1]} but the module's "
                             f"weight is {tuple(w.shape)}")
        if not all_finite(lr.left) or not all_finite(lr.right):
            raise ValueError(f"residual for module {name!r} has NaN/Inf entries")
        todo.append((w, lr))
    with torch.no_grad():
        for w, lr in todo:
            if lr.rank:
                merge_residual_(w.data, lr.to(w.device))
    return model


def initialise_method_(model: torch.nn.Module, method: str, adapter_name: str = "default") -> list[str]:
    """Apply a method's round-0 initialisation (``METHODS[method].init``, e.g. ilora's QR
    initialisation) to every LoRA layer of a PeftModel, in place: the layer's base weight W0 and its
    factors become (W0 − s·B·A, B, A), so the model's output is unchanged.

    The initialisation is deterministic in W0, so a federation applies it once on the server
    (before sending the initial adapter) and on every client's copy of the same base model, and all
    agree. ``s`` is the layer's own PEFT scaling for ``adapter_name``; ``fan_in_fan_out`` layers
    (GPT-2 ``Conv1D``) are handled in the orientation ``out x in``. Every layer is computed before
    any is written, so an error leaves the model unchanged. Returns the names of the layers
    initialised. Raises ValueError for a method without an initialisation, a model without LoRA
    layers for ``adapter_name``, or a LoRA layer this cannot initialise (embedding, convolution).
    """
    from fedmomentum_core import get_method

    spec = get_method(method)
    if spec.init is None:
        raise ValueError(f"method {spec.name!r} has no round-0 initialisation (METHODS[{spec.name!r}].init "
                         "is None); nothing to apply")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a PeftModel (torch.nn.Module), got {type(model).__name__}")
    todo = []
    for name, mod in model.named_modules():
        lora_A = getattr(mod, "lora_A", None)
        emb = getattr(mod, "lora_embedding_A", None)
        if emb is not None and adapter_name in emb:
            raise ValueError(f"{name}: {spec.name} initialisation of an embedding LoRA layer is not supported")
        if lora_A is None or adapter_name not in lora_A:
            continue
        A_mod, B_mod = lora_A[adapter_name], mod.lora_B[adapter_name]
        if not isinstance(A_mod, torch.nn.Linear) or not isinstance(B_mod, torch.nn.Linear):
            raise ValueError(f"{name}: {spec.name} initialisation needs a Linear/Conv1D LoRA layer, "
                             f"got {type(A_mod).__name__} factors")
        W = mod.get_base_layer().weight
        fan_in_fan_out = bool(getattr(mod, "fan_in_fan_out", False))
        W0 = (W.T if fan_in_fan_out else W).detach()
        r = A_mod.weight.shape[0]
        s = float(mod.scaling[adapter_name])
        with torch.no_grad():
            B, A, W_new = spec.init(W0, r, s)
        todo.append((name, W, fan_in_fan_out, W_new, A_mod.weight, A, B_mod.weight, B))
    if not todo:
        raise ValueError(f"the model has no LoRA layers for adapter {adapter_name!r}")
    with torch.no_grad():
        for _, W, fifo, W_new, a, A, b, B in todo:
            W.copy_(W_new.T if fifo else W_new)
            a.copy_(A)
            b.copy_(B)
    return [t[0] for t in todo]


def load_base_model(base_model: PathLike):
    """The transformers model saved in folder ``base_model`` (its architecture class, dtype as saved)."""
    import transformers

    d = Path(base_model)
    if not (d / "config.json").is_file():
        raise ValueError(f"base_model {str(d)!r} is not a transformers model folder (no config.json)")
    cfg = transformers.AutoConfig.from_pretrained(str(d))
    cls = None
    for arch in getattr(cfg, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            break
    if cls is None:
        cls = transformers.AutoModelForCausalLM
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    kw = {"dtype": "auto"} if (major, minor) >= (4, 56) else {"torch_dtype": "auto"}
    return cls.from_pretrained(str(d), **kw)


_COPY_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
               "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def save_model(model, base_model: PathLike, folder: Path) -> None:
    """``model.save_pretrained(folder)`` plus the tokenizer files of ``base_model``."""
    model.save_pretrained(str(folder))
    for name in _COPY_FILES:
        src = Path(base_model) / name
        if src.is_file() and not (folder / name).exists():
            shutil.copy2(src, folder / name)


def merge_base_model(base_model: PathLike, residuals: Mapping[str, LowRank], merged_out: PathLike, *,
                     overwrite: bool = False) -> Path:
    """Load the transformers model in ``base_model``, merge ``residuals``, ``save_pretrained`` it to
    ``merged_out`` atomically (tokenizer files are copied along).

    ``merged_out`` follows the output rules of :mod:`fedmomentum.safe_io` (checked before the model
    is loaded): it may not overlap ``base_model``, and an existing one is replaced only when it is an
    earlier fedmomentum output and ``overwrite=True``. It carries the output marker (role
    ``merged_base``). To write it together with its adapter use :func:`fedmomentum.peft.write_outputs`."""
    from .. import safe_io

    with safe_io.OutputTransaction({"merged_base": merged_out}, inputs=[("base model", base_model)],
                                   overwrite=overwrite) as txn:
        for note in txn.notes:
            safe_io.log.warning("fedmomentum: warning: %s", note)
        safe_io.check_input_folder(base_model, "base model")
        model = load_base_model(base_model)
        merge_residuals_(model, residuals)
        save_model(model, base_model, txn.tmp("merged_base"))
        txn.commit()
    return Path(merged_out)
