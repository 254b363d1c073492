"""A performance MODEL (not a measurement) of the kernels and of a Llama-70B round on GPUs.

    python benchmarks/gpu_model.py            # writes results/gpu_model.{md,csv}

No GPU is lent to this project's machines yet, so this predicts, from the FLOPs and bytes each
call moves, what ``benchmarks/run_kernels_gpu.py`` would measure: per call

    time = max(bytes / peak HBM bandwidth, FLOPs / peak throughput of the unit it runs on)
           + launches x launch overhead

(a roofline with both peaks at 100 %: a lower bound that real kernels approach within a factor,
not a forecast of that factor). The FLOPs and bytes of a module are the cost model's own
(``solver_flops`` per phase, ``solver_bytes``; the numbers the profiler reports), split over the
kernels that run them on a GPU (see :func:`round_calls`). Peaks are the vendors' data-sheet
numbers (:data:`GPUS`, cited). The results file is replaced by measurements the day a GPU runs
``benchmarks/run_kernels_gpu.py``.
"""
from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

try:
    from fedmomentum_core.cost import solver_bytes, solver_flops
except ImportError:  # before the cost model's move out of the profiler
    from fedmomentum_core.profiling import solver_bytes, solver_flops
from fedmomentum_core.shapes import model_shapes


@dataclass(frozen=True)
class Gpu:
    """Peak numbers from the vendor's data sheet (dense, i.e. without 2:4 sparsity)."""

    name: str
    hbm_bytes_s: float
    bf16_flops: float      # tensor cores / matrix cores, dense
    fp32_flops: float      # FP32 without TF32 (CUDA cores / vector ALUs): tl.dot with IEEE fp32
    fp64_flops: float      # FP64 tensor / matrix cores (the R x R work is fp64)
    source: str


GPUS = (
    Gpu("H100 SXM", 3.35e12, 989.4e12, 66.9e12, 66.9e12,
        "NVIDIA H100 Tensor Core GPU datasheet (SXM5: 3.35 TB/s HBM3, BF16 1,979 TFLOPS with sparsity "
        "= 989.4 dense, FP32 67 TFLOPS, FP64 Tensor Core 67 TFLOPS)"),
    Gpu("H200", 4.8e12, 989.4e12, 66.9e12, 66.9e12,
        "NVIDIA H200 Tensor Core GPU datasheet (SXM: 4.8 TB/s HBM3e, BF16 1,979 TFLOPS with sparsity, "
        "FP32 67 TFLOPS, FP64 Tensor Core 67 TFLOPS)"),
    Gpu("A100 80GB SXM", 2.039e12, 312e12, 19.5e12, 19.5e12,
        "NVIDIA A100 Tensor Core GPU datasheet (80GB SXM: 2,039 GB/s, BF16 312 TFLOPS dense, FP32 "
        "19.5 TFLOPS, FP64 Tensor Core 19.5 TFLOPS)"),
    Gpu("MI300X", 5.3e12, 1307.4e12, 163.4e12, 163.4e12,
        "AMD Instinct MI300X data sheet (5.3 TB/s HBM3, BF16 1,307.4 TFLOPS dense, FP32 vector "
        "163.4 TFLOPS, FP64 matrix 163.4 TFLOPS)"),
)


@dataclass(frozen=True)
class Assumptions:
    """The model's stated assumptions (each one a field, so a reader can see and change it)."""

    launch_s: float = 10e-6          # per kernel launch, host side included (Triton's Python launcher)
    small_launches: int = 40         # launches of the R x R stage per shape group (Cholesky, inverses,
    #                                  products, eigh, rotations; batched over the group's layers)
    other_launches: int = 10         # per shape group: stacking tables, scaling, casts, outputs
    itemsize: int = 2                # bf16 client factors


@dataclass(frozen=True)
class Call:
    """One kernel (or one stage) of a round: what it moves and which unit computes it."""

    name: str
    flops: float
    bytes: float
    unit: str        # "bf16", "fp32" or "fp64": which peak applies
    launches: int

    def seconds(self, gpu: Gpu, a: Assumptions) -> tuple[float, float, float]:
        """(memory time, compute time, modelled time) of this call on ``gpu``."""
        peak = {"bf16": gpu.bf16_flops, "fp32": gpu.fp32_flops, "fp64": gpu.fp64_flops}[self.unit]
        mem, comp = self.bytes / gpu.hbm_bytes_s, self.flops / peak
        return mem, comp, max(mem, comp) + self.launches * a.launch_s


