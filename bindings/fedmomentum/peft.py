"""PEFT interop: aggregate LoRA adapter folders, write adapter + residual (+ merged base) out.

An adapter folder is what ``PeftModel.save_pretrained`` writes: ``adapter_model.safetensors``
and ``adapter_config.json``. :func:`aggregate_adapters` is built from pieces that streaming and
distributed drivers reuse:

* :func:`plan_adapters` — reads the K configs and safetensors *headers* only (no tensor data) and
  returns an :class:`AdapterPlan` (a :class:`fedmomentum_core.model.ModelPlan` plus file paths):
  one :class:`~fedmomentum_core.model.ModuleSpec` per module with its shape, per-client ranks,
  scalings and key names.
* :func:`load_module_factors` / :func:`aggregate_adapter_module` — read one module's factors
  lazily with ``safe_open`` and aggregate it (memory: one module's K factors at a time).
* :func:`write_adapter_dir` — writes the output folder atomically (into a temporary folder next
  to ``out_dir``, then renamed; on error nothing half-written remains).
  :class:`SafetensorsStreamWriter` writes a safetensors file one tensor at a time (used by
  ``aggregate_adapters(..., keep_residuals=False)`` and the CLI to stream residuals to disk).
* :func:`save_residuals` / :func:`load_residuals` / :func:`merge_residuals_` /
  :func:`merge_base_model` — the residual file and merging it into a base model.

Scaling conventions: client k's scale at a module is s_k = lora_alpha/r (α/√r with
``use_rslora``), with r and lora_alpha taken from ``rank_pattern``/``alpha_pattern`` by PEFT's
own matching rule. The aggregate is ΔW = Σ_k p_k s_k B_k A_k with p the normalised ``weights``.
The output scale s is the clients' common s_k, or Σ_k p_k s_k where they differ; the output
adapter_config has ``r`` = the output rank and ``lora_alpha`` = s·r (s·√r if every client used
rsLoRA, then ``use_rslora=True``), with per-module ``rank_pattern``/``alpha_pattern`` where a module
differs, so that PEFT's s·B·A is exactly what we computed.

PEFT's ``add_weighted_adapter(combination_type="svd")`` differs: it uses the weights as given (no
normalisation), forms the dense Σ w_k s_k B_k A_k per module, and writes an adapter with
``r = lora_alpha = new_rank`` (scale 1) — or scale √r when the first adapter used rsLoRA, while its
SVD factors assume scale 1, a known PEFT pitfall. Its top-r product equals ours when it is given
the normalised p_k and rsLoRA is off.

Method-specific outputs:

* ``fedmomentum`` (default): same-rank B, A of the top r; tail → residual.
* ``flora``: a fresh adapter (A PEFT-style kaiming-uniform, B = 0) and the whole ΔW in the
  residual; ``residual="discard"`` is refused (it would drop the whole update).
* ``florist``: rank chosen per module by energy (``tau``); the output config carries the
  per-module ranks in ``rank_pattern``; the tail is discarded (no residual; energy reported).
* ``fedsa_lora``: only A is aggregated; the written adapter holds lora_A keys only (clients keep
  their own lora_B: load it with ``set_peft_model_state_dict``, which leaves missing keys as they
  are); no residual.
* ``fedit``, ``ffa_lora``, ``fedex_lora``: B and A as in :mod:`fedmomentum_core.methods`;
  fedex_lora's error term is the residual.

Residuals are :class:`~fedmomentum.LowRank` in the orientation of each base module's ``weight``
(out×in for nn.Linear, in×out for GPT-2 Conv1D, num_embeddings×dim for nn.Embedding), scalings
included, fp32; ``residual.safetensors`` stores them as ``<module>.residual_left`` /
``<module>.residual_right`` with ``<module>`` the adapter's module path
(``base_model.model.<path in the base model>``).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from fedmomentum_core.model import (PEFT_PREFIX, ModelAggregation, ModelPlan, ModuleResult, ModuleSpec,
                                    aggregate_module, plan_modules, relative_module_name, run_plan)
from fedmomentum_core.types import LowRank

__all__ = [
    "ADAPTER_WEIGHTS", "ADAPTER_CONFIG", "RESIDUAL_FILE", "AdapterPlan", "read_adapter_config",
    "plan_adapters", "load_module_factors", "aggregate_adapter_module", "write_adapter_dir",
    "SafetensorsStreamWriter",
    "save_residuals", "load_residuals", "merge_residuals_", "merge_base_model", "aggregate_adapters",
]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
RESIDUAL_FILE = "residual.safetensors"
REPORT_FILE = "fedmomentum_report.json"
_RESIDUAL_MODES = ("save", "merge", "discard")

PathLike = Union[str, os.PathLike]


def _safetensors():
    try:
        import safetensors  # noqa: F401
        from safetensors import safe_open
        from safetensors.torch import save_file
    except ImportError as e:  # pragma: no cover
        raise ImportError("fedmomentum.peft needs safetensors: pip install 'fedmomentum[peft]'") from e
    return safe_open, save_file


# ----------------------------------------------------------------------------- reading

def read_adapter_config(adapter_dir: PathLike) -> dict:
    """``adapter_config.json`` of an adapter folder as a dict; ValueError naming the folder when it
    is missing, not JSON, or not a LoRA config."""
    d = Path(adapter_dir)
    if not d.is_dir():
        raise ValueError(f"adapter folder {str(d)!r} does not exist or is not a folder")
    f = d / ADAPTER_CONFIG
    if not f.is_file():
        raise ValueError(f"adapter folder {str(d)!r} has no {ADAPTER_CONFIG}; it is needed for the LoRA "
                         "scalings (r, lora_alpha, use_rslora, rank_pattern, alpha_pattern)")
    try:
        cfg = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"adapter folder {str(d)!r}: {ADAPTER_CONFIG} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"adapter folder {str(d)!r}: {ADAPTER_CONFIG} must hold a JSON object")
    pt = cfg.get("peft_type", "LORA")
    if str(pt).upper() != "LORA":
        raise ValueError(f"adapter folder {str(d)!r}: peft_type is {pt!r}; only LORA adapters are supported")
    return cfg


@dataclass(frozen=True)
class AdapterPlan:
    """:func:`plan_adapters`'s result: the model plan plus where each client's tensors live."""

    dirs: tuple[Path, ...]
    files: tuple[Path, ...]       #: adapter_model.safetensors per client
    plan: ModelPlan

    @property
    def modules(self) -> tuple[ModuleSpec, ...]:
        return self.plan.modules


def _header(file: Path, client: str) -> dict[str, tuple[int, ...]]:
    safe_open, _ = _safetensors()
    if not file.is_file():
        raise ValueError(f"adapter folder {client!r} has no {ADAPTER_WEIGHTS} (only safetensors "
                         "adapters are supported; re-save with safe_serialization=True)")
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # SafetensorError is not exported under a stable name
        raise ValueError(f"adapter folder {client!r}: {ADAPTER_WEIGHTS} cannot be read ({e}); the file is "
                         "corrupt or truncated") from None


def plan_adapters(adapter_dirs: Sequence[PathLike], weights=None) -> AdapterPlan:
    """Plan an aggregation of K adapter folders from their configs and safetensors headers only.

    Raises ValueError naming the client folder (and the module) for a missing folder or config, a
    corrupt safetensors file, a client missing a module or adapting other modules, different base
    shapes, and configs that disagree with the tensors (see
    :func:`fedmomentum_core.model.plan_modules`).
    """
    if isinstance(adapter_dirs, (str, os.PathLike)):
        raise TypeError("adapter_dirs must be a sequence of K adapter folders, got a single path")
    dirs = tuple(Path(d) for d in adapter_dirs)
    if not dirs:
        raise ValueError("no adapter folders given")
    names = [str(d) for d in dirs]
    configs = [read_adapter_config(d) for d in dirs]
    files = tuple(d / ADAPTER_WEIGHTS for d in dirs)
    shapes = [_header(f, n) for f, n in zip(files, names)]
    plan = plan_modules(shapes, configs, weights, client_names=names)
    return AdapterPlan(dirs, files, plan)


def load_module_factors(aplan: AdapterPlan, spec: ModuleSpec, handles: Optional[Sequence[Any]] = None
                        ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Read one module's (B_list, A_list) from the K safetensors files (lazy ``safe_open``: only
    this module's tensors are read). ``handles`` are optional open ``safe_open`` objects to reuse."""
    safe_open, _ = _safetensors()
    Bs, As = [], []
    for k, lk in enumerate(spec.keys):
        client = aplan.plan.clients[k]
        try:
            if handles is not None:
                f = handles[k]
                a, b = f.get_tensor(lk.a_key), f.get_tensor(lk.b_key)
            else:
                with safe_open(str(aplan.files[k]), framework="pt") as f:
                    a, b = f.get_tensor(lk.a_key), f.get_tensor(lk.b_key)
        except Exception as e:
            raise ValueError(f"adapter folder {client!r}: module {spec.name!r}: cannot read its LoRA "
                             f"factors ({e})") from None
        As.append(a)
        Bs.append(b)
    return Bs, As


