"""How the methods train over the processes ``torchrun`` starts: one ``Parallel`` per run, whose mode
is ``"none"`` (one process), ``"ddp"`` (``DistributedDataParallel``) or ``"fsdp"`` (``--fsdp``:
FSDP2, ``bayeskern.distributed.fully_shard``).  The methods call it the same way in every mode and
never ask which one runs.

* ``wrap`` gives the module a training step calls: under DDP wrapped, so that gradients are
  averaged over the ranks; otherwise the module itself.
* ``shard`` / ``sharded_backbone``: under FSDP the posterior, or the backbone's model, is sharded in
  place per block; elsewhere nothing happens.
* ``unsharded`` turns what was trained sharded (the model, a posterior, the sample bank, the
  Laplace state) into an unsharded copy with the gathered state, which rank 0 evaluates as in the
  other modes.  Gathering is a collective: every rank calls it.
* ``checkpointed``: under FSDP nothing is checkpointed per epoch (``--fsdp`` excludes ``--resume``).

Invariant: in modes ``"none"`` and ``"ddp"`` the methods train exactly the objects they built; only
``"fsdp"`` swaps them for gathered copies after training.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, Subset

from bayeskern.distributed import fully_shard, is_distributed, is_sharded, world_size

from .errors import UsageError
from .shared import Backbone

MODES = ("none", "ddp", "fsdp")


class _Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


S = TypeVar("S", bound=_Stateful)


def gathered(state: Any) -> Any:
    """``state`` (a state_dict, nested dicts and lists allowed) with every DTensor gathered into a
    full tensor: a collective, every rank must call it."""
    if isinstance(state, dict):
        return {k: gathered(v) for k, v in state.items()}
    if isinstance(state, list):
        return [gathered(v) for v in state]
    return state.full_tensor() if isinstance(state, torch.Tensor) and is_sharded(state) else state


@dataclass(frozen=True)
class Parallel:
    mode: Literal["none", "ddp", "fsdp"] = "none"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"Invalid parallel mode: {self.mode!r} (known: {', '.join(MODES)})")

    @classmethod
    def of(cls, fsdp: bool) -> Parallel:
        """The mode of this process: FSDP for ``--fsdp`` (UsageError without a process group), DDP
        under an initialised process group, else one process."""
        if fsdp:
            if not is_distributed():
                raise UsageError("--fsdp needs torchrun (an initialised process group)")
            return cls("fsdp")
        return cls("ddp" if is_distributed() else "none")

    @classmethod
    @contextmanager
    def launched(cls, device: torch.device, fsdp: bool) -> Iterator[Parallel]:
        """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1; NCCL on CUDA with the
        GPU ``LOCAL_RANK``, gloo on CPU) unless one is initialised, and yield ``Parallel.of(fsdp)``.
        A block that returns waits for every rank (a barrier: no rank tears the group down while a
        peer is still in a collective); the group this call joined is destroyed on the way out."""
        joined = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
        if joined:
            if device.type == "cuda":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        try:
            yield cls.of(fsdp)
            if joined:
                dist.barrier()
        finally:
            if joined:
                dist.destroy_process_group()

    @property
    def sharded(self) -> bool:
        """FSDP: parameters are sharded over the ranks while a method trains."""
        return self.mode == "fsdp"

    @property
    def world_size(self) -> int:
        """The number of ranks sharing the training set (1 in one process)."""
        return world_size()

    def wrap(self, module: nn.Module) -> nn.Module:
        """The module a training step calls: ``module`` inside ``DistributedDataParallel`` under DDP
        (gradients averaged over the ranks), ``module`` itself otherwise."""
        return DistributedDataParallel(module) if self.mode == "ddp" else module

    def shard(self, module: nn.Module) -> nn.Module:
        """FSDP: ``module`` sharded in place per block (``bayeskern.distributed.fully_shard``, a
        collective); otherwise untouched.  Returns ``module``."""
        return fully_shard(module) if self.sharded else module

    @contextmanager
    def sharded_backbone(self, backbone: Backbone) -> Iterator[None]:
        """FSDP: ``backbone.model`` sharded in place for the block; on a normal exit its trained state
        is gathered into an unsharded copy taken first, which becomes ``backbone.model`` (buffers such
        as BatchNorm statistics are rank-local under FSDP2: each rank keeps its own).  Otherwise the
        block trains ``backbone.model`` as it is."""
        trained = backbone.model
        with self.restoring(backbone):
            self.shard(trained)
            yield
        backbone.model = self.unsharded(trained, lambda: backbone.model)

    @contextmanager
    def restoring(self, backbone: Backbone) -> Iterator[None]:
        """FSDP: an unsharded copy of ``backbone.model``, taken on entry, is the model again after a
        normal exit (whatever the block sharded in place).  Otherwise nothing."""
        if not self.sharded:
            yield
            return
        unsharded = copy.deepcopy(backbone.model)
        yield
        backbone.model = unsharded

    def unsharded(self, trained: S, rebuild: Callable[[], S]) -> S:
        """``trained`` itself unless sharded; under FSDP ``rebuild()`` (built on the unsharded model)
        loaded with ``trained``'s gathered state (a collective)."""
        if not self.sharded:
            return trained
        state = gathered(trained.state_dict())
        fresh = rebuild()
        fresh.load_state_dict(state)
        return fresh

    def checkpointed(self, state: dict[str, Any]) -> dict[str, Any]:
        """What the epoch loop checkpoints: ``state``, or nothing under FSDP (no ``--resume``)."""
        return {} if self.sharded else state

    def equal_shares(self, dataset: Dataset) -> Dataset:
        """FSDP: the first ``floor(N / K) K`` examples, so that every rank sees as many batches (FSDP2
        gathers per batch; up to K - 1 examples are left out).  Otherwise ``dataset``."""
        if not self.sharded:
            return dataset
        n = len(dataset)  # type: ignore[arg-type]
        return Subset(dataset, range(n - n % self.world_size))
