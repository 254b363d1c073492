"""Sharded aggregation of PEFT adapter folders on ``torch.distributed`` (gloo on CPU, NCCL on GPU).

:func:`aggregate_adapters` takes the same arguments and gives the same output folder as
:func:`fedmomentum.peft.aggregate_adapters`; started by ``torchrun`` (``WORLD_SIZE > 1``) it splits
the modules across the ranks::

    torchrun --nproc-per-node 4 -m fedmomentum aggregate c0 c1 c2 --out new_adapter

How it works (every step is the same on every rank, so no rank waits for a decision):

1. **Plan.** Every rank reads the K ``adapter_config.json`` files and safetensors *headers*
   (:func:`fedmomentum.peft.plan_adapters`; no tensor data).
2. **Shard.** :func:`shard_modules` assigns modules to ranks greedily by cost, longest first
   (LPT), with the cost from the core's one cost model (:func:`fedmomentum_core.cost.module_cost`:
   the solver's FLOPs plus the factor bytes read). Ties break by
   module order and rank, so the assignment is deterministic and identical on all ranks.
3. **Aggregate.** Each rank opens the K safetensors files lazily (``safe_open``) and reads and
   aggregates only its own modules with :func:`fedmomentum_core.plan.run_plan` (one module's K
   factors in memory at a time). The per-module math is the single-process code unchanged, so the
   result is bitwise identical to one process (the solvers' random sketches are seeded per module
   when no ``generator`` is passed; an explicit ``generator`` is consumed in a different order
   and breaks this).
4. **Status.** After each phase the ranks exchange a status (``all_gather_object`` of ``None`` or
   the error): if any rank failed, *every* rank raises (ValueError/TypeError as the original,
   else RuntimeError) naming the failing rank and its message (which names module and client),
   and nothing is written. No rank is left waiting in a collective.
5. **Gather.** Each rank sends its results to rank 0: the report rows, names, shapes and dtypes
   with ``gather_object``, the tensors (new rank-r factors, factored residuals and, for methods
   with the ``per_client`` trait, each client's own-rank factors) as raw bytes with
   ``send``/``recv``, one tensor at a time (no pickling of tensor data). Rank 0 assembles them in
   module order and writes the output exactly as the single-process path does (same keys, same
   bytes for ``adapter_model.safetensors``, ``adapter_config.json`` and ``residual.safetensors``;
   for ``flexlora``/``hetlora`` the same ``rank_<r>/`` per-client adapter folders and
   ``per_client_dirs`` in the report; ``fedmomentum_report.json`` differs only in timings and the
   round id), as one output transaction (temporary folder, then rename). ``residual="merge"``
   merges the gathered residuals into the base model on rank 0.

Memory: a worker holds one module's K factors plus its shard's outputs; rank 0 additionally
holds every module's outputs (the new adapter plus the residual factors, rank ≤ R − r each: the
same as one process with ``keep_residuals=True``; for ``per_client`` methods also the K clients'
own-rank factors, as one process holds them), received straight into their final buffers (no
second copy); a sending rank may make one contiguous copy of a tensor at a time. Inputs, the large part (K × every module's factors), are read once, spread across the
ranks. Objects travel on a gloo group (the default group if it is gloo, else a gloo side group
created here), so an NCCL default group works unchanged and no GPU memory is used for the gather.

Process group: if ``torch.distributed`` is initialised it is used; otherwise, when ``WORLD_SIZE``
> 1, one is created from the environment (``init_method="env://"``; backend nccl when CUDA is
available, else gloo), kept for later calls and destroyed at interpreter exit (or by
:func:`release_process_group`). It is not destroyed after each call on purpose: a second call would
re-create the rendezvous store on the same ``MASTER_PORT`` while a slower rank may still hold the
old one, and a fast rank can join the stale store and hang (seen in testing). With neither (or a world of 1) the call is the
local :func:`fedmomentum.peft.aggregate_adapters`.

Method options (``method_options=``, e.g. fedrot_lora's ``{"round": 1, "reference": {module: (B, A)}}``)
go to every rank unchanged; a per-module reference dict is looked up by module name, so each rank
uses the entries of its own modules.

Return value: rank 0 returns the full :class:`~fedmomentum.ModelAggregation` (as one process
would, ``per_client`` included); other ranks return a :class:`~fedmomentum.ModelAggregation` of
their own shard: their modules' tensors, residuals and report rows, and for ``per_client`` methods
K dicts holding only their modules' per-client factors (empty list otherwise); ``config`` is the
output config of the shard's modules alone (its ``rank_pattern``/``alpha_pattern`` name only those
modules; rank 0's config is the one written). Non-zero ranks write nothing.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from datetime import timedelta
from typing import Any, Optional, Sequence

import torch

from fedmomentum_core.plan import ModelAggregation, ModuleResult, average_tensors, run_plan
from fedmomentum_core import cost as _cost
from fedmomentum_core.types import LowRank

from . import peft as _peft
from .peft.plan import ModuleSpec
from .peft.rules import output_config

#: kept for code that read it here; the value lives in the one cost model
BYTE_COST = _cost.BYTE_COST

log = logging.getLogger(__name__)

__all__ = ["aggregate_adapters", "shard_modules", "module_cost", "world_size_from_env", "is_distributed",
           "release_process_group"]

# ----------------------------------------------------------------------------- sharding

def module_cost(spec: ModuleSpec, rank: Optional[int] = None, solver: str = "auto", *,
                need_tail: bool = True, itemsize: int = 2) -> float:
    """Estimated cost of one module (FLOP-equivalents): :func:`fedmomentum_core.cost.module_cost`
    of its shape and client ranks (the solver's FLOPs plus
    :data:`fedmomentum_core.cost.BYTE_COST` per byte of the K client factors read)."""
    return _cost.module_cost(spec.m, spec.n, spec.ranks, rank, solver, need_tail=need_tail,
                             itemsize=itemsize)


def shard_modules(modules: Sequence[ModuleSpec], world_size: int, *, rank: Optional[int] = None,
                  solver: str = "auto", need_tail: bool = True) -> list[list[int]]:
    """Assign module indices to ``world_size`` ranks, cost-balanced and deterministic.

    Longest-processing-time greedy: modules by decreasing :func:`module_cost` (ties: module
    order) each go to the rank with the least load so far (ties: lowest rank). The max load is at
    most 4/3 of the optimum (Graham's bound). Returns, per rank, its module indices in module
    order (a rank may get none when there are fewer modules than ranks).
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    costs = [module_cost(s, rank, solver, need_tail=need_tail) for s in modules]
    order = sorted(range(len(modules)), key=lambda i: (-costs[i], i))
    load = [0.0] * world_size
    out: list[list[int]] = [[] for _ in range(world_size)]
    for i in order:
        w = min(range(world_size), key=lambda j: (load[j], j))
        out[w].append(i)
        load[w] += costs[i]
    return [sorted(x) for x in out]


# ----------------------------------------------------------------------------- process group

def world_size_from_env() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset or empty); ValueError when not an int."""
    v = os.environ.get("WORLD_SIZE", "").strip()
    if not v:
        return 1
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {v!r}") from None


def is_distributed() -> bool:
    """True when a call would run sharded: an initialised process group of size > 1, or none yet
    and ``WORLD_SIZE`` > 1 (a ``torchrun`` launch)."""
    import torch.distributed as dist

    if not dist.is_available():
        return False
    if dist.is_initialized():
        return dist.get_world_size() > 1
    return world_size_from_env() > 1


_CREATED = {"group": False, "atexit": False}
_OBJECT_GROUPS: dict = {}


def release_process_group() -> bool:
    """Destroy the default process group if :func:`aggregate_adapters` created it (it is kept for
    later calls otherwise, and destroyed at exit). Every rank must call it. Returns True if one was
    destroyed."""
    import torch.distributed as dist

    if _CREATED["group"] and dist.is_available() and dist.is_initialized():
        # all ranks reach the teardown together: a rank that destroys its group (rank 0 also
        # hosts the TCPStore) while a peer is still mid-teardown made rank 0 abort at exit now
        # and then ("terminate called without an active exception"). A monitored barrier on the
        # gloo group times out instead of hanging when a peer is gone.
        try:
            dist.monitored_barrier(group=_object_group(), timeout=timedelta(seconds=60),
                                   wait_all_ranks=True)
        except RuntimeError as e:  # a peer died or is stuck: tear down anyway
            log.warning("fedmomentum.distributed: barrier before releasing the process group "
                        "failed (%s); destroying it anyway", str(e).splitlines()[0] if str(e) else e)
        _OBJECT_GROUPS.clear()
        _CREATED["group"] = False
        dist.destroy_process_group()
        return True
    _OBJECT_GROUPS.clear()
    _CREATED["group"] = False
    return False


def _init_group() -> bool:
    """Initialise the default group from the environment if needed (kept until exit or
    :func:`release_process_group`); True when we created it now."""
    import atexit

    import torch.distributed as dist

    if dist.is_initialized():
        return False
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK"):
        if not os.environ.get(var):
            raise ValueError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} but {var} is not set; start with "
                             "torchrun (or set MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE)")
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0") or 0)
        torch.cuda.set_device(local % torch.cuda.device_count())
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, init_method="env://")
    _CREATED["group"] = True
    if not _CREATED["atexit"]:
        atexit.register(release_process_group)
        _CREATED["atexit"] = True
    return True


def _object_group():
    """A gloo group for the object collectives (the default group when it already is gloo)."""
    import torch.distributed as dist

    if dist.get_backend() == "gloo":
        return None
    key = id(dist.group.WORLD)
    if key not in _OBJECT_GROUPS:  # created once per default group (a collective call on all ranks)
        _OBJECT_GROUPS.clear()
        _OBJECT_GROUPS[key] = dist.new_group(backend="gloo")
    return _OBJECT_GROUPS[key]


class _Failure:
    """A picklable record of one rank's exception."""

    def __init__(self, exc: BaseException, phase: str):
        self.kind = ("ValueError" if isinstance(exc, ValueError) else
                     "TypeError" if isinstance(exc, TypeError) else "RuntimeError")
        self.type_name = type(exc).__name__
        self.message = str(exc)
        self.phase = phase


