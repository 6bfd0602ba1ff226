"""Process-group helpers for data-parallel runs (DDP): rank, seeds, Philox streams, sums; no-ops in one process.

"Distributed" means the default process group is initialised (``torch.distributed.init_process_group``
or ``torchrun``); the helpers then act on it.  Collectives run on the default group's device: the
current CUDA device for NCCL, the CPU otherwise (gloo).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..ops import philox
from ..validation import check_count

RANK_STREAM_SHIFT = 32  # training draw s of rank r uses Philox stream s + (r << 32)


def is_distributed() -> bool:
    """True when the default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default group (0 in one process)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes in the default group (1 in one process)."""
    return dist.get_world_size() if is_distributed() else 1


def is_rank_zero() -> bool:
    """True on rank 0 and in one process: the rank that logs, writes files and keeps samples."""
    return rank() == 0


def rank_stream(stream: int) -> int:
    """The Philox stream of training draw ``stream`` on this rank: ``stream + (rank << 32)``.

    Rank 0 (and a single process) keeps ``stream`` unchanged; ranks never share a (seed, stream) pair
    while ``stream < 2**32``."""
    return stream + (rank() << RANK_STREAM_SHIFT)


def rank_seed(seed: int) -> int:
    """A per-rank seed for a stateful generator: ``(seed + rank * 0x9E3779B97F4A7C15) mod 2**63``
    (``seed`` itself on rank 0; the low 32 bits differ too, which mt19937 seeding keeps)."""
    return (seed + rank() * philox.WEYL_INCREMENT) % 2**63


def collective_device() -> torch.device:
    """Where the default group's collectives take their tensors (CUDA for NCCL, else CPU)."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shared_seed() -> int:
    """A Philox seed in ``[0, 2**62)`` drawn from torch's global generator on rank 0 and broadcast
    to every rank (a collective: every rank must call it)."""
    seed = torch.randint(0, 2**62, (), dtype=torch.int64)
    if is_distributed():
        seed = seed.to(collective_device())
        dist.broadcast(seed, src=0)
    return int(seed)


def seed_or_shared(seed: int | None) -> int:
    """``seed`` checked to be a Philox key (a whole number in ``[0, 2**63)``), or ``shared_seed()``
    when it is None (a collective then: every rank must call it)."""
    seed = shared_seed() if seed is None else check_count(seed, "seed", 0)
    philox.check_key(seed, 0)
    return seed


@torch.no_grad()
def all_reduce_sum(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Sum each tensor over the ranks, in place (a collective; the identity in one process).

    Tensors of one dtype are flattened into one buffer per dtype, so each dtype costs one all-reduce."""
    if not is_distributed() or world_size() == 1:
        return tensors
    device = collective_device()
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors.values():
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1).to(device) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for t, chunk in zip(group, flat.split([t.numel() for t in group])):
            t.copy_(chunk.view_as(t))
    return tensors


__all__ = [
    "all_reduce_sum",
    "collective_device",
    "is_distributed",
    "is_rank_zero",
    "rank",
    "rank_seed",
    "rank_stream",
    "seed_or_shared",
    "shared_seed",
    "world_size",
]
