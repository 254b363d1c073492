"""Sharded aggregation benchmark: ``fedmomentum aggregate`` in 1 process vs 2 processes (torchrun, gloo).

Writes benchmarks/results/distributed_cpu.csv and distributed_cpu.md (relative to the repo root).

    python benchmarks/run_distributed.py                  # 4 layers x 7 modules, K = 10, r = 16, bf16
    python benchmarks/run_distributed.py --layers 1 --clients 4 --repeat 1   # quick

Setup (not timed): K client adapter folders (``adapter_model.safetensors`` + ``adapter_config.json``,
PEFT key names) with Llama-3-70B-shaped LoRA factors on q,k,v,o,gate,up,down (hidden 8192,
intermediate 28672, 8 KV heads x 128: q,o 8192x8192, k,v 1024x8192, gate,up 28672x8192, down
8192x28672), random bf16 A and B, written under a temporary folder that is deleted at the end.

Timed, end to end as a user runs it (Python start-up, reading, aggregating, gathering, writing the
adapter + residual.safetensors), best of ``--repeat``:

* ``1 proc x 2 thr``: ``python -m fedmomentum aggregate ...`` (torch uses both cores) — the baseline;
* ``1 proc x 1 thr``: the same with OMP_NUM_THREADS=1 (what one rank gets below);
* ``2 procs x 1 thr``: ``python -m torch.distributed.run --nproc-per-node 2 -m fedmomentum aggregate ...``
  (gloo on 127.0.0.1; modules sharded by cost, results gathered to rank 0, which writes).

Each variant runs with ``--residual save`` (the default: residual factors, rank R - r per module, are
gathered to rank 0 and written) and ``--residual discard`` (only the rank-r adapter is gathered).
The outputs of 1 and 2 processes are compared tensor by tensor (``identical``). CPU seconds are the
children's user+sys time (less sensitive to other load than wall time).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, write_csv  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
#: Llama-3-70B projection shapes (out x in)
SHAPES = {"self_attn.q_proj": (8192, 8192), "self_attn.k_proj": (1024, 8192), "self_attn.v_proj": (1024, 8192),
          "self_attn.o_proj": (8192, 8192), "mlp.gate_proj": (28672, 8192), "mlp.up_proj": (28672, 8192),
          "mlp.down_proj": (8192, 28672)}


def write_clients(root: Path, clients: int, layers: int, rank: int, seed: int = 0) -> list[Path]:
    """K adapter folders with 70B-shaped bf16 LoRA factors (B non-zero), PEFT saved key names."""
    from safetensors.torch import save_file

    dirs = []
    g = torch.Generator().manual_seed(seed)
    for k in range(clients):
        d = root / f"client{k}"
        d.mkdir(parents=True)
        sd = {}
        for layer in range(layers):
            for mod, (m, n) in SHAPES.items():
                name = f"base_model.model.model.layers.{layer}.{mod}"
                sd[f"{name}.lora_A.weight"] = (torch.randn(rank, n, generator=g) / n ** 0.5).to(torch.bfloat16)
                sd[f"{name}.lora_B.weight"] = (torch.randn(m, rank, generator=g) / rank ** 0.5).to(torch.bfloat16)
        save_file(sd, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
        cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "use_rslora": False,
               "target_modules": sorted(m.split(".")[1] for m in SHAPES), "lora_dropout": 0.0,
               "fan_in_fan_out": False, "bias": "none", "rank_pattern": {}, "alpha_pattern": {},
               "task_type": "CAUSAL_LM"}
        (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
        dirs.append(d)
    return dirs


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(threads: int | None) -> dict:
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS"):
        env.pop(k, None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_once(dirs, out: Path, procs: int, threads: int | None, residual: str, rank: int) -> tuple[float, float]:
    """One end-to-end CLI run; returns (wall seconds, children CPU seconds)."""
    args = ["aggregate", *map(str, dirs), "--out", str(out), "--rank", str(rank), "--residual", residual]
    if procs == 1:
        cmd = [sys.executable, "-m", "fedmomentum", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(procs),
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "fedmomentum", *args]
    if out.exists():
        shutil.rmtree(out)
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=_env(threads), capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed:\n{proc.stderr[-3000:]}")
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return wall, cpu


def _identical(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    for name in ("adapter_model.safetensors", "residual.safetensors"):
        if (a / name).exists() != (b / name).exists():
            return False
        if (a / name).exists():
            ta, tb = load_file(str(a / name)), load_file(str(b / name))
            if set(ta) != set(tb) or not all(torch.equal(ta[k], tb[k]) for k in ta):
                return False
    return (a / "adapter_config.json").read_bytes() == (b / "adapter_config.json").read_bytes()


def _work(out: Path, shards) -> tuple[float, float]:
    """(read + aggregate seconds summed over modules, the largest per-rank sum under ``shards``),
    from the per-module timings in fedmomentum_report.json."""
    rep = json.loads((out / "fedmomentum_report.json").read_text())["modules"]
    t = [m["seconds"] + m["read_seconds"] for m in rep]
    return sum(t), max(sum(t[i] for i in s) for s in shards)


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "distributed_cpu"))
    args = ap.parse_args(argv)

    from tqdm.auto import tqdm

    from fedmomentum.distributed import shard_modules
    from fedmomentum.peft import plan_adapters

    rows = []
    with tempfile.TemporaryDirectory(prefix="fm-dist-bench-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        dirs = write_clients(tmp / "in", args.clients, args.layers, args.rank)
        setup_s = time.perf_counter() - t0
        in_bytes = sum(_dir_bytes(d) for d in dirs)
        plan = plan_adapters(dirs).plan
        shards = shard_modules(plan.modules, 2, rank=args.rank)
        split = " / ".join(str(len(s)) for s in shards)
        variants = [(1, None, "1 proc x 2 thr"), (1, 1, "1 proc x 1 thr"), (2, 1, "2 procs x 1 thr")]
        jobs = [(res, v) for res in ("save", "discard") for v in variants]
        bar = tqdm(total=len(jobs) * args.repeat, desc="distributed bench", unit="run")
        for res, (procs, threads, label) in jobs:
            out = tmp / f"out_{res}_{procs}_{threads}"
            best_wall, best_cpu = float("inf"), float("inf")
            for _ in range(args.repeat):
                wall, cpu = run_once(dirs, out, procs, threads, res, args.rank)
                best_wall, best_cpu = min(best_wall, wall), min(best_cpu, cpu)
                bar.update()
            work, crit = _work(out, shards if procs == 2 else [list(range(len(plan.modules)))])
            rows.append({"residual": res, "variant": label, "processes": procs,
                         "threads_per_process": threads or torch.get_num_threads(),
                         "wall_s": round(best_wall, 3), "cpu_s": round(best_cpu, 3),
                         "work_s": round(work, 3), "critical_work_s": round(crit, 3),
                         "input_bytes": in_bytes, "output_bytes": _dir_bytes(out),
                         "_out": out})
        bar.close()
        for res in ("save", "discard"):
            grp = [r for r in rows if r["residual"] == res]
            base = grp[0]
            for r in grp:
                r["speedup_vs_1proc_2thr"] = round(base["wall_s"] / r["wall_s"], 3)
                r["identical_to_1proc"] = _identical(base["_out"], r["_out"])
        for r in rows:
            r.pop("_out")
    mach = machine()
    common = {"machine": mach, "layers": args.layers, "modules": len(plan.modules), "clients": args.clients,
              "r": args.rank, "dtype": "bf16", "modules_per_rank": split}
    rows = [{**common, **r} for r in rows]
    write_csv(args.out + ".csv", rows)
    write_md(args.out + ".md", rows, args, mach, in_bytes, split, setup_s)
    for r in rows:
        print(f"{r['residual']:>8} {r['variant']:<16} wall {r['wall_s']:8.2f} s  cpu {r['cpu_s']:8.2f} s  "
              f"speed-up {r['speedup_vs_1proc_2thr']:.2f}x  identical={r['identical_to_1proc']}")
    return 0


def write_md(path: str, rows, args, mach: str, in_bytes: int, split: str, setup_s: float) -> None:
    mib = 1 << 20
    lines = [
        "# Sharded aggregation: 1 process vs 2 processes (torchrun, gloo)", "",
        f"Machine: {mach}. Command: `python benchmarks/run_distributed.py --layers {args.layers} "
        f"--clients {args.clients} --rank {args.rank} --repeat {args.repeat}`.", "",
        f"Input: K = {args.clients} client adapters, {args.layers} Llama-3-70B-shaped layers x 7 modules "
        f"(q,o 8192x8192; k,v 1024x8192; gate,up 28672x8192; down 8192x28672), r = {args.rank}, bf16: "
        f"{in_bytes / mib:.1f} MiB of safetensors read (written in {setup_s:.1f} s, not timed). "
        f"Modules per rank with 2 processes (LPT on the cost model): {split}.", "",
        "Each time is one `fedmomentum aggregate` end to end (Python and torch start-up, reading the "
        "factors, aggregating, gathering to rank 0, writing the adapter and, with `save`, "
        "residual.safetensors), best of the repeats. CPU s = the children's user + sys time. "
        "Other developers were using the same 2 cores while this ran, so wall times are noisy; "
        "the ratios in one run are what matter. `identical`: the 2-process output equals the "
        "1-process output tensor for tensor (bitwise) and adapter_config.json byte for byte.", "",
        "`work s`: read + aggregate seconds summed over modules (from fedmomentum_report.json of the "
        "measured run); `critical work s`: the largest per-rank sum (the part that sharding divides).", "",
        "| residual | variant | wall s | CPU s | speed-up vs 1 proc x 2 thr | work s | critical work s | output MiB | identical |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['residual']} | {r['variant']} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | "
                     f"{r['speedup_vs_1proc_2thr']:.2f}x | {r['work_s']:.2f} | {r['critical_work_s']:.2f} | "
                     f"{r['output_bytes'] / mib:.1f} | {r['identical_to_1proc']} |")
    lines += ["", READING, "", SCALING, ""]
    Path(path).write_text("\n".join(lines))


READING = """## Reading