def _exchange_status(err: Optional[BaseException], phase: str, me: int, group) -> None:
    """All ranks share their status; if any failed, every rank raises (own error re-raised)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    statuses: list[Any] = [None] * world
    dist.all_gather_object(statuses, None if err is None else _Failure(err, phase), group=group)
    failed = [(r, f) for r, f in enumerate(statuses) if f is not None]
    if not failed:
        return
    r0, f0 = failed[0]
    more = f" ({len(failed) - 1} other rank(s) failed too)" if len(failed) > 1 else ""
    msg = f"rank {r0} of {world} failed while {f0.phase}: {f0.message}{more}"
    if err is not None and isinstance(err, (ValueError, TypeError)) and r0 == me:
        raise type(err)(msg) from err
    if err is not None and r0 == me:
        raise err
    exc_type = {"ValueError": ValueError, "TypeError": TypeError}.get(f0.kind, RuntimeError)
    raise exc_type(msg)


# ----------------------------------------------------------------------------- the entry point

def aggregate_adapters(adapter_dirs: Sequence[_peft.PathLike], out_dir: _peft.PathLike, weights=None, *,
                       rank: Optional[int] = None, method: str = "fedmomentum", solver: str = "auto",
                       residual: str = "save", base_model: Optional[_peft.PathLike] = None,
                       merged_out: Optional[_peft.PathLike] = None, progress: bool = False,
                       profile: bool = False, keep_residuals: bool = True, overwrite: bool = False,
                       **layer_kwargs) -> ModelAggregation:
    """Aggregate K PEFT LoRA adapter folders into ``out_dir``, sharded across torch.distributed ranks.

    Same arguments and output as :func:`fedmomentum.peft.aggregate_adapters` (see there); every
    rank must call it with the same arguments. Runs locally when no process group is initialised
    and ``WORLD_SIZE`` is unset or 1. See the module docstring for the sharding, the gather to
    rank 0, the memory cost and what non-zero ranks return. ``progress`` shows rank 0's bar.

    Raises on every rank (ValueError/TypeError naming the failing rank, module and client, or
    RuntimeError) when any rank fails; then neither ``out_dir`` nor ``merged_out`` is written.
    """
    import torch.distributed as dist

    kwargs = dict(rank=rank, method=method, solver=solver, residual=residual, base_model=base_model,
                  merged_out=merged_out, progress=progress, profile=profile, keep_residuals=keep_residuals,
                  **layer_kwargs)
    if not is_distributed():
        return _peft.aggregate_adapters(adapter_dirs, out_dir, weights, overwrite=overwrite, **kwargs)
    _peft.check_adapter_args(adapter_dirs, out_dir, residual=residual, method=method,
                             base_model=base_model, merged_out=merged_out)
    _init_group()
    if dist.get_world_size() == 1:
        return _peft.aggregate_adapters(adapter_dirs, out_dir, weights, overwrite=overwrite, **kwargs)
    return _run_sharded(adapter_dirs, out_dir, weights, overwrite=overwrite, **kwargs)


def _run_sharded(adapter_dirs, out_dir, weights, *, rank, method, solver, residual, base_model, merged_out,
                 progress, profile, keep_residuals, overwrite, **layer_kwargs) -> ModelAggregation:
    import torch.distributed as dist

    t_all = time.perf_counter()
    me, world = dist.get_rank(), dist.get_world_size()
    group = _object_group()
    core_residual = "none" if residual == "discard" else "factored"

    # 1. plan (headers only) on every rank
    err: Optional[BaseException] = None
    aplan = None
    try:
        aplan = _peft.plan_adapters(adapter_dirs, weights)
        if me == 0:
            _peft.check_adapter_paths(out_dir, residual=residual, base_model=base_model, merged_out=merged_out)
            # refuse a bad --out / --merged-out before any rank works (read-only: the transaction,
            # with its locks, is opened by rank 0 at write time and checks again)
            _peft.check_outputs(out_dir, merged_out if residual == "merge" else None, overwrite=overwrite,
                                adapter_dirs=adapter_dirs, base_model=base_model)
    except Exception as e:  # noqa: BLE001 - reported to every rank
        err = e
    _exchange_status(err, "planning", me, group)
    plan = aplan.plan
    shards = shard_modules(plan.modules, world, rank=rank, solver=solver, need_tail=core_residual == "factored")
    mine = shards[me]

    # 2. aggregate this rank's modules (lazy reads of only these modules' tensors)
    collected: list[ModuleResult] = []
    part: Optional[ModelAggregation] = None
    err = None
    try:
        sub = dataclasses.replace(plan, modules=tuple(plan.modules[i] for i in mine),
                                  other_keys=tuple(() for _ in plan.clients), other_shapes=())

        def on_module(res: ModuleResult) -> None:
            collected.append(ModuleResult(res.tensors, res.residual, res.report, res.out_alpha,
                                          res.out_use_rslora, per_client=res.per_client))

        part = _run_local_shard(aplan, sub, rank=rank, method=method, solver=solver, residual=core_residual,
                                progress=progress and me == 0, profile=profile, on_module=on_module,
                                **layer_kwargs)
    except Exception as e:  # noqa: BLE001
        err = e
    _exchange_status(err, f"aggregating its {len(mine)} module(s)", me, group)

    # 3. gather the outputs to rank 0: metadata with gather_object, tensors with send/recv
    gathered = _gather_results(list(zip(mine, collected)), me, world, group)

    # 4. rank 0 assembles and writes; everyone learns whether it worked
    agg: Optional[ModelAggregation] = None
    err = None
    if me == 0:
        try:
            results: list[Optional[ModuleResult]] = [None] * len(plan.modules)
            for chunk in gathered:
                for i, res in chunk:
                    results[i] = res
            del gathered
            missing = [plan.modules[i].name for i, r in enumerate(results) if r is None]
            if missing:
                raise RuntimeError(f"no result gathered for module(s) {missing[:3]}")
            agg = _assemble_and_write(aplan, results, out_dir, rank=rank, method=method, residual=residual,
                                      core_residual=core_residual, base_model=base_model,
                                      merged_out=merged_out, profile=profile, keep_residuals=keep_residuals,
                                      t_all=t_all, overwrite=overwrite, adapter_dirs=adapter_dirs)
        except Exception as e:  # noqa: BLE001
            err = e
    _exchange_status(err, "assembling and writing the output", me, group)
    if me == 0:
        return agg
    # a worker returns its own shard
    # the shard's own modules (output_config pairs plan.modules with the results one to one)
    cfg = output_config(sub, collected, rank=rank, base=plan.configs[0], method=method) if collected else {}
    return ModelAggregation(state_dict=part.state_dict, residuals=part.residuals if keep_residuals else {},
                            report=part.report, config=cfg, method=method, residual_mode=part.residual_mode,
                            seconds=time.perf_counter() - t_all, profile=profile,
                            skipped_keys=list(plan.skipped_keys), per_client=part.per_client)


def _tensor_meta(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.dtype


def _gather_results(payload: list[tuple[int, ModuleResult]], me: int, world: int, group
                    ) -> Optional[list[list[tuple[int, ModuleResult]]]]:
    """Send every rank's ``(module index, ModuleResult)`` list to rank 0 (None elsewhere).

    The small part (report rows, alphas, tensor names, shapes and dtypes) goes with one
    ``gather_object``; the tensors (new factors, residual factors, per-client factors) go as raw
    bytes with point-to-point ``send``/``recv`` on the gloo group, one tensor at a time, rank after
    rank, into buffers allocated once on rank 0 (no pickling of tensor data, no padding to the
    largest rank; pickling megabytes through ``gather_object`` was several times slower on loopback).
    """
    import torch.distributed as dist

    metas, flat = [], []
    for i, res in payload:
        tmeta = [(k, *_tensor_meta(t)) for k, t in res.tensors.items()]
        flat += list(res.tensors.values())
        rmeta = None
        if res.residual is not None:
            rmeta = (_tensor_meta(res.residual.left), _tensor_meta(res.residual.right))
            flat += [res.residual.left, res.residual.right]
        pmeta = None
        if res.per_client is not None:  # K dicts (client k's own-rank factors)
            pmeta = [[(k, *_tensor_meta(t)) for k, t in d.items()] for d in res.per_client]
            for d in res.per_client:
                flat += list(d.values())
        metas.append((i, res.report, res.out_alpha, res.out_use_rslora, tmeta, rmeta, pmeta))
    all_meta: Optional[list] = [None] * world if me == 0 else None
    dist.gather_object(metas, all_meta, dst=0, group=group)
    if me != 0:
        for t in flat:
            if t.numel():
                dist.send(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8), dst=0, group=group)
        return None

    def recv(src: int, shape, dtype) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype)
        if t.numel():
            dist.recv(t.reshape(-1).view(torch.uint8), src=src, group=group)
        return t

    out = [payload]
    for src in range(1, world):
        got = []
        for i, report, alpha, rs, tmeta, rmeta, pmeta in all_meta[src]:
            # received in the order they were sent: tensors, residual, per-client dicts
            tensors = {k: recv(src, shape, dtype) for k, shape, dtype in tmeta}
            resid = None
            if rmeta is not None:
                resid = LowRank(recv(src, *rmeta[0]), recv(src, *rmeta[1]))
            per = None
            if pmeta is not None:
                per = [{k: recv(src, shape, dtype) for k, shape, dtype in d} for d in pmeta]
            got.append((i, ModuleResult(tensors, resid, report, alpha, rs, per_client=per)))
        out.append(got)
    return out


def _run_local_shard(aplan: _peft.AdapterPlan, sub, *, on_module, **kw) -> ModelAggregation:
    """run_plan over this rank's sub-plan with the K safetensors files open lazily."""
    with _peft.open_adapter_files(aplan) as handles:
        return run_plan(sub, lambda spec: _peft.load_module_factors(aplan, spec, handles), None,
                        on_module=on_module, keep_residuals=True,
                        out_use_rslora=_peft.plan.out_use_rslora(aplan.plan), **kw)


