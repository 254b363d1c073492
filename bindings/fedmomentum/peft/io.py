"""Adapter-folder I/O: safetensors reading and writing, residual files, atomic folders.

* reading: :func:`read_adapter_config`, :func:`read_header` (shapes only), :func:`open_adapter_files`
  (lazy ``safe_open`` handles), :func:`load_module_factors` (one module's K factors),
  :func:`load_other_tensors` (one non-LoRA key's K tensors);
* writing: :func:`write_adapter_dir` (atomic: a temporary folder next to the target, then
  renamed), :class:`SafetensorsStreamWriter` (one tensor at a time), :func:`save_residuals` /
  :func:`load_residuals` (``<module>.residual_left`` / ``<module>.residual_right``),
  :func:`report_json` (``fedmomentum_report.json``).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch

from fedmomentum_core.types import LowRank

from .. import safe_io as _safe

if TYPE_CHECKING:  # pragma: no cover
    from fedmomentum_core.plan import ModelAggregation

    from .plan import AdapterPlan, ModuleSpec

__all__ = [
    "ADAPTER_WEIGHTS", "ADAPTER_CONFIG", "RESIDUAL_FILE", "REPORT_FILE", "RESIDUAL_METADATA", "PathLike",
    "read_adapter_config", "read_header", "open_adapter_files", "load_module_factors",
    "load_other_tensors", "write_adapter_dir", "SafetensorsStreamWriter", "save_residuals",
    "load_residuals", "report_json", "write_outputs", "output_transaction", "output_inputs", "check_outputs",
]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
RESIDUAL_FILE = "residual.safetensors"
REPORT_FILE = "fedmomentum_report.json"
#: safetensors metadata of a residual file
RESIDUAL_METADATA = {"format": "pt", "fedmomentum": "residual"}

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


def read_header(file: Path, client: str) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of a client's ``adapter_model.safetensors`` (no tensor data read)."""
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


@contextlib.contextmanager
def open_adapter_files(aplan: "AdapterPlan") -> Iterator[list]:
    """The K clients' safetensors files opened lazily (``safe_open`` handles, closed on exit)."""
    safe_open, _ = _safetensors()
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(safe_open(str(f), framework="pt")) for f in aplan.files]