This is a single 2-core machine shared with other developers, not the setting sharding is for, and
the table says so: end to end, 2 processes are *slower* than 1. The aggregation itself is small
here (read + aggregate summed over the modules, `work s`, is about a second: the factored exact
solve never forms a dense matrix), while sharding adds fixed costs: the torchrun launcher and a
second Python/torch interpreter with the gloo rendezvous (about 2 s here), and, with
`--residual save`, rank 0 writes every module's residual factors (rank R - r = 144 per module,
fp32: about 19x the size of the new adapter) after the gather, serially, where one process streams
them while it computes. The sharded part does split: with `discard` the largest rank's work is
about half of the one-process single-thread work (`critical work s`), and the LPT assignment put
14 / 14 modules on the two ranks with equal modelled cost. With `save`, two 1-thread processes
also contend for the cores and memory bandwidth rank 0 is writing with, so their summed work
grows. The 2-process outputs are bitwise identical to 1 process in every row. Sharding pays when
the per-rank work (reading tens of GB of factors, solving hundreds of modules) is much larger than
these fixed costs and there are more cores, nodes or GPUs than one process can use."""

SCALING = """## Scaling across nodes (NCCL, one process per GPU)

Launch one process per GPU on every node
(`torchrun --nnodes N --nproc-per-node G --rdzv-backend c10d --rdzv-endpoint HOST:PORT -m fedmomentum aggregate ...`);
the default group is NCCL when CUDA is available and the object traffic (status exchange, gather)
runs on a gloo side group, so no GPU memory is used for it. Every rank reads the K configs and
safetensors headers (kilobytes), computes the same LPT assignment, reads only its modules' factors
and aggregates them. The expected round time is

    T(P) ≈ max_rank(bytes read by the rank / its read bandwidth, its modelled FLOPs / its FLOP rate)
           + (output bytes) / (network bandwidth into rank 0) + rank 0's write time,

