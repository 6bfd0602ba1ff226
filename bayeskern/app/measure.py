"""Wall time and peak memory of one method's run.

CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated at the start.  CPU: the
process's resident set size (``/proc/self/statm``), sampled every 20 ms by a background thread,
above its value at the start -- what the method added to the process.  Memory the allocator keeps
from an earlier method is reused without growing the RSS, so on CPU the first method of a run also
carries one-off costs (library workspaces, allocator arenas) and later ones read low.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


@dataclass
class Usage:
    seconds: float = 0.0
    peak_bytes: int | None = None


@contextmanager
def measure(device: torch.device) -> Iterator[Usage]:
    """Time the block and record its peak memory on ``device`` into the yielded ``Usage``."""
    usage = Usage()
    stop = threading.Event()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start_bytes = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        start_bytes = _rss_bytes()
        peak = [start_bytes or 0]

        def sample() -> None:
            while not stop.wait(0.02):
                peak[0] = max(peak[0], _rss_bytes() or 0)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    start = time.perf_counter()
    try:
        yield usage
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            usage.peak_bytes = torch.cuda.max_memory_allocated(device) - start_bytes
        else:
            stop.set()
            sampler.join()
            if start_bytes is not None:
                usage.peak_bytes = max(peak[0], _rss_bytes() or 0) - start_bytes
        usage.seconds = time.perf_counter() - start
