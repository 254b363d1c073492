"""Memory: sizes written by people ("2GB", "1.5GiB"), the peak-memory meter (:class:`PeakMemory`)
and budgets (:func:`plan_chunks`).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (reset per measurement); on CPU the
process's peak resident set (``VmHWM`` in ``/proc/self/status``, reset through
``/proc/self/clear_refs``), or a sampling thread where the reset is refused.
"""
from __future__ import annotations

import math
import re
import threading
from typing import Any, Callable, Optional, Sequence, Union

import torch

__all__ = ["parse_memory", "current_rss_bytes", "PeakMemory", "plan_chunks", "format_bytes"]


_UNITS = {"": 1, "b": 1, "k": 10 ** 3, "kb": 10 ** 3, "m": 10 ** 6, "mb": 10 ** 6, "g": 10 ** 9,
          "gb": 10 ** 9, "t": 10 ** 12, "tb": 10 ** 12, "kib": 2 ** 10, "mib": 2 ** 20,
          "gib": 2 ** 30, "tib": 2 ** 40}


def parse_memory(value: Union[str, int, float, None]) -> Optional[int]:
    """Bytes from ``"2GB"`` (10⁹), ``"2GiB"`` (2³⁰), ``"512MB"``, ``"1.5G"`` or a number of bytes;
    None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"max_memory must be a size like '2GB' or a number of bytes, got {value!r}")
    if isinstance(value, (int, float)):
        b = float(value)
    elif isinstance(value, str):
        mt = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if not mt or mt.group(2).lower() not in _UNITS:
            raise ValueError(f"cannot read memory size {value!r}; use e.g. '2GB', '1.5GiB', '512MB'")
        b = float(mt.group(1)) * _UNITS[mt.group(2).lower()]
    else:
        raise TypeError(f"max_memory must be a size like '2GB' or a number of bytes, got "
                        f"{type(value).__name__}")
    if not math.isfinite(b) or b <= 0:
        raise ValueError(f"max_memory must be positive, got {value!r}")
    return int(b)


def _proc_status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def current_rss_bytes() -> int:
    """Resident set size of this process in bytes (``/proc``; ``ru_maxrss`` where there is none)."""
    kib = _proc_status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import resource  # pragma: no cover - non-Linux
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return _proc_status_kib("VmHWM") is not None
    except OSError:
        return False


class PeakMemory:
    """Context manager measuring peak memory on ``device`` while its block runs.

    After the block: ``start_bytes`` (memory at entry), ``peak_bytes`` (absolute peak) and
    ``delta_bytes = peak_bytes − start_bytes`` (growth; what the block itself held at most).
    CPU: peak RSS through ``VmHWM`` (reset at entry), else a 1 ms sampling thread; CUDA:
    ``torch.cuda.max_memory_allocated`` (peak stats reset at entry).
    """

    def __init__(self, device: Union[str, torch.device] = "cpu"):
        self.device = torch.device(device)
        self.start_bytes = 0
        self.peak_bytes = 0
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._sampled = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
            return self
        self.start_bytes = current_rss_bytes()
        self._hwm = _reset_peak_rss()
        if not self._hwm:
            self._sampled = self.start_bytes
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._sampled = max(self._sampled, current_rss_bytes())

    def read(self) -> int:
        """The peak so far (absolute bytes)."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self._thread is not None:
            return max(self._sampled, current_rss_bytes())
        return max((_proc_status_kib("VmHWM") or 0) * 1024, current_rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.peak_bytes = self.read()
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    @property
    def delta_bytes(self) -> int:
        return max(0, self.peak_bytes - self.start_bytes)



def plan_chunks(items: Sequence[Any], need: Callable[[Any], int], budget: Optional[int], *,
                label: Callable[[Any], str] = str, max_items: Optional[int] = None) -> list[list[Any]]:
    """Split ``items`` (in order) into consecutive chunks whose summed ``need(item)`` stays within
    ``budget`` bytes (None = one chunk of at most ``max_items``). ValueError naming the item when
    one alone needs more than the budget."""
    chunks: list[list[Any]] = []
    cur: list[Any] = []
    used = 0
    for it in items:
        b = int(need(it))
        if budget is not None and b > budget:
            raise ValueError(f"module {label(it)} alone needs about {format_bytes(b)} to aggregate but "
                             f"the memory budget is {format_bytes(budget)}; raise max_memory to at least "
                             f"{format_bytes(b)}")
        full = (budget is not None and used + b > budget) or (max_items is not None and len(cur) >= max_items)
        if cur and full:
            chunks.append(cur)
            cur, used = [], 0
        cur.append(it)
        used += b
    if cur:
        chunks.append(cur)
    return chunks


def format_bytes(b: float, digits: int = 2) -> str:
    """``b`` bytes in binary units, e.g. ``1.50 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(b) < 1024 or unit == "TiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.{digits}f} {unit}"
        b /= 1024
    return f"{b:.{digits}f} TiB"  # pragma: no cover
