"""PEFT interop: aggregate LoRA adapter folders, write adapter + residual (+ merged base) out.

The package, one concern per module:

* :mod:`~fedmomentum.peft.rules` — every PEFT naming and scaling rule (key forms, pattern
  matching, configs, scalings, the output config);
* :mod:`~fedmomentum.peft.plan` — :class:`ModuleSpec`, :class:`ModelPlan`, :func:`plan_modules`,
  :func:`plan_adapters`, :func:`aggregate_plan`, :func:`aggregate_state_dicts`;
* :mod:`~fedmomentum.peft.io` — safetensors reading/writing, residual files, atomic folders;
* :mod:`~fedmomentum.peft.merge` — merging residuals into a model or a saved base model;
* this module — :func:`aggregate_adapters`, the adapter-folder entry point.

An adapter folder is what ``PeftModel.save_pretrained`` writes: ``adapter_model.safetensors``
and ``adapter_config.json``. :func:`aggregate_adapters` is built from pieces that streaming and
distributed drivers reuse:

* :func:`plan_adapters` — reads the K configs and safetensors *headers* only (no tensor data) and
  returns an :class:`AdapterPlan` (a :class:`~fedmomentum.peft.plan.ModelPlan` plus file paths):
  one :class:`~fedmomentum.peft.plan.ModuleSpec` per module with its shape, per-client ranks,
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
* ``flexlora``, ``hetlora`` (the ``per_client`` trait): the top-level adapter is the global one
  (rank ``rank``, default the clients' max); each client's own-rank adapter for the next round is
  written to ``out_dir/rank_<r>/`` (one folder per distinct set of client ranks; which clients load
  which folder is in its ``adapter_config.json`` ``fedmomentum_clients`` and in the report's
  ``per_client_dirs``), and returned as ``ModelAggregation.per_client`` (K state dicts).
* ``fedsvd``, ``rolora``, ``fedrot_lora``, ``ilora``: B and A as in :mod:`fedmomentum_core.methods`;
  method inputs (``round``, ``reference``, ``lam``, ``client_ranks``) go in ``method_options=``
  (CLI: ``--round``, ``--reference DIR``, ``--lam``, ``--client-ranks``).

Residuals are :class:`~fedmomentum.LowRank` in the orientation of each base module's ``weight``
(out×in for nn.Linear, in×out for GPT-2 Conv1D, num_embeddings×dim for nn.Embedding), scalings
included, fp32; ``residual.safetensors`` stores them as ``<module>.residual_left`` /
``<module>.residual_right`` with ``<module>`` the adapter's module path
(``base_model.model.<path in the base model>``).
"""
from __future__ import annotations

from typing import Optional, Sequence

from fedmomentum_core.plan import ModelAggregation, ModuleResult

from .. import safe_io as _safe
from .io import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, REPORT_FILE, RESIDUAL_FILE, RESIDUAL_METADATA, PathLike,
                 SafetensorsStreamWriter, _fill_adapter_dir, _install, _tmp_next_to, check_outputs,
                 load_module_factors, load_other_tensors, load_residuals, open_adapter_files, output_transaction,
                 read_adapter_config, report_json, save_residuals, write_adapter_dir, write_outputs)
from .merge import initialise_method_, load_base_model, merge_base_model, merge_residuals_, save_model
from .plan import (AdapterPlan, ModelPlan, ModuleSpec, RESIDUAL_MODES, aggregate_adapter_module, aggregate_plan,
                   check_adapter_args, check_adapter_paths, plan_adapters, plan_modules)

__all__ = [
    "ADAPTER_WEIGHTS", "ADAPTER_CONFIG", "RESIDUAL_FILE", "AdapterPlan", "read_adapter_config",
    "plan_adapters", "load_module_factors", "aggregate_adapter_module", "write_adapter_dir",
    "SafetensorsStreamWriter",
    "save_residuals", "load_residuals", "merge_residuals_", "initialise_method_", "merge_base_model", "aggregate_adapters",
    "ModelPlan", "ModuleSpec", "plan_modules", "aggregate_plan", "check_adapter_args", "check_adapter_paths",
    "open_adapter_files", "load_other_tensors", "report_json", "RESIDUAL_MODES", "write_outputs",
    "output_transaction", "check_outputs", "write_per_client_dirs", "round_report",
]

def round_report(agg: ModelAggregation, txn, plan) -> dict:
    """The ``fedmomentum_report.json`` of a round written through ``txn`` (an open
    :func:`output_transaction`): :func:`report_json` plus the transaction's ``round_id`` and, for
    methods with the ``per_client`` trait, ``per_client_dirs`` (the ``rank_<r>/`` folders, written
    here into the adapter's temporary folder by :func:`write_per_client_dirs`)."""
    rep = report_json(agg)
    rep["round_id"] = txn.round_id
    if agg.per_client:
        rep["per_client_dirs"] = write_per_client_dirs(txn.tmp("adapter"), agg, plan)
    return rep