def accumulate_calls(m: int = 8192, n: int = 8192) -> list[Call]:
    """``lowrank_accumulate_`` on an m x n bf16 ``out``: read and write ``out`` once, read the factors
    once (re-reads across tiles hit L2), 2·m·n·T FLOPs on the bf16 tensor cores."""
    out = []
    for label, ts in (("1 pair, t = 176 (residual merge)", [176]), ("K = 10 pairs, t = 16", [16] * 10)):
        T = sum(ts)
        out.append(Call(f"lowrank_accumulate_ {m}x{n} bf16, {label}", 2.0 * m * n * T,
                        2 * m * n * 2 + (m + n) * T * 2, "bf16", 1))
    return out


def round_calls(m: int, n: int, layers: int, K: int, r: int, residual: str, a: Assumptions) -> list[Call]:
    """The exact solver on ``layers`` same-shaped m x n modules, batched (one launch per stage).

    * Grams (``batched_stacked_gram``, B and A sides): ``solver_flops[...]["gram"]`` on the bf16
      tensor cores; reads every client factor once.
    * forming U and σV (``batched_stacked_matmul[_t]``): ``["form_uv"]``; fp32 ``tl.dot`` (the
      R x k matrices are fp32, TF32 off by default) on the FP32 units; reads the factors again and
      writes the outputs and the residual (``solver_bytes["written"]``).
    * the R x R stage (``["small"]``): fp64, batched over the layers; bytes negligible.
    ``residual="stacked"`` forms no tail products (``need_tail=False``), ``"factored"`` forms them."""
    R = K * r
    tail = residual == "factored"
    f = solver_flops(m, n, R, r, "exact", need_tail=tail)
    b = solver_bytes(m, n, [r] * K, r, "exact", itemsize=a.itemsize, residual=tail)
    read = b["read"]
    return [
        Call("Grams", layers * f["gram"], layers * read, "bf16", 2),
        Call("form U, σV", layers * f["form_uv"], layers * (read + b["written"]), "fp32", 2),
        Call("R x R stage", layers * f["small"], layers * 8 * 4 * R * R, "fp64", a.small_launches),
        Call("other (tables, casts, outputs)", 0.0, 0.0, "fp32", a.other_launches),
    ]


def model_round(model: str, K: int, r: int, residual: str, layers: int | None, a: Assumptions):
    """Calls of a round of ``model`` (``layers`` of its layers; all when None), grouped by shape."""
    shapes = model_shapes(model)
    L = shapes.num_layers if layers is None else layers
    groups: dict[tuple[int, int], int] = {}
    for kind in shapes.targets:
        m, n = shapes.kind_shape(kind)
        groups[(m, n)] = groups.get((m, n), 0) + L
    calls = []
    for (m, n), cnt in groups.items():
        calls += [Call(f"{m}x{n} x{cnt}: {c.name}", c.flops, c.bytes, c.unit, c.launches)
                  for c in round_calls(m, n, cnt, K, r, residual, a)]
    return calls


def _groups(model: str = "llama-70b") -> list[str]:
    shapes = model_shapes(model)
    cnt: dict[tuple[int, int], int] = {}
    for kind in shapes.targets:
        cnt[shapes.kind_shape(kind)] = cnt.get(shapes.kind_shape(kind), 0) + shapes.num_layers
    return [f"{m}x{n} ({c} modules)" for (m, n), c in cnt.items()]


GROUPS = _groups()


def cpu_round(residual: str) -> float | None:
    """The 2-core CPU measurement of the same round (benchmarks/results/round_cpu.csv)."""
    path = HERE / "results" / "round_cpu.csv"
    if not path.exists():
        return None
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            if row["scenario"] == f"round (residual={residual})" and row["layers_measured"] == row["num_layers"]:
                return float(row["round_seconds"])
    return None


