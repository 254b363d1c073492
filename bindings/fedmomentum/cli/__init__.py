"""The ``fedmomentum`` command line (also ``python -m fedmomentum``).

Each subcommand lives in its own module ``fedmomentum.cli.<name>`` exposing
``register(subparsers)``, which adds its parser and sets ``func`` (a callable taking the
parsed args and returning an exit code). Add a new subcommand by listing it here.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional, Sequence

SUBCOMMANDS = ["demo", "profile", "aggregate", "verify", "experiment"]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``fedmomentum aggregate: error: ... (see --help)``)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _describe(e: BaseException) -> str:
    """One line for an exception: its message, an OSError's path, the type where the message is empty."""
    if isinstance(e, OSError) and (e.filename or e.strerror):
        from ..safe_io import describe_os_error
        return _one_line(describe_os_error(e))
    msg = _one_line(str(e))
    if isinstance(e, (ValueError, TypeError, FileNotFoundError)):
        return msg or type(e).__name__
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    parser = _Parser(
        prog="fedmomentum",
        description="Exact, fast FedMomentum aggregation of federated LoRA adapters.",
        epilog="Environment: the CLI recycles freed round buffers instead of having the kernel "
               "zero-fill fresh pages every round (fedmomentum.reuse_freed_memory, glibc only); "
               "FEDMOMENTUM_MALLOC=system keeps the C library's default policy, "
               "FEDMOMENTUM_MALLOC_KEEP=SIZE (default 1GiB) bounds the freed memory kept. "
               "Output folders: a run holds a lock per --out/--merged-out; FEDMOMENTUM_LOCK_WAIT=SECONDS makes a "
               "second run on the same folder wait that long (default 0: fail at once).")
    parser.add_argument("--version", action="version", version=f"fedmomentum {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"fedmomentum.cli.{name}").register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; returns the exit code. Every error is one line on stderr
    (``fedmomentum COMMAND: error: ...``), never a traceback (``FEDMOMENTUM_TRACEBACK=1`` re-raises
    unexpected errors for debugging); exit 1 for errors, 2 for bad arguments, 130 when interrupted."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help/--version (0) or a one-line usage error (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        # recycle freed round buffers instead of zero-filling fresh pages every round
        # (see fedmomentum.cli.alloc; FEDMOMENTUM_MALLOC=system keeps the C library's default)
        from .alloc import cli_allocator_setup
        cli_allocator_setup()
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"fedmomentum {args.command}: interrupted; nothing was installed by this run", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI turns every error into one line
        expected = isinstance(e, (ValueError, TypeError, OSError))
        if not expected and os.environ.get("FEDMOMENTUM_TRACEBACK"):
            raise
        print(f"fedmomentum {args.command}: error: {_describe(e)}", file=sys.stderr)
        return 1
