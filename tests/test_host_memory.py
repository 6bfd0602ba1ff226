"""bayeskern.ops.retain_freed_memory: glibc keeps freed memory in the process (free bytes in its
arena, page faults)."""

import subprocess
import sys

import pytest

from bayeskern.ops import host_memory, retain_freed_memory

pytestmark = pytest.mark.slow  # starts a Python process

glibc = pytest.mark.skipif(host_memory._glibc() is None, reason="the C library is not glibc")

# Eight 8 MB tensors allocated and freed per step, like a Bayesian step's weight gradients.  After
# each step: the free bytes of glibc's arena (mallinfo2) and the pages the step faulted in.
_STEPS = """
import ctypes, resource, torch
from bayeskern.ops import retain_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
assert retain_freed_memory()
free_bytes, faults = [0] * 6, [0] * 6  # allocated up front: nothing new lands on the heap between steps
for step in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(2_000_000) for _ in range(8)]
    faults[step] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del blocks
    free_bytes[step] = libc.mallinfo2().fordblks
print(*free_bytes)
print(*faults)
"""
_BYTES = 8 * 2_000_000 * 4


@glibc
def test_freed_memory_stays_in_the_process():
    """The freed 64 MB stay in glibc's arena after every step and later steps fault in almost nothing
    (with glibc's defaults the memory went back to the kernel in most runs here, depending on where
    the blocks fell: ``faults`` then read 15,600 pages a step)."""
    run = subprocess.run([sys.executable, "-c", _STEPS], capture_output=True, text=True, check=True)
    free_bytes, faults = ([int(n) for n in line.split()] for line in run.stdout.splitlines())
    assert all(b >= _BYTES * 9 // 10 for b in free_bytes), free_bytes
    assert sum(faults[3:]) < _BYTES // 4096 // 10, faults


@pytest.mark.parametrize("value", [-1, 1.5, True, "1024", 4096])
def test_bad_threshold_raises_naming_it(value):
    with pytest.raises(ValueError, match="trim_threshold_mb"):
        retain_freed_memory(value)
