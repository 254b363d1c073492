"""Keep freed CPU buffers for reuse instead of handing them back to the kernel (glibc only).

A round's stacks and residuals are tens of MB per module. With glibc's default policy, a buffer
that big is ``mmap``-ed fresh and unmapped on free (or trimmed off the heap top), so every round
pays the kernel to zero-fill new pages (what that costs a full round is measured in
benchmarks/results/round_cpu.md, with and without the policy). :func:`reuse_freed_memory` sets two
documented ``mallopt``
knobs so such buffers are carved from, and returned to, the process heap:

* ``M_MMAP_THRESHOLD`` = 32 MiB (glibc's maximum): blocks up to that size come from the heap;
* ``M_TRIM_THRESHOLD`` = ``keep``: up to that much free memory stays with the process.

The effect is process-wide (like choosing jemalloc/tcmalloc, which PyTorch recommends for CPU
work) and RSS no longer shrinks after a round, so it is opt-in: the ``fedmomentum`` CLI applies it
(``FEDMOMENTUM_MALLOC=system`` turns that off), library calls never do. The same can be had
without code from the environment: ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=…``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Optional, Union

__all__ = ["reuse_freed_memory", "allocator_policy", "cli_allocator_setup", "MMAP_THRESHOLD_MAX"]

#: glibc's upper limit for ``M_MMAP_THRESHOLD`` on 64-bit systems (4 MiB · sizeof(long))
MMAP_THRESHOLD_MAX = 32 * 2 ** 20
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_INT_MAX = 2 ** 31 - 1

_applied: Optional[dict] = None


def _libc():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        lib = ctypes.CDLL(name)
        fn = lib.mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def reuse_freed_memory(keep: Union[str, int] = "1GiB") -> bool:
    """Ask glibc malloc to recycle freed buffers (≤ 32 MiB each) and keep up to ``keep`` bytes of
    free memory in the process instead of returning it to the kernel.

    Args:
        keep: how much freed memory may stay with the process: a size such as ``"1GiB"``,
            ``"512MB"`` or a number of bytes (at most 2 GiB − 1, the limit of ``mallopt``).

    Returns:
        True when applied; False where the C library has no ``mallopt`` (macOS, musl, Windows), in
        which case nothing changed.
    """
    global _applied
    from fedmomentum_core.profiling import parse_memory
    try:
        nbytes = parse_memory(keep)
    except (TypeError, ValueError) as e:
        raise type(e)(f"reuse_freed_memory: keep must be a size such as '1GiB' or a positive number "
                      f"of bytes, got {keep!r}") from None
    if nbytes is None:
        raise ValueError("reuse_freed_memory: keep must be a size such as '1GiB' or a number of bytes")
    nbytes = min(int(nbytes), _INT_MAX)  # mallopt takes an int
    fn = _libc()
    if fn is None:
        return False
    ok = bool(fn(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(fn(_M_TRIM_THRESHOLD, nbytes))
    if ok:
        _applied = {"mmap_threshold": MMAP_THRESHOLD_MAX, "trim_threshold": nbytes}
    return ok


def allocator_policy() -> Optional[dict]:
    """The thresholds set by :func:`reuse_freed_memory` in this process, or None (system default)."""
    return None if _applied is None else dict(_applied)


def cli_allocator_setup() -> bool:
    """What the CLI runs first: :func:`reuse_freed_memory` unless ``FEDMOMENTUM_MALLOC=system``
    (``FEDMOMENTUM_MALLOC_KEEP`` overrides the kept size, default 1GiB)."""
    mode = os.environ.get("FEDMOMENTUM_MALLOC", "reuse").strip().lower()
    if mode in ("system", "default", "off", "0"):
        return False
    if mode not in ("reuse", "1", "on", ""):
        raise ValueError(f"FEDMOMENTUM_MALLOC must be 'reuse' or 'system', got {mode!r}")
    return reuse_freed_memory(os.environ.get("FEDMOMENTUM_MALLOC_KEEP", "1GiB"))
