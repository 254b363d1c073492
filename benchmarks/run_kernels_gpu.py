"""GPU kernel benchmarks (issue 3): bandwidth of the fused merge, one big layer, a 70B-shaped round.

    python benchmarks/run_kernels_gpu.py                 # everything, writes results/kernels_<gpu>.{csv,md}
    python benchmarks/run_kernels_gpu.py --quick         # smaller round (8 of 80 blocks), no full SVD

Sections (every row is timed in this process, side by side, CUDA events, median of repeats):

1. ``lowrank_accumulate_`` on an 8192 x 8192 bf16 W with one t = 176 pair (a residual merge) and
   with K = 10 pairs of t = 16: effective bandwidth (bytes of W read + written + factors read)
   against the GPU's HBM peak (table below, by device name) and against a measured device copy;
   Triton vs the torch backend.
2. One 8192 x 28672 layer (down_proj), K = 10, r = 16, bf16 factors: FedMomentum exact on the Triton
   and torch backends vs dense ΔW + ``torch.svd_lowrank`` (the paper) vs dense ΔW + full SVD (PEFT).
3. A Llama-70B-shaped round: 80 blocks x (q, k, v, o, gate, up, down), K = 10, r = 16, bf16:
   ``aggregate_layers`` (batched by shape) on both backends, measured on the whole round;
   the dense routes are measured on ``--dense-layers`` layers of each shape and extrapolated to
   80 (stated in the output).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import write_csv  # noqa: E402

import fedmomentum_kernels as K  # noqa: E402
from fedmomentum_core.baselines import dense_full_svd, dense_svd_lowrank  # noqa: E402
from fedmomentum_core.methods import aggregate_layers  # noqa: E402
from fedmomentum_core.validate import validate_layer  # noqa: E402

#: HBM peak bandwidth in bytes/s by a substring of torch.cuda.get_device_name (vendor datasheets)
HBM_PEAK = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12),
            ("GH200", 4.0e12), ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12),
            ("A100", 1.555e12), ("L40S", 0.864e12), ("L4", 0.3e12), ("A10", 0.6e12)]

LLAMA70B = {  # name: (out, in)
    "q_proj": (8192, 8192), "k_proj": (1024, 8192), "v_proj": (1024, 8192), "o_proj": (8192, 8192),
    "gate_proj": (28672, 8192), "up_proj": (28672, 8192), "down_proj": (8192, 28672),
}


def hbm_peak(name: str) -> float | None:
    for key, bw in HBM_PEAK:
        if key in name:
            return bw
    return None


#: where the benchmark runs ("cuda"; "cpu" only for --smoke, which checks the script itself)
DEVICE = "cuda"
#: shapes are divided by this (1 on GPU; --smoke shrinks everything to run on a CPU in seconds)
SHRINK = 1


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def set_backend(name: str) -> None:
    os.environ["FEDMOMENTUM_BACKEND"] = name if DEVICE == "cuda" else "torch"


def cuda_time(fn, repeat: int = 10, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` over ``repeat`` runs, timed with CUDA events."""
    if DEVICE != "cuda":
        return wall_time(fn, repeat)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def wall_time(fn, repeat: int = 3) -> float:
    """Best-of wall seconds (host work included: the whole round, dense SVDs)."""
    best = float("inf")
    for _ in range(repeat):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - t0)
    return best