def aggregate_adapter_module(aplan: AdapterPlan, spec: ModuleSpec, *, rank: Optional[int] = None,
                             method: str = "fedmomentum", solver: str = "auto",
                             residual: str = "factored", handles: Optional[Sequence[Any]] = None,
                             **layer_kwargs) -> ModuleResult:
    """Read and aggregate one module of an :class:`AdapterPlan` (see
    :func:`fedmomentum_core.model.aggregate_module` for the result)."""
    import time
    t0 = time.perf_counter()
    B, A = load_module_factors(aplan, spec, handles)
    out_rs = all(c.get("use_rslora", False) if c else False for c in aplan.plan.configs)
    return aggregate_module(spec, B, A, aplan.plan.p, rank=rank, method=method, solver=solver,
                            residual=residual, out_use_rslora=out_rs, clients=aplan.plan.clients,
                            read_seconds=time.perf_counter() - t0, **layer_kwargs)


# ----------------------------------------------------------------------------- writing

def _tmp_next_to(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=str(target.parent)))


def _install(tmp: Path, target: Path) -> None:
    """Replace ``target`` by the finished folder ``tmp`` (rename; an old ``target`` is removed)."""
    old = None
    if target.exists():
        if not target.is_dir():
            raise ValueError(f"{str(target)!r} exists and is not a folder")
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=str(target.parent)))
        os.rmdir(old)
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except OSError:
        if old is not None:
            os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _plain_tensors(d: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, seen = {}, set()
    for k, t in d.items():
        t = t.detach().to("cpu").contiguous()
        if t.data_ptr() in seen and t.numel():
            t = t.clone()
        seen.add(t.data_ptr())
        out[k] = t
    return out


def _residual_tensors(residuals: Mapping[str, LowRank]) -> dict[str, torch.Tensor]:
    d = {}
    for name, lr in residuals.items():
        d[f"{name}.residual_left"] = lr.left
        d[f"{name}.residual_right"] = lr.right
    return _plain_tensors(d)


_ST_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8"}


class SafetensorsStreamWriter:
    """Write a safetensors file one tensor at a time (memory: one tensor).

    Tensor bytes go to a side file as they are added; :meth:`close` writes the header and appends
    the data (the standard format: 8-byte little-endian header size, JSON header padded to 8
    bytes, raw little-endian data), so the result reads with ``safe_open`` / ``load_file``.
    :meth:`abort` removes everything.
    """

    def __init__(self, path: PathLike, metadata: Optional[Mapping[str, str]] = None):
        self.path = Path(path)
        self._data_path = self.path.with_name(self.path.name + ".data")
        self._fh = open(self._data_path, "wb")
        self._header: dict[str, Any] = {}
        self._offset = 0
        self.metadata = dict(metadata or {})

    @property
    def count(self) -> int:
        return len(self._header)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._header:
            raise ValueError(f"tensor {name!r} added twice")
        t = tensor.detach().to("cpu").contiguous()
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"tensor {name!r}: dtype {t.dtype} not supported")
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        self._fh.write(raw)
        self._header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [self._offset, self._offset + len(raw)]}
        self._offset += len(raw)

    def close(self) -> Path:
        import struct

        self._fh.close()
        header = dict(self._header)
        if self.metadata:
            header["__metadata__"] = self.metadata
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * (-len(hb) % 8)
        with open(self.path, "wb") as out, open(self._data_path, "rb") as data:
            out.write(struct.pack("<Q", len(hb)))
            out.write(hb)
            shutil.copyfileobj(data, out, 16 << 20)
        os.unlink(self._data_path)
        return self.path

    def abort(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        for p in (self._data_path, self.path):
            if p.exists():
                p.unlink()


def save_residuals(path: PathLike, residuals: Mapping[str, LowRank]) -> None:
    """Write ``residuals`` to a safetensors file (keys ``<module>.residual_left/_right``)."""
    _, save_file = _safetensors()
    save_file(_residual_tensors(residuals), str(path), metadata={"format": "pt", "fedmomentum": "residual"})


def load_residuals(path: PathLike) -> dict[str, LowRank]:
    """Read a ``residual.safetensors`` (or a folder holding one) back as ``{module: LowRank}``."""
    safe_open, _ = _safetensors()
    p = Path(path)
    if p.is_dir():
        p = p / RESIDUAL_FILE
    if not p.is_file():
        raise ValueError(f"residual file {str(p)!r} does not exist")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(p), framework="pt") as f:
            for k in f.keys():
                for suf in ("left", "right"):
                    tag = f".residual_{suf}"
                    if k.endswith(tag):
                        parts.setdefault(k[: -len(tag)], {})[suf] = f.get_tensor(k)
                        break
                else:
                    raise ValueError(f"unexpected key {k!r} (expected '<module>.residual_left/_right')")
    except ValueError as e:
        raise ValueError(f"residual file {str(p)!r}: {e}") from None
    except Exception as e:
        raise ValueError(f"residual file {str(p)!r} cannot be read ({e})") from None
    out = {}
    for name, d in parts.items():
        if set(d) != {"left", "right"}:
            raise ValueError(f"residual file {str(p)!r}: module {name!r} has only residual_{next(iter(d))}")
        out[name] = LowRank(d["left"], d["right"])
    return out


