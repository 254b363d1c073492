"""``fedmomentum aggregate``: aggregate PEFT LoRA adapter folders into one adapter (+ residual)."""
from __future__ import annotations

import contextlib
import os
import sys


def _weights(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--weights must be comma-separated numbers like 1,2,3, got {text!r}") from None


@contextlib.contextmanager
def _quiet_transformers(quiet: bool):
    """--no-progress also silences transformers' own bars (loading and saving the base model)."""
    if not quiet:
        yield
        return
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        yield
        return
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def register(sub) -> None:
    from fedmomentum_core import METHODS

    p = sub.add_parser("aggregate", help="aggregate PEFT LoRA adapter folders into one adapter folder "
                       "(+ residual.safetensors, or a merged base model)",
                       description="Aggregate K PEFT LoRA adapter folders (adapter_model.safetensors + "
                       "adapter_config.json) with FedMomentum or a baseline; reads one module at a time.")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="client adapter folders")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output adapter folder: created (an empty folder is used); written into a temporary "
                        "sibling and renamed; never a client folder, the base model, or a folder holding them")
    p.add_argument("--weights", default=None, metavar="W1,W2,...",
                   help="client weights, e.g. sample counts 1,2,3 (normalised; default uniform)")
    p.add_argument("--rank", type=int, default=None, metavar="R",
                   help="output LoRA rank (default: the clients' max rank per module)")
    p.add_argument("--method", default="fedmomentum", choices=sorted(METHODS), metavar="NAME",
                   help=f"aggregation method: {', '.join(sorted(METHODS))} (default fedmomentum)")
    p.add_argument("--solver", default="auto", choices=["auto", "exact", "randomized", "dense"],
                   metavar="NAME", help="auto (default), exact, randomized or dense")
    p.add_argument("--residual", default="save", choices=["save", "merge", "discard"],
                   help="save: OUT/residual.safetensors (default); merge: into --base-model, written "
                   "to --merged-out; discard: drop it (reported)")
    p.add_argument("--base-model", default=None, metavar="DIR", help="transformers model folder (merge)")
    p.add_argument("--merged-out", default=None, metavar="DIR", help="where the merged base model goes (merge)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out / --merged-out when they hold an earlier fedmomentum output (a folder "
                        "with fedmomentum_output.json); a folder fedmomentum did not write is never replaced")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("method options (see fedmomentum.METHODS[name].options)")
    g.add_argument("--round", type=int, default=None, metavar="T",
                   help="the round being aggregated (rolora: odd trains B, even A; fedrot_lora)")
    g.add_argument("--lam", type=float, default=None, metavar="X",
                   help="fedrot_lora's soft-rotation strength in [0, 1] (default 0.5)")
    g.add_argument("--client-ranks", default=None, metavar="R1,R2,...",
                   help="flexlora/hetlora: each client's rank for the next round (default its own)")
    g.add_argument("--reference", default=None, metavar="DIR",
                   help="fedrot_lora: the previous global adapter folder (rotation target, from round 1)")
    p.set_defaults(func=run)


def method_options(args):
    """The method options given on the command line (None when none was)."""
    mo = {}
    if args.round is not None:
        mo["round"] = args.round
    if args.lam is not None:
        mo["lam"] = args.lam
    if args.client_ranks is not None:
        try:
            mo["client_ranks"] = [int(x) for x in args.client_ranks.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--client-ranks must be comma-separated ints like 8,16,8, got "
                             f"{args.client_ranks!r}") from None
    if args.reference is not None:
        mo["reference"] = reference_adapter(args.reference)
    return mo or None


def reference_adapter(folder) -> dict:
    """module name -> (lora_B, lora_A) of a saved PEFT adapter folder (:func:`fedmomentum.peft.rules.adapter_pairs`)."""
    from pathlib import Path

    from safetensors.torch import load_file

    from ..peft.io import ADAPTER_WEIGHTS
    from ..peft.rules import adapter_pairs
    path = Path(folder) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise ValueError(f"--reference {folder}: no {ADAPTER_WEIGHTS} there (a PEFT adapter folder is needed)")
    return adapter_pairs(load_file(str(path)), where=f"--reference {folder}: {ADAPTER_WEIGHTS}")


def run(args) -> int:
    from ..distributed import is_distributed

    if is_distributed():  # started by torchrun with WORLD_SIZE > 1: modules sharded across ranks
        import torch.distributed as dist

        from ..distributed import aggregate_adapters
        main_rank = int(os.environ.get("RANK", "0") or 0) == 0 if not dist.is_initialized() else dist.get_rank() == 0
    else:
        from ..peft import aggregate_adapters
        main_rank = True

    w = _weights(args.weights) if args.weights is not None else None
    with _quiet_transformers(args.no_progress and args.residual == "merge"):
        agg = aggregate_adapters(args.dirs, args.out, w, rank=args.rank, method=args.method,
                                 solver=args.solver, residual=args.residual, base_model=args.base_model,
                                 merged_out=args.merged_out, progress=not args.no_progress, keep_residuals=False,
                                 overwrite=args.overwrite, method_options=method_options(args))
    if not main_rank:  # rank 0 wrote the output and prints the summary
        return 0
    print(agg.summary())
    where = f"adapter written to {args.out}"
    if args.residual == "save" and agg.residual_mode == "factored":
        where += " (with residual.safetensors)"
    elif args.residual == "merge":
        where += f"; merged base model written to {args.merged_out}"
    elif args.residual == "discard":
        where += "; residual discarded"
    from ..safe_io import read_marker
    marker = read_marker(args.out)
    if marker:  # the round id both folders carry (`fedmomentum verify` compares them)
        where += f" [round {marker['round_id'][:8]}]"
    print(where)
    sys.stdout.flush()
    return 0