with bytes read ≈ input bytes / P when the LPT assignment balances (it is within 4/3 of the best
split, and far closer with hundreds of modules). Inputs dominate: K = 100 clients x 560 modules of
70B factors (80 layers x 7) at r = 16 are ~41 GB of bf16 (~83 GB at r = 32), so with P processes
reading from storage with an aggregate bandwidth BW_agg the read takes ~41 GB / BW_agg (e.g. 8
nodes x 2 GB/s each: ~2.6 s), while the FedMomentum solve on GPU is a fraction of that (the Grams
are 2 (m+n) R^2 FLOPs per module). What has to reach rank 0 is only the output: the rank-r adapter
(r (m+n) values per module, ~0.41 GB for 70B at r = 16 in bf16) plus, when the residual is kept,
the residual factors (R - r columns, fp32: ~82 GB at K = 100, R = 1600, where `--residual discard`
or merging into the base weights would be the choice). The gather sends the report rows with one
`gather_object` and the tensors as raw bytes with point-to-point send/recv into rank 0's host
memory, so rank 0 needs memory for all outputs (the same as one process with
keep_residuals=True) and the gather costs ~output bytes / the network bandwidth into rank 0.
Every rank needs the K adapter files readable (shared or replicated storage) but reads only the
byte ranges of its own modules (plus the headers); rank 0 alone writes."""


if __name__ == "__main__":
    raise SystemExit(main())