def _assemble_and_write(aplan: _peft.AdapterPlan, results: list[ModuleResult], out_dir, *, rank, method,
                        residual, core_residual, base_model, merged_out, profile, keep_residuals,
                        t_all, overwrite, adapter_dirs) -> ModelAggregation:
    """Rank 0: the single-process tail of :func:`fedmomentum.peft.aggregate_adapters` on gathered results."""
    plan = aplan.plan
    state: dict[str, torch.Tensor] = {}
    residuals: dict = {}
    per_client: list[dict] = []
    for spec, res in zip(plan.modules, results):
        state.update(res.tensors)
        if res.residual is not None:
            residuals[spec.name] = res.residual
        if res.per_client is not None:  # as run_plan assembles it: K dicts, module order
            per_client = per_client or [{} for _ in res.per_client]
            for d, t in zip(per_client, res.per_client):
                d.update(t)
    if plan.other_keys and plan.other_keys[0]:  # non-LoRA tensors (small): averaged on rank 0
        with _peft.open_adapter_files(aplan) as handles:
            state.update(average_tensors(plan.other_keys[0],
                                         lambda key: _peft.load_other_tensors(aplan, handles, key),
                                         plan.p, plan.clients))
    cfg = output_config(plan, results, rank=rank, base=plan.configs[0], method=method)
    mode = "factored" if core_residual == "factored" else "discarded"
    if core_residual == "factored" and not any(r.report.residual_rank for r in results):
        mode = "none"
    agg = ModelAggregation(state_dict=state, residuals=residuals, report=[r.report for r in results],
                           config=cfg, method=method, residual_mode=mode, seconds=time.perf_counter() - t_all,
                           profile=profile, skipped_keys=list(plan.skipped_keys), per_client=per_client)
    agg.seconds = time.perf_counter() - t_all
    merge = residual == "merge"
    # one transaction for the adapter (with its per-client folders) and the merged base, as in the
    # single-process path; keep_residuals=False: the same streamed residual file as that path
    # (module order). A failure anywhere (per-client folders included) installs nothing.
    with _peft.output_transaction(out_dir, merged_out if merge else None, overwrite=overwrite,
                                  adapter_dirs=list(adapter_dirs),
                                  base_model=base_model if merge else None) as txn:
        rep = _peft.round_report(agg, txn, plan)
        _peft.write_outputs(out_dir, state, cfg, residuals if residual == "save" else None, rep,
                            stream_residuals=not keep_residuals, base_model=base_model if merge else None,
                            merged_residuals=residuals if merge else None,
                            merged_out=merged_out if merge else None, txn=txn)
    if not keep_residuals:
        agg.residuals = {}
    return agg
