"""The one synthetic-round generator: seeded client factors shaped like trained LoRA, for the demo,
the profiler, the benchmarks and the tests."""
from __future__ import annotations

import math
from typing import Union

import torch

__all__ = ["synthetic_module", "synthetic_round", "client_weights"]


def client_weights(clients: int, seed: int = 0) -> list[int]:
    """Seeded per-client sample counts in [50, 500): the weights of every module of a round."""
    g = torch.Generator().manual_seed(int(seed) + 12345)
    return torch.randint(50, 500, (clients,), generator=g).tolist()


def synthetic_module(m: int, n: int, clients: int, rank: int, *, dtype: torch.dtype = torch.bfloat16,
                     seed: int = 0, index: int = 0, device: Union[str, torch.device] = "cpu"
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
    """Seeded synthetic client factors of one module, like trained LoRA: A uniform(±1/√n)
    (kaiming-like), B uniform(±0.02·√3) (standard deviation 0.02), the round's per-client sample
    counts (:func:`client_weights`) as weights. ``(seed, index)`` fixes the draw, so module
    ``index`` is the same however modules are batched."""
    dev = torch.device(device)
    g = torch.Generator(device=dev)
    g.manual_seed((int(seed) * 1_000_003 + int(index) * 7_919) % (2 ** 63))
    sb, sa = 0.02 * math.sqrt(3.0), 1.0 / math.sqrt(n)
    B, A = [], []
    for _ in range(clients):
        B.append(torch.rand(m, rank, generator=g, device=dev).mul_(2 * sb).sub_(sb).to(dtype))
        A.append(torch.rand(rank, n, generator=g, device=dev).mul_(2 * sa).sub_(sa).to(dtype))
    return B, A, client_weights(clients, seed)


def synthetic_round(m: int, n: int, K: int, r: int, seed: int = 0, dtype: torch.dtype = torch.float32
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
    """One m x n layer's round of K clients of rank r: ``(B, A, weights)`` of
    :func:`synthetic_module` (module index 0), in ``dtype`` (float32 by default)."""
    return synthetic_module(m, n, K, r, dtype=dtype, seed=seed)