def write_adapter_dir(out_dir: PathLike, state_dict: Mapping[str, torch.Tensor], config: Mapping,
                      residuals: Optional[Mapping[str, LowRank]] = None,
                      report: Optional[list] = None) -> Path:
    """Write an adapter folder atomically: ``adapter_model.safetensors``, ``adapter_config.json``,
    ``residual.safetensors`` (when ``residuals`` is non-empty) and ``fedmomentum_report.json``.

    Everything is written into a temporary folder next to ``out_dir`` and renamed into place at the
    end (an existing ``out_dir`` is replaced); on error the temporary folder is removed.
    """
    target = Path(out_dir)
    tmp = _tmp_next_to(target)
    try:
        _fill_adapter_dir(tmp, state_dict, config, residuals, report)
        _install(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _fill_adapter_dir(tmp: Path, state_dict, config, residuals, report) -> None:
    _, save_file = _safetensors()
    save_file(_plain_tensors(state_dict), str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(dict(config), indent=2, sort_keys=True, default=str))
    if residuals:
        save_residuals(tmp / RESIDUAL_FILE, residuals)
    if report is not None:
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=1, default=str))


# ----------------------------------------------------------------------------- merging

def _find_weight(modules: Mapping[str, torch.nn.Module], name: str) -> Optional[torch.Tensor]:
    rel = relative_module_name(name)
    for cand in (name, rel, PEFT_PREFIX + rel, "base_model.model." + PEFT_PREFIX + rel):
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
    from . import merge_residual_

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
        w = _find_weight(modules, name)
        if w is None:
            raise ValueError(f"residual for module {name!r}: the model has no such module with a weight "
                             f"(tried {name!r} and {relative_module_name(name)!r})")
        if tuple(w.shape) != lr.shape:
            raise ValueError(f"residual for module {name!r} is {lr.shape[0]} x {lr.shape[1]} but the module's "
                             f"weight is {tuple(w.shape)}")
        if not bool(torch.isfinite(lr.left).all()) or not bool(torch.isfinite(lr.right).all()):
            raise ValueError(f"residual for module {name!r} has NaN/Inf entries")
        todo.append((w, lr))
    with torch.no_grad():
        for w, lr in todo:
            if lr.rank:
                merge_residual_(w.data, lr.to(w.device))
    return model


