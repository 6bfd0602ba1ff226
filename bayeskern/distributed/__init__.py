"""Parallelism in one place: process groups (DDP), DTensor shards and FSDP2.

* ``ranks`` -- rank, world size, per-rank seeds and Philox streams, seeds shared across ranks, sums
  over ranks; all are no-ops in one process.
* ``sharding`` -- where a rank's shard of a DTensor lives in the global tensor, and moving tensors
  between plain and sharded layouts.
* ``fsdp`` -- ``fully_shard`` (the entry point), ``shard_model`` and the ``ShardsItself`` protocol a
  posterior implements to shard itself.

"Distributed" means the default process group is initialised (``torch.distributed.init_process_group``
or ``torchrun``); the helpers then act on it.  Collectives run on the default group's device: the
current CUDA device for NCCL, the CPU otherwise (gloo).

How each posterior uses them (the README's "Data-parallel training" section has the recipes):

* ``BayesSGLD``, ``DiagLaplace``: a seed left to default is drawn on rank 0 and broadcast
  (``shared_seed``), so every rank keys its Philox noise identically.
* ``DiagLaplace.fit``: per-rank sums over the shard, ``all_reduce_sum`` once at the end.
* ``VI`` / ``MCDropout``: training draws use ``rank_stream(s)``, distinct per rank.
* ``SampleBank(rank_zero_only=True)``: keeps samples on rank 0 only.

This package imports nothing from the posteriors; they import it.
"""

from . import fsdp, ranks, sharding
from .fsdp import ShardsItself, default_blocks, default_mesh, fully_shard, shard_model
from .ranks import (
    all_reduce_sum,
    collective_device,
    is_distributed,
    is_rank_zero,
    rank,
    rank_seed,
    rank_stream,
    seed_or_shared,
    shared_seed,
    world_size,
)
from .sharding import is_sharded, local_tensor

__all__ = [
    "ShardsItself",
    "all_reduce_sum",
    "collective_device",
    "default_blocks",
    "default_mesh",
    "fsdp",
    "fully_shard",
    "is_distributed",
    "is_rank_zero",
    "is_sharded",
    "local_tensor",
    "rank",
    "rank_seed",
    "rank_stream",
    "ranks",
    "seed_or_shared",
    "shard_model",
    "sharding",
    "shared_seed",
    "world_size",
]
