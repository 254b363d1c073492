"""Scratch memory kept between calls, made so that it cannot change the next call.

A stack written into memory fresh from the OS pays a page fault per page; a buffer kept from the
previous call is already mapped (``benchmarks/results/core_refactor_cpu.md`` has the measured
difference). The rules
that make reuse safe:

* only scratch goes here: the exact solver's stacks when nothing returned views them;
* every entry a call reads, the same call wrote first (a failed call leaves garbage that no later
  call reads);
* buffers are allocated outside autograd and outside inference mode, so they are plain tensors
  usable in any mode; one that is not (it cannot happen, but it is checked) is replaced;
* one :class:`Workspace` per thread, keyed by (side, dtype, device).
"""
from __future__ import annotations

import threading
from typing import Optional

import torch

__all__ = ["Workspace", "thread_workspace", "release_workspace"]


class Workspace:
    """Flat scratch buffers, one per (side, dtype, device), grown on demand."""

    def __init__(self) -> None:
        self._bufs: dict = {}

    def take(self, side: str, numel: int, dtype: torch.dtype, device: torch.device,
             max_bytes: int) -> Optional[torch.Tensor]:
        """A buffer of ``numel`` elements (contents undefined), or None when it is not CPU memory
        or larger than ``max_bytes`` (the caller allocates)."""
        if device.type != "cpu" or numel * dtype.itemsize > max_bytes:
            return None
        key = (side, dtype, device)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < numel or buf.requires_grad or buf.is_inference():
            with torch.inference_mode(False), torch.no_grad():
                buf = torch.empty(numel, dtype=dtype, device=device)
            self._bufs[key] = buf
        return buf[:numel]

    @property
    def nbytes(self) -> int:
        """Bytes currently held."""
        return sum(b.numel() * b.element_size() for b in self._bufs.values())

    def release(self) -> None:
        """Free every buffer."""
        self._bufs.clear()


_LOCAL = threading.local()


def thread_workspace() -> Workspace:
    """This thread's workspace."""
    ws = getattr(_LOCAL, "ws", None)
    if ws is None:
        ws = _LOCAL.ws = Workspace()
    return ws


def release_workspace() -> None:
    """Free the scratch buffers this thread keeps between calls (memory budgets call it between
    chunks, so a kept buffer is never outside the next chunk's estimate)."""
    thread_workspace().release()