def _load_base(base_model: PathLike):
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


def _save_model(model, base_model: PathLike, folder: Path) -> None:
    model.save_pretrained(str(folder))
    for name in _COPY_FILES:
        src = Path(base_model) / name
        if src.is_file() and not (folder / name).exists():
            shutil.copy2(src, folder / name)


def merge_base_model(base_model: PathLike, residuals: Mapping[str, LowRank], merged_out: PathLike) -> Path:
    """Load the transformers model in ``base_model``, merge ``residuals``, ``save_pretrained`` it to
    ``merged_out`` atomically (tokenizer files are copied along)."""
    model = _load_base(base_model)
    merge_residuals_(model, residuals)
    target = Path(merged_out)
    tmp = _tmp_next_to(target)
    try:
        _save_model(model, base_model, tmp)
        _install(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# ----------------------------------------------------------------------------- the entry point

def _report_json(agg: ModelAggregation) -> dict:
    return {"method": agg.method, "residual": agg.residual_mode, "seconds": agg.seconds,
            "modules": [{k: v for k, v in vars(r).items()} for r in agg.report]}


def aggregate_adapters(adapter_dirs: Sequence[PathLike], out_dir: PathLike, weights=None, *,
                       rank: Optional[int] = None, method: str = "fedmomentum", solver: str = "auto",
                       residual: str = "save", base_model: Optional[PathLike] = None,
                       merged_out: Optional[PathLike] = None, progress: bool = False,
                       profile: bool = False, keep_residuals: bool = True,
                       **layer_kwargs) -> ModelAggregation:
    """Aggregate K PEFT LoRA adapter folders into one adapter folder ``out_dir``.

    Args:
        adapter_dirs: K folders with ``adapter_model.safetensors`` + ``adapter_config.json``.
        out_dir: where the new adapter goes (written atomically; replaced if it exists).
        weights: K non-negative numbers (e.g. sample counts), normalised; None = uniform.
        rank: output rank (default: per module, the clients' max rank).
        method, solver: see ``fedmomentum.aggregate_lora``.
        residual: ``"save"`` writes ``out_dir/residual.safetensors``; ``"merge"`` loads
            ``base_model`` (a transformers model folder), merges the residuals into its weights and
            ``save_pretrained``s it to ``merged_out``; ``"discard"`` drops the residual (the report
            says so and gives the energy dropped per module).
        progress: tqdm bar over modules. ``profile``: extra per-module numbers in the report.
        keep_residuals: True (default) returns every residual in ``ModelAggregation.residuals``;
            False streams each module's residual to ``residual.safetensors`` (``"save"``) or merges
            it into the loaded base model (``"merge"``) as soon as it is computed and keeps none
            (``residuals`` is then empty): memory is one module's factors plus the output adapter.
            The CLI uses False.
        **layer_kwargs: passed to ``aggregate_lora`` (split, compute_dtype, generator, tau, ...),
            and ``max_memory`` (e.g. ``"2GB"``): a budget for what the call holds at once (one
            module's factors plus the kept outputs; ValueError naming the module when one module
            alone cannot fit, or when the kept outputs cannot, before anything is read).

    Reads one module's factors at a time (lazy ``safe_open``): the K inputs are never all in
    memory. What is kept until the end is the output (the new rank-r adapter and, unless
    ``residual="discard"`` or ``keep_residuals=False``, each module's factored residual of rank
    ≤ R − r, returned in ``ModelAggregation.residuals``); ``residual="merge"`` additionally loads
    the base model. On any error (bad input: a clear
    ValueError naming the client folder and module) neither ``out_dir`` nor ``merged_out`` is
    created or modified. Returns the :class:`~fedmomentum_core.model.ModelAggregation`.
    """
    if residual not in _RESIDUAL_MODES:
        raise ValueError(f"residual must be one of {list(_RESIDUAL_MODES)}, got {residual!r}")
    if residual == "merge":
        if base_model is None or merged_out is None:
            raise ValueError("residual='merge' needs base_model (a transformers model folder) and "
                             "merged_out (where the merged model is written)")
        if not (Path(base_model) / "config.json").is_file():
            raise ValueError(f"base_model {str(base_model)!r} is not a transformers model folder (no config.json)")
        if Path(merged_out).resolve() == Path(out_dir).resolve():
            raise ValueError("merged_out and out_dir must be different folders")
    elif merged_out is not None or base_model is not None:
        raise ValueError(f"base_model / merged_out are only used with residual='merge' (got residual={residual!r})")
    if method == "flora" and residual == "discard":
        raise ValueError("method 'flora' puts the whole update in the residual and restarts the adapter; "
                         "residual='discard' would drop the update (use 'save' or 'merge')")
    safe_open, _ = _safetensors()
    aplan = plan_adapters(adapter_dirs, weights)
    core_residual = "none" if residual == "discard" else "factored"
    target = Path(out_dir)
    tmp = _tmp_next_to(target)
    handles, ctxs = [], []
    writer = None
    merged_tmp = None
    try:
        model = None
        on_module = None
        if not keep_residuals and residual == "save":
            writer = SafetensorsStreamWriter(tmp / RESIDUAL_FILE, metadata={"format": "pt", "fedmomentum": "residual"})

            def on_module(res: ModuleResult) -> None:
                if res.residual is not None:
                    writer.add(f"{res.report.name}.residual_left", res.residual.left)
                    writer.add(f"{res.report.name}.residual_right", res.residual.right)
        elif not keep_residuals and residual == "merge":
            model = _load_base(base_model)  # merged module by module; written only at the end

            def on_module(res: ModuleResult) -> None:
                if res.residual is not None:
                    merge_residuals_(model, {res.report.name: res.residual})
        for f in aplan.files:
            ctx = safe_open(str(f), framework="pt")
            ctxs.append(ctx)
            handles.append(ctx.__enter__())
        agg = run_plan(aplan.plan, lambda spec: load_module_factors(aplan, spec, handles),
                       lambda key: _load_other(aplan, handles, key), rank=rank, method=method,
                       solver=solver, residual=core_residual, progress=progress, profile=profile,
                       on_module=on_module, keep_residuals=keep_residuals, **layer_kwargs)
        for ctx in ctxs:
            ctx.__exit__(None, None, None)
        ctxs = []
        if method == "fedsa_lora":
            agg.config["fedmomentum_note"] = ("fedsa_lora: lora_A only; clients keep their own lora_B "
                                              "(load with set_peft_model_state_dict)")
        if writer is not None:
            writer.close()
            if not writer.count:
                (tmp / RESIDUAL_FILE).unlink()
            writer = None
        _fill_adapter_dir(tmp, agg.state_dict, agg.config,
                          agg.residuals if (residual == "save" and keep_residuals) else None, _report_json(agg))
        if residual == "merge":
            if model is None:
                merge_base_model(base_model, agg.residuals, merged_out)
            else:
                merged_tmp = _tmp_next_to(Path(merged_out))
                _save_model(model, base_model, merged_tmp)
                _install(merged_tmp, Path(merged_out))
                merged_tmp = None
        _install(tmp, target)
    except BaseException:
        if writer is not None:
            writer.abort()
        for ctx in ctxs:
            ctx.__exit__(None, None, None)
        shutil.rmtree(tmp, ignore_errors=True)
        if merged_tmp is not None:
            shutil.rmtree(merged_tmp, ignore_errors=True)
        raise
    return agg


def _load_other(aplan: AdapterPlan, handles, key: str) -> list[torch.Tensor]:
    out = []
    for k, f in enumerate(handles):
        try:
            out.append(f.get_tensor(key))
        except Exception as e:
            raise ValueError(f"adapter folder {aplan.plan.clients[k]!r}: cannot read {key!r} ({e})") from None
    return out
