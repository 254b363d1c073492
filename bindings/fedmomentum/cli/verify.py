"""``fedmomentum verify``: check that an aggregated adapter (and its merged base) is complete and
that both come from the same run (see :func:`fedmomentum.safe_io.verify_outputs`)."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("verify", help="check an aggregate output: adapter (and merged base) complete and "
                       "from the same round",
                       description="Check that ADAPTER_DIR, written by `fedmomentum aggregate`, is complete "
                       "and, with --residual merge, that its merged base model comes from the same run (same "
                       "round id in both fedmomentum_output.json markers). Exit 0 when all is well, 1 with "
                       "one line saying what is wrong and how to recover.")
    p.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="the --out folder of `fedmomentum aggregate`")
    p.add_argument("--merged-out", default=None, metavar="DIR",
                   help="the merged base model folder (default: the one recorded in ADAPTER_DIR's marker)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..safe_io import verify_outputs

    print(verify_outputs(args.adapter_dir, args.merged_out))
    return 0
