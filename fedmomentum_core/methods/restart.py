"""Methods that merge the whole ΔW into the backbone and restart the adapter: FLoRA."""
from __future__ import annotations

import math

import torch

from ..types import AggregationResult
from ..validate import LayerInput
from .common import Options, finish, full_lowrank
from .registry import register_method

__all__ = ["flora"]


@register_method("flora", exact=True, residual="whole")
def flora(inp: LayerInput, opt: Options) -> AggregationResult:
    """FLoRA (Wang et al. 2024, "FLoRA: Federated Fine-Tuning Large Language Models with
    Heterogeneous Low-Rank Adaptations", NeurIPS): stack all client factors (rank R), merge the
    whole ΔW into the backbone (returned as the residual), and restart from a fresh adapter with
    PEFT's init (A kaiming-uniform(a=√5), B zero), seeded by ``generator``."""
    dt = opt.compute_dtype
    g = opt.generator
    gdev = g.device if g is not None else torch.device("cpu")
    if g is None:
        g = torch.Generator(device=gdev)
        g.manual_seed(2)
    bound = 1.0 / math.sqrt(inp.n)
    A = (torch.rand(opt.rank, inp.n, generator=g, device=gdev, dtype=dt) * 2 - 1).mul_(bound).to(inp.device)
    B = torch.zeros(inp.m, opt.rank, dtype=dt, device=inp.device)
    return finish(inp, opt, B=B, A=A, residual=full_lowrank(inp, dt), sv=None, kept=0.0,
                  dropped=0.0, method="flora", solver="none", exact=True)
