"""Run the FedMomentum Flower App in-process with Flower's simulation engine (Ray backend).

The Flower way is ``flwr run examples/flower`` (see pyproject.toml here and the README); this
script runs the same ServerApp/ClientApp from Python, without the flwr CLI.

    python examples/flower/run_simulation.py --rounds 2 --clients 3

Prints one line per round: train/eval loss, aggregation seconds, energy kept by the new
adapter, the residual rank shipped, and the largest |client effective weight − server aggregate|.
Needs ``pip install "fedmomentum[flower]" "flwr[simulation]"``.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--method", default="fedmomentum")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--solver", default="auto")
    p.add_argument("--residual", choices=["ship", "server"], default="ship")
    p.add_argument("--local-steps", type=int, default=5)
    p.add_argument("--verbose", action="store_true", help="keep Flower's INFO logs")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.clients < 1:
        p.error("--rounds and --clients must be >= 1")

    # The ClientApp runs in Ray worker processes: they must import this folder's modules.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")]))
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    sys.path.insert(0, HERE)
    from flwr.simulation import run_simulation

    from fedmomentum_app.client_app import app as client_app
    from fedmomentum_app.server_app import make_server_app

    if not args.verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    server_app, holder = make_server_app(args.rounds, args.clients, method=args.method,
                                         rank=args.rank, solver=args.solver,
                                         residual=args.residual, local_steps=args.local_steps)
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=args.clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": max(1, min(args.clients, os.cpu_count() or 1))}})
    strategy, result = holder.get("strategy"), holder.get("result")
    if strategy is None or result is None:
        print("the ServerApp did not finish", file=sys.stderr)
        return 1
    ok = True
    for r in range(1, args.rounds + 1):
        tm = result.train_metrics_clientapp.get(r)
        em = result.evaluate_metrics_clientapp.get(r)
        if tm is None:
            print(f"round {r}: no aggregation (all replies dropped)")
            ok = False
            continue
        diff = strategy.max_abs_diff.get(r, float("nan"))
        print(f"round {r}: train-loss {tm['train-loss']:.4f}  "
              f"eval-loss {em['eval-loss'] if em else float('nan'):.4f}  "
              f"aggregation {tm['aggregation-seconds']:.4f} s  "
              f"energy-kept {tm['energy-kept']:.4f}  residual-rank {tm['residual-rank']}  "
              f"max|client-server| {diff:.2e}")
        if args.residual == "ship" and not (diff <= 1e-4):
            ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