def clients(m: int, n: int, K_: int, r: int, seed: int, dtype=torch.bfloat16):
    m, n = max(1, m // SHRINK), max(1, n // SHRINK)
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    B = [(torch.randn(m, r, generator=g, device=DEVICE) * 0.02).to(dtype) for _ in range(K_)]
    A = [(torch.randn(r, n, generator=g, device=DEVICE) * 0.02).to(dtype) for _ in range(K_)]
    return B, A


# ----------------------------------------------------------------------------- 1. bandwidth

def bench_bandwidth(rows: list, peak: float | None) -> None:
    m = n = 8192 // SHRINK
    W = torch.randn(m, n, device=DEVICE).to(torch.bfloat16)
    W2 = torch.empty_like(W)
    copy_s = cuda_time(lambda: W2.copy_(W), repeat=20)
    copy_bw = 2 * W.numel() * W.element_size() / copy_s
    rows.append(dict(section="bandwidth", case="device copy 8192x8192 bf16", backend="torch",
                     seconds=copy_s, GBps=copy_bw / 1e9, pct_peak=100 * copy_bw / peak if peak else None))
    for label, ts in (("t=176 (one pair)", [176]), ("K=10 x t=16", [16] * 10)):
        L = [(torch.randn(m, t, device=DEVICE) * 0.01).to(torch.bfloat16) for t in ts]
        R = [(torch.randn(t, n, device=DEVICE) * 0.01).to(torch.bfloat16) for t in ts]
        cs = [1.0 / len(ts)] * len(ts)
        nbytes = 2 * W.numel() * 2 + sum((m * t + t * n) * 2 for t in ts)
        for backend in ("triton", "torch"):
            set_backend(backend)
            s = cuda_time(lambda: K.lowrank_accumulate_(W, L, R, cs), repeat=20)
            bw = nbytes / s
            rows.append(dict(section="bandwidth", case=f"lowrank_accumulate_ 8192x8192 bf16, {label}",
                             backend=backend, seconds=s, GBps=bw / 1e9,
                             pct_peak=100 * bw / peak if peak else None, pct_copy=100 * bw / copy_bw))
    del W, W2


# ----------------------------------------------------------------------------- 2. one big layer

def bench_layer(rows: list, full_svd: bool) -> None:
    m, n, K_, r = 8192, 28672, 10, 16
    B, A = clients(m, n, K_, r, seed=1)
    w = [float(k + 1) for k in range(K_)]
    inp = validate_layer(B, A, w)
    res = {}
    for backend in ("triton", "torch"):
        set_backend(backend)
        res[backend] = wall_time(lambda: aggregate_layers([(B, A)], w, rank=r, solver="exact"), repeat=5)
    set_backend("triton")
    res["dense+svd_lowrank"] = wall_time(lambda: dense_svd_lowrank(inp, r), repeat=2)
    if full_svd:
        res["dense+full SVD"] = wall_time(lambda: dense_full_svd(inp, r), repeat=1)
    for k, s in res.items():
        rows.append(dict(section="layer 8192x28672 K=10 r=16 bf16", case=k, backend=k if k in ("triton", "torch")
                         else "triton (ΔW)", seconds=s, speedup_triton=s / res["triton"]))


# ----------------------------------------------------------------------------- 3. 70B round

def bench_round(rows: list, blocks: int, dense_layers: int, full_svd: bool) -> None:
    K_, r = 10, 16
    w = [float(k + 1) for k in range(K_)]
    layers, names = [], []
    for b in tqdm(range(blocks), desc="building client factors"):
        for mod, (m, n) in LLAMA70B.items():
            layers.append(clients(m, n, K_, r, seed=1000 * b + len(names)))
            names.append(f"layers.{b}.{mod}")
    scale = 80 / blocks
    res = {}
    for backend in ("triton", "torch"):
        set_backend(backend)
        s = wall_time(lambda: aggregate_layers(layers, w, rank=r, solver="exact"), repeat=3)
        res[f"fedmomentum exact, {backend} backend"] = (s * scale, "measured" if blocks == 80
                                                        else f"measured on {blocks} blocks, x{scale:g}")
    set_backend("triton")
    for label, fn, on in (("dense+svd_lowrank (paper)", dense_svd_lowrank, True),
                          ("dense+full SVD (PEFT)", dense_full_svd, full_svd)):
        if not on:
            continue
        total = 0.0
        reps = 1 if "full" in label else max(1, dense_layers)
        for mod, (m, n) in tqdm(LLAMA70B.items(), desc=label):
            inp = validate_layer(*layers[names.index(f"layers.0.{mod}")], w)
            per = wall_time(lambda: fn(inp, r), repeat=reps)
            total += per * 80
            rows.append(dict(section="70B round per-layer", case=f"{label} {mod} {m}x{n}", backend="triton (ΔW)",
                             seconds=per, note=f"best of {reps}"))
        res[label] = (total, "1 layer per shape timed, x80 (extrapolated)")
    base = res["fedmomentum exact, triton backend"][0]
    for k, (s, how) in res.items():
        rows.append(dict(section="70B round (560 layers, K=10, r=16, bf16)", case=k, backend="",
                         seconds=s, speedup_triton=s / base, note=how))


def write_md(path: Path, rows: list, device: str, peak: float | None, args) -> None:
    lines = [f"# Kernel benchmarks on {device}", "",
             f"`python benchmarks/run_kernels_gpu.py {' '.join(sys.argv[1:])}`, torch {torch.__version__}, "
             f"HBM peak used: {peak / 1e12 if peak else 'unknown'} TB/s.", ""]
    sections = []
    for r in rows:
        if r["section"] not in sections:
            sections.append(r["section"])
    for sec in sections:
        lines += [f"## {sec}", "", "| case | backend | seconds | GB/s | % HBM peak | ratio vs triton | note |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["section"] != sec:
                continue

            def f(key, fmt):
                v = r.get(key)
                return "" if v is None else format(v, fmt)
            lines.append(f"| {r['case']} | {r.get('backend', '')} | {f('seconds', '.4g')} | {f('GBps', '.0f')} | "
                         f"{f('pct_peak', '.1f')} | {f('speedup_triton', '.1f')} | {r.get('note', '')} |")
        lines.append("")
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 of the 80 blocks, no full SVD")
    ap.add_argument("--blocks", type=int, default=None, help="transformer blocks in the round (default 80)")
    ap.add_argument("--dense-layers", type=int, default=2, help="repeats per shape for dense+svd_lowrank (best of)")
    ap.add_argument("--no-full-svd", action="store_true", help="skip dense + full SVD (slow)")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--smoke", metavar="DIR", default=None,
                    help="check the script on a CPU with tiny shapes, writing to DIR (no measurement)")
    args = ap.parse_args(argv)
    global DEVICE, SHRINK
    if args.smoke:
        DEVICE, SHRINK = "cpu", 64
        device = "CPU smoke run (shapes / 64, torch backend only; not a measurement)"
        args.out = args.out if args.out != str(HERE / "results") else str(Path(args.smoke))
    elif not torch.cuda.is_available():
        print("needs a CUDA GPU (or --smoke DIR to check the script on a CPU)", file=sys.stderr)
        return 2
    else:
        device = torch.cuda.get_device_name(0)
    slug = device.lower().replace("nvidia", "").strip().replace(" ", "_").replace("-", "_")
    peak = hbm_peak(device)
    blocks = args.blocks or (1 if args.smoke else 8 if args.quick else 80)
    full_svd = not (args.no_full_svd or args.quick)
    rows: list = []
    bench_bandwidth(rows, peak)
    bench_layer(rows, full_svd)
    bench_round(rows, blocks, args.dense_layers, full_svd)
    for r in rows:
        r["device"] = device
    out = Path(args.out)
    write_csv(str(out / f"kernels_{slug}.csv"), rows)
    write_md(out / f"kernels_{slug}.md", rows, device, peak, args)
    print((out / f"kernels_{slug}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