def write_per_client_dirs(folder, agg: ModelAggregation, plan) -> dict:
    """Methods with the ``per_client`` trait (flexlora, hetlora): one PEFT adapter folder per distinct
    set of client ranks inside ``folder``, named ``rank_<r>`` (r: those clients' most common module
    rank; ``rank_<r>_<i>`` if two sets share it), each with ``adapter_model.safetensors`` (the
    clients' own-rank factors plus the averaged non-LoRA tensors) and an ``adapter_config.json``
    whose r / lora_alpha / rank_pattern / alpha_pattern give every module the aggregate's scale
    (``report.out_scaling``). Clients of one set get identical adapters (K truncations of one
    aggregate). Returns {folder name: [client indices]}."""
    from pathlib import Path
    from types import SimpleNamespace

    from .rules import output_config
    lora_keys = set(agg.per_client[0])
    others = {k: v for k, v in agg.state_dict.items() if k not in lora_keys}
    rs = bool(agg.config.get("use_rslora"))
    groups: dict = {}
    for k in range(len(agg.per_client)):
        sig = tuple(rep.info["client_ranks"][k] for rep in agg.report)
        groups.setdefault(sig, []).append(k)
    out, used = {}, set()
    for sig, clients in groups.items():
        fake = [SimpleNamespace(report=SimpleNamespace(rank=rk), out_use_rslora=rs,
                                out_alpha=rep.out_scaling * (rk ** 0.5 if rs else rk))
                for rk, rep in zip(sig, agg.report)]
        cfg = output_config(plan, fake, base=agg.config)
        name = f"rank_{cfg['r']}"
        if name in used:
            name = f"{name}_{len(used)}"
        used.add(name)
        cfg["fedmomentum_clients"] = clients
        d = Path(folder) / name
        d.mkdir()
        _fill_adapter_dir(d, {**agg.per_client[clients[0]], **others}, cfg, None, None)
        out[name] = clients
    return out


#: kept for code that used the private name
_RESIDUAL_MODES = RESIDUAL_MODES


def aggregate_adapters(adapter_dirs: Sequence[PathLike], out_dir: PathLike, weights=None, *,
                       rank: Optional[int] = None, method: str = "fedmomentum", solver: str = "auto",
                       residual: str = "save", base_model: Optional[PathLike] = None,
                       merged_out: Optional[PathLike] = None, progress: bool = False,
                       profile: bool = False, keep_residuals: bool = True, overwrite: bool = False,
                       **layer_kwargs) -> ModelAggregation:
    """Aggregate K PEFT LoRA adapter folders into one adapter folder ``out_dir``.

    Args:
        adapter_dirs: K folders with ``adapter_model.safetensors`` + ``adapter_config.json``.
        out_dir: where the new adapter goes (written into a temporary sibling, then renamed). It may
            not be, contain or lie inside a client folder or the base model; an existing non-empty
            ``out_dir`` (and ``merged_out``) is replaced only when it is an earlier fedmomentum output
            (it holds ``fedmomentum_output.json``) and ``overwrite=True`` (see :mod:`fedmomentum.safe_io`).
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
    the base model. Every output check runs before any input is read, under a lock per output
    folder (a concurrent run on the same folder fails with :class:`~fedmomentum.safe_io.OutputError`).
    On any error (bad input: a clear ValueError naming the client folder and module) neither
    ``out_dir`` nor ``merged_out`` is created or modified. With ``residual="merge"`` the two folders
    are one transaction: both carry the same round id in their marker, the merged base is installed
    first and put back if the adapter's install fails; a kill between the two installs is reported by
    ``fedmomentum verify`` and by every later run that uses or replaces either folder. Warnings
    (logger ``fedmomentum``) for a client folder given twice, clients with identical tensors, and
    clients naming different ``base_model_name_or_path``. Returns the :class:`~fedmomentum_core.plan.ModelAggregation`.
    """
    check_adapter_args(adapter_dirs, out_dir, residual=residual, method=method, base_model=base_model,
                       merged_out=merged_out)
    check_adapter_paths(out_dir, residual=residual, base_model=base_model, merged_out=merged_out)
    merge = residual == "merge"
    # every output check (overlap with the inputs, foreign folder, --overwrite, file, read-only,
    # lock) runs here, before any input is read
    with output_transaction(out_dir, merged_out if merge else None, overwrite=overwrite,
                            adapter_dirs=adapter_dirs, base_model=base_model if merge else None) as txn:
        if merge:
            _safe.check_input_folder(base_model, "base model")
        for w in _safe.input_warnings(adapter_dirs):
            _safe.log.warning("fedmomentum: warning: %s", w)
        aplan = plan_adapters(adapter_dirs, weights)
        _safe.pause_for_tests("planned")
        core_residual = "none" if residual == "discard" else "factored"
        tmp = txn.tmp("adapter")
        writer = None
        try:
            model = None
            on_module = None
            if not keep_residuals and residual == "save":
                writer = SafetensorsStreamWriter(tmp / RESIDUAL_FILE, metadata=RESIDUAL_METADATA)

                def on_module(res: ModuleResult) -> None:
                    if res.residual is not None:
                        writer.add(f"{res.report.name}.residual_left", res.residual.left)
                        writer.add(f"{res.report.name}.residual_right", res.residual.right)
            elif not keep_residuals and merge:
                model = load_base_model(base_model)  # merged module by module; written only at the end

                def on_module(res: ModuleResult) -> None:
                    if res.residual is not None:
                        merge_residuals_(model, {res.report.name: res.residual})
            with open_adapter_files(aplan) as handles:
                agg = aggregate_plan(aplan.plan, lambda spec: load_module_factors(aplan, spec, handles),
                                     lambda key: load_other_tensors(aplan, handles, key), rank=rank,
                                     method=method, adapter_note=True, solver=solver, residual=core_residual,
                                     progress=progress, profile=profile, on_module=on_module,
                                     keep_residuals=keep_residuals, **layer_kwargs)
            _safe.pause_for_tests("aggregated")
            if writer is not None:
                writer.close()
                if not writer.count:
                    (tmp / RESIDUAL_FILE).unlink()
                writer = None
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        rep = round_report(agg, txn, aplan.plan)
        _fill_adapter_dir(tmp, agg.state_dict, agg.config,
                          agg.residuals if (residual == "save" and keep_residuals) else None, rep)
        if merge:
            if model is None:
                model = load_base_model(base_model)
                merge_residuals_(model, agg.residuals)
            save_model(model, base_model, txn.tmp("merged_base"))
        txn.commit()
    return agg