def main() -> None:
    a = Assumptions()
    rows = []
    sections = [("lowrank_accumulate_", c.name, [c]) for c in accumulate_calls()]
    for residual in ("stacked", "factored"):
        sections.append(("one module", f"llama-70b down_proj (8192x28672), K=10, r=16, residual={residual}",
                         round_calls(8192, 28672, 1, 10, 16, residual, a)))
        sections.append(("one layer", f"llama-70b one layer (7 modules), K=10, r=16, residual={residual}",
                         model_round("llama-70b", 10, 16, residual, 1, a)))
        sections.append(("round", f"llama-70b round (80 layers), K=10, r=16, residual={residual}",
                         model_round("llama-70b", 10, 16, residual, None, a)))
    for kind, label, calls in sections:
        flops, nbytes = sum(c.flops for c in calls), sum(c.bytes for c in calls)
        row = {"what": label, "kind": kind, "gflop": round(flops / 1e9, 3), "gbytes": round(nbytes / 1e9, 4),
               "launches": sum(c.launches for c in calls)}
        for gpu in GPUS:
            t = [c.seconds(gpu, a) for c in calls]
            row[f"{gpu.name} ms"] = round(1e3 * sum(x[2] for x in t), 3)
            parts = {"memory": sum(x[0] for x in t), "compute": sum(x[1] for x in t),
                     "launch": sum(c.launches for c in calls) * a.launch_s}
            row[f"{gpu.name} bound"] = max(parts, key=parts.get)  # the largest of the three sums
        cpu = cpu_round(label.split("residual=")[1]) if kind == "round" else None
        row["CPU 2-core measured ms"] = round(1e3 * cpu, 1) if cpu else ""
        rows.append(row)
    out = HERE / "results"
    with open(out / "gpu_model.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    names = [g.name for g in GPUS]
    lines = [
        "# GPU performance MODEL (predicted, not measured) — `benchmarks/gpu_model.py`",
        "",
        "**This is a model.** No GPU has run these kernels yet; each number below is "
        "`max(bytes / peak HBM bandwidth, FLOPs / peak throughput) + launches x launch overhead` per "
        "kernel call, summed, with both peaks at 100 % of the data sheet: a lower bound that real "
        "kernels approach within some factor. It is replaced by measurements "
        "(`benchmarks/run_kernels_gpu.py`) the day a GPU is available. The CPU column is a "
        "measurement (benchmarks/results/round_cpu.md, 2 cores).",
        "",
        f"Assumptions: launch overhead {a.launch_s * 1e6:.0f} µs per kernel launch; the R x R stage "
        f"{a.small_launches} launches and the rest {a.other_launches} per shape group (a round is "
        f"batched by shape: {len(GROUPS)} groups for Llama-70B, {', '.join(GROUPS)}); bf16 client factors; Grams on "
        "the bf16 tensor cores, the U/σV products in IEEE fp32 (TF32 is off by default), the R x R "
        "stage in fp64. FLOPs and bytes per module are the cost model's (`solver_flops`, "
        "`solver_bytes` in fedmomentum_core.cost), the numbers the profiler reports.",
        "",
        "Bound: which of memory time, compute time and launch overhead (each summed over the calls) "
        "is largest.",
        "",
        "| what | GFLOP | GB moved | launches | " + " | ".join(f"{n} ms (bound)" for n in names)
        + " | CPU 2-core measured ms |",
        "|---|---|---|---|" + "---|" * len(names) + "---|",
    ]
    for row in rows:
        lines.append(f"| {row['what']} | {row['gflop']} | {row['gbytes']} | {row['launches']} | "
                     + " | ".join(f"{row[n + ' ms']} ({row[n + ' bound']})" for n in names)
                     + f" | {row['CPU 2-core measured ms']} |")
    lines += ["", "Not modelled, and likely to matter on a GPU:", "",
              "- the latency of the batched fp64 `eigh` of the 160 x 160 cores: cuSOLVER solves small "
              "eigenproblems latency-bound, one matrix after another; at a hypothetical 1 ms per matrix "
              "the 560 cores of a round would add 0.56 s, more than everything above. The first GPU run "
              "should time `torch.linalg.eigh` on an 80 x 160 x 160 fp64 batch;",
              "- the fp64 R x R work assumes FP64 tensor / matrix-core peaks, which small batched "
              "factorizations do not reach;",
              "- caches (factors re-read by neighbouring tiles are assumed to hit L2), clocks under "
              "power limits, and kernel efficiency (tile quantization, tail effects).",
              "", "Peaks (dense) and sources:", ""]
    lines += [f"- {g.name}: {g.hbm_bytes_s / 1e12:g} TB/s, BF16 {g.bf16_flops / 1e12:g} TFLOPS, FP32 "
              f"{g.fp32_flops / 1e12:g} TFLOPS, FP64 {g.fp64_flops / 1e12:g} TFLOPS — {g.source}" for g in GPUS]
    (out / "gpu_model.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:14 + len(rows)]))


if __name__ == "__main__":
    main()
