"""How much host memory is free: what the engine build (``build.py``) and the server's KV-slot sizing
(``serve/batching.py``) check before allocating.

Supported: Linux (Jetson included), through ``MemAvailable`` in ``/proc/meminfo``; elsewhere the answer is
``None`` (unknown), and callers then do not refuse on memory. Device memory is the backends' to report
(``backends/cuda.py``: ``CudaRuntime.mem_info``). Standard library only.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["available_bytes"]

MEMINFO = Path("/proc/meminfo")


def available_bytes() -> int | None:
    """MemAvailable in bytes, or None where the system does not report it."""
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
