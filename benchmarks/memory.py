"""Peak memory of a benchmark case, on CUDA and on CPU.

``peak_bytes(device, setup)`` builds a case with ``setup()`` (which returns the step to measure)
and runs the step twice (the second call sees optimizer state and caches the first one created);
it returns the peak of the bytes live during all that, counting only what the case allocated
(objects built before, such as a shared model's weights, are not counted), and the step:

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was
  allocated before ``setup()`` ran (the caching allocator's own reserve is not counted).
* CPU: ``AllocationTracker``, a ``TorchDispatchMode`` that sees the output of every aten op run
  under it (factory ops included, so parameters created by ``setup()`` count).  Each output's
  storage is counted once, when first seen (views and in-place results share it); a
  ``weakref.finalize`` on every tensor holding it decrements a per-storage reference count, and the
  storage's bytes leave the live total when the last of them dies.  PyTorch keeps a tensor's Python
  object alive as long as its C++ tensor is referenced (autograd's saved tensors included), so a
  finalizer runs when the memory is actually released.  An output sharing the storage of an input
  created outside the mode (a view of a parameter, an optimizer's in-place update) allocates
  nothing and is not counted.  Tensors created outside the mode, and
  memory that libraries allocate internally (e.g. oneDNN workspaces), are not seen.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

Step = Callable[[], object]


def _storage_ptr(tensor: torch.Tensor) -> int:
    return 0 if tensor.device.type == "meta" else tensor.untyped_storage().data_ptr()


class AllocationTracker(TorchDispatchMode):
    """Live and peak bytes of the storages of every op output produced under the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, list[int]] = {}  # storage data_ptr -> [tensors alive, bytes]

    def _release(self, key: int) -> None:
        entry = self._refs[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._refs[key]

    def _track(self, tensor: torch.Tensor, inputs: set[int]) -> None:
        if tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0:
            return
        entry = self._refs.get(key)
        if entry is None:
            if key in inputs:  # a view or in-place result of a tensor created outside the mode
                return
            entry = self._refs[key] = [0, nbytes]
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        weakref.finalize(tensor, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage_ptr(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf, inputs)
        return out


def peak_bytes(device: torch.device, setup: Callable[[], Step]) -> tuple[int, Step]:
    """Peak bytes allocated while building a case with ``setup()`` and running its step twice;
    returns them and the step (warmed up, for timing)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step = setup()
        step()
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, step
    with AllocationTracker() as tracker:
        step = setup()
        step()
        step()
    return tracker.peak, step