def load_module_factors(aplan: "AdapterPlan", spec: "ModuleSpec", handles: Optional[Sequence[Any]] = None
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

def load_other_tensors(aplan: "AdapterPlan", handles, key: str) -> list[torch.Tensor]:
    """The K clients' tensors of the non-LoRA key ``key`` (from open handles)."""
    out = []
    for k, f in enumerate(handles):
        try:
            out.append(f.get_tensor(key))
        except Exception as e:
            raise ValueError(f"adapter folder {aplan.plan.clients[k]!r}: cannot read {key!r} ({e})") from None
    return out


# ----------------------------------------------------------------------------- writing

def _tmp_next_to(target: Path) -> Path:
    """A new temporary folder next to ``target`` (missing parents created; mode from the umask)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return _safe.make_tmp_dir(target)


def _install(tmp: Path, target: Path) -> None:
    """Replace ``target`` by the finished folder ``tmp`` (atomic exchange; the old one is removed).
    Low level: it checks nothing (callers go through :class:`fedmomentum.safe_io.OutputTransaction`)."""
    if os.path.lexists(target) and not Path(target).is_dir():
        raise ValueError(f"{str(target)!r} exists and is not a folder")
    held = _safe.install_dir(tmp, target)
    if held is not None:
        shutil.rmtree(held, ignore_errors=True)


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
    save_file(_residual_tensors(residuals), str(path), metadata=dict(RESIDUAL_METADATA))


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
                      report: Optional[list] = None, *, stream_residuals: bool = False,
                      before_install: Optional[Callable[[], None]] = None, overwrite: bool = False,
                      inputs: Sequence[PathLike] = ()) -> Path:
    """Write an adapter folder atomically: ``adapter_model.safetensors``, ``adapter_config.json``,
    ``residual.safetensors`` (when ``residuals`` is non-empty), ``fedmomentum_report.json`` and the
    output marker (:data:`fedmomentum.safe_io.MARKER_FILE`).

    ``stream_residuals`` writes the residual file with :class:`SafetensorsStreamWriter` in the
    dict's order (the same bytes as residuals streamed module by module during an aggregation).
    ``before_install()`` runs once the folder is complete, just before it is renamed into place;
    if it raises, nothing is installed. To write an adapter and a merged base model as one
    transaction use :func:`write_outputs` instead.

    The folder is written into a temporary sibling and renamed into place (see
    :mod:`fedmomentum.safe_io`): an existing ``out_dir`` is replaced only when it is an earlier
    fedmomentum output and ``overwrite=True``; it may not overlap the folders in ``inputs``.
    """
    return write_outputs(out_dir, state_dict, config, residuals, report, stream_residuals=stream_residuals,
                         before_install=before_install, overwrite=overwrite, inputs=inputs)


def output_inputs(adapter_dirs: Sequence[PathLike] = (), base_model: Optional[PathLike] = None
                  ) -> list[tuple[str, PathLike]]:
    """The (label, folder) list of a run's inputs, for the output checks."""
    out: list[tuple[str, PathLike]] = [("client", d) for d in adapter_dirs]
    if base_model is not None:
        out.append(("base model", base_model))
    return out


def check_outputs(out_dir: PathLike, merged_out: Optional[PathLike] = None, *, overwrite: bool = False,
                  adapter_dirs: Sequence[PathLike] = (), base_model: Optional[PathLike] = None) -> None:
    """The output checks of :func:`output_transaction` without taking the locks (read-only): for a
    driver that must refuse a bad ``--out`` before its work but opens the transaction later (e.g. rank 0
    of the torchrun path, before sharding). Raises :class:`~fedmomentum.safe_io.OutputError`."""
    inputs = output_inputs(adapter_dirs, base_model)
    outs = [("--out", out_dir)] + ([("--merged-out", merged_out)] if merged_out is not None else [])
    for flag, path in outs:
        others = [(f, p) for f, p in outs if f != flag]
        _safe.check_output_target(path, inputs=inputs, others=others, overwrite=overwrite, flag=flag)
    if base_model is not None:
        _safe.check_input_folder(base_model, "base model")


def output_transaction(out_dir: PathLike, merged_out: Optional[PathLike] = None, *, overwrite: bool = False,
                       adapter_dirs: Sequence[PathLike] = (), base_model: Optional[PathLike] = None
                       ) -> "_safe.OutputTransaction":
    """The :class:`fedmomentum.safe_io.OutputTransaction` of one round: the adapter folder and, with
    ``merged_out``, the merged base model (checked against the clients and the base model, locked,
    stale temporaries removed). Call it before any work; it raises :class:`~fedmomentum.safe_io.OutputError`."""
    targets = {"adapter": out_dir}
    if merged_out is not None:
        targets["merged_base"] = merged_out
    txn = _safe.OutputTransaction(targets, inputs=output_inputs(adapter_dirs, base_model), overwrite=overwrite)
    for note in txn.notes:
        _safe.log.warning("fedmomentum: warning: %s", note)
    return txn


def write_outputs(out_dir: PathLike, state_dict: Mapping[str, torch.Tensor], config: Mapping,
                  residuals: Optional[Mapping[str, LowRank]] = None, report: Optional[Mapping] = None, *,
                  stream_residuals: bool = False, base_model: Optional[PathLike] = None,
                  merged_residuals: Optional[Mapping[str, LowRank]] = None, merged_out: Optional[PathLike] = None,
                  before_install: Optional[Callable[[], None]] = None, overwrite: bool = False,
                  inputs: Sequence[PathLike] = (), txn: Optional["_safe.OutputTransaction"] = None) -> Path:
    """Write one round's outputs as one transaction: the adapter folder ``out_dir`` (as
    :func:`write_adapter_dir`) and, when ``merged_out`` is given, ``base_model`` with
    ``merged_residuals`` merged, saved to ``merged_out``. Both carry the same round id; a failure
    leaves both as they were. ``inputs``: the client folders (no output may overlap them).
    ``txn``: an :func:`output_transaction` already opened up front (then ``overwrite``/``inputs``
    are its own); it is committed and closed here."""
    own = txn is None
    if own:
        txn = output_transaction(out_dir, merged_out, overwrite=overwrite, adapter_dirs=inputs,
                                 base_model=base_model if merged_out is not None else None)
    try:
        _fill_adapter_dir(txn.tmp("adapter"), state_dict, config, residuals, report,
                          stream_residuals=stream_residuals)
        if merged_out is not None:
            from .merge import load_base_model, merge_residuals_, save_model

            _safe.check_input_folder(base_model, "base model")
            model = load_base_model(base_model)
            merge_residuals_(model, merged_residuals or {})
            save_model(model, base_model, txn.tmp("merged_base"))
        if before_install is not None:
            before_install()
        txn.commit()
    finally:
        txn.close()
    return Path(out_dir)


def _fill_adapter_dir(tmp: Path, state_dict, config, residuals, report, *,
                      stream_residuals: bool = False) -> None:
    _, save_file = _safetensors()
    save_file(_plain_tensors(state_dict), str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(dict(config), indent=2, sort_keys=True, default=str))
    if residuals and stream_residuals:
        writer = SafetensorsStreamWriter(tmp / RESIDUAL_FILE, metadata=RESIDUAL_METADATA)
        try:
            for name, lr in residuals.items():
                writer.add(f"{name}.residual_left", lr.left)
                writer.add(f"{name}.residual_right", lr.right)
            writer.close()
        except BaseException:
            writer.abort()
            raise
    elif residuals:
        save_residuals(tmp / RESIDUAL_FILE, residuals)
    if report is not None:
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=1, default=str))


def report_json(agg: "ModelAggregation") -> dict:
    """The ``fedmomentum_report.json`` content of an aggregation."""
    return {"method": agg.method, "residual": agg.residual_mode, "seconds": agg.seconds,
            "modules": [{k: v for k, v in vars(r).items()} for r in agg.report]}
