"""The ``fedmomentum`` command line (also ``python -m fedmomentum``).

Each subcommand lives in its own module ``fedmomentum.cli.<name>`` exposing
``register(subparsers)``, which adds its parser and sets ``func`` (a callable taking the
parsed args and returning an exit code). Add a new subcommand by listing it here.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

SUBCOMMANDS = ["demo", "profile", "aggregate", "experiment"]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    parser = argparse.ArgumentParser(
        prog="fedmomentum",
        description="Exact, fast FedMomentum aggregation of federated LoRA adapters.",
        epilog="Environment: the CLI recycles freed round buffers instead of having the kernel "
               "zero-fill fresh pages every round (fedmomentum.reuse_freed_memory, glibc only); "
               "FEDMOMENTUM_MALLOC=system keeps the C library's default policy, "
               "FEDMOMENTUM_MALLOC_KEEP=SIZE (default 1GiB) bounds the freed memory kept.")
    parser.add_argument("--version", action="version", version=f"fedmomentum {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"fedmomentum.cli.{name}").register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        # recycle freed round buffers instead of zero-filling fresh pages every round
        # (see fedmomentum.cli.alloc; FEDMOMENTUM_MALLOC=system keeps the C library's default)
        from .alloc import cli_allocator_setup
        cli_allocator_setup()
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"fedmomentum {args.command}: error: {e}", file=sys.stderr)
        return 1
