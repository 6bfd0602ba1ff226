"""Small helpers for data-parallel runs with ``torch.distributed`` (DDP); all are no-ops in one process.

"Distributed" means the default process group is initialised (``torch.distributed.init_process_group``
or ``torchrun``); the helpers then act on it.  Collectives run on the default group's device: the
current CUDA device for NCCL, the CPU otherwise (gloo).

How each posterior uses them (the README's "Data-parallel training" section has the recipes):

* ``BayesSGLD``, ``DiagLaplace``: a seed left to default is drawn on rank 0 and broadcast
  (``shared_seed``), so every rank keys its Philox noise identically.
* ``DiagLaplace.fit``: per-rank sums over the shard, ``all_reduce_sum`` once at the end.
* ``VI`` / ``MCDropout``: training draws use ``rank_stream(s)``, distinct per rank.
* ``SampleBank(rank_zero_only=True)``: keeps samples on rank 0 only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .ops import philox
from .validation import check_count

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


def fully_shard(
    module: nn.Module, *, mesh: Any = None, blocks: Iterable[nn.Module] | None = None, **fsdp_options: Any
) -> Any:
    """Shard ``module`` with FSDP2 (``torch.distributed.fsdp.fully_shard``) per block; returns ``module``.

    A ``VI`` or ``MCDropout`` posterior: its model is sharded per block (``blocks``, default
    ``sharding.default_blocks``: the entries of every ``nn.ModuleList``, else the children holding
    parameters; then the root), and every variational parameter, point estimate and prior tensor is
    laid out like the model parameter it stands for, so a rank holds ~1/world of them and of the
    optimizer state.  Create the posterior on the unsharded model, shard it here, then build the
    optimizer; ``docs/guide/distributed.md`` has the design.  Any other module (the model of
    ``BayesSGLD`` or ``DiagLaplace``) is sharded the same way.  ``mesh`` defaults to a 1-D mesh over
    the default group; ``fsdp_options`` go to every ``fully_shard`` call (``reshard_after_forward``,
    ``mp_policy``, ...).  A collective: every rank must call it."""
    from .posteriors.weight_posterior import WeightPosterior
    from .sharding import shard_model

    if isinstance(module, WeightPosterior):
        module._shard(mesh=mesh, blocks=blocks, **fsdp_options)
    else:
        shard_model(module, mesh=mesh, blocks=blocks, **fsdp_options)
    return module


__all__ = [
    "all_reduce_sum",
    "collective_device",
    "fully_shard",
    "is_distributed",
    "is_rank_zero",
    "rank",
    "rank_seed",
    "rank_stream",
    "seed_or_shared",
    "shared_seed",
    "world_size",
]
