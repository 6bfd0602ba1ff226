"""Where the hooks add their squared per-example gradients: the accumulators, plain or sharded.

Plain parameters: a hook adds into the parameter's accumulator directly.

A parameter of a ``fully_shard``-ed model (FSDP2: a DTensor, ``Shard(0)`` on a 1-D mesh) has an
accumulator of its local shard's shape.  During the forward and backward pass of its block, FSDP2
has gathered the whole parameter, and the hook (``rules``) forms the whole contribution of this
rank's examples, ``sum_b g_b^2`` over the full parameter, in a buffer of the full shape (padded to
``world * ceil(rows / world)`` rows); a ``reduce_scatter`` over the mesh then sums the ranks'
buffers and hands each rank the rows of its own shard, which it adds to its accumulator.  So each
rank ends with its shard of F over the union of the ranks' data, and no rank ever holds more than
one parameter's full buffer (as FSDP2 does with gradients).  A reduce-scatter moves (world - 1) /
world of a buffer per rank; an all-reduce (then slicing) would move twice that and give every rank
the sum it would throw away.  The collective runs inside the backward hooks, which fire in the
same order on every rank (same model, same number of batches: as FSDP2 itself requires).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor

from ..distributed.sharding import common_mesh, is_sharded, local_range
from .rules import Slots


class Sums:
    """The accumulators ``fisher`` (name -> tensor of the local shard's shape) of ``params``."""

    def __init__(self, fisher: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> None:
        self.fisher = fisher
        sharded = {name: params[name] for name in fisher if is_sharded(params[name])}
        self.mesh = common_mesh(sharded.values(), "parameters of the Fisher")
        self.rows: dict[str, tuple[int, int]] = {}  # name -> (rows per rank, elements per row)
        self.shapes = {name: p.shape for name, p in sharded.items()}
        if self.mesh is None:
            return
        world, rank = self.mesh.size(), self.mesh.get_local_rank()
        for name, p in sharded.items():
            if p.dim() == 0:
                raise ValueError(f"parameter {name!r}: a sharded 0-d tensor is not supported")
            chunk, row = -(-p.shape[0] // world), math.prod(p.shape[1:])
            if local_range(p)[0] != min(rank * chunk, p.shape[0]) * row:
                raise ValueError(f"parameter {name!r} is not laid out as FSDP2's Shard(0)")
            self.rows[name] = (chunk, row)

    def __contains__(self, name: object) -> bool:
        return name in self.fisher

    def add(self, names: Mapping[str, str | None], accumulate: Callable[[Slots], None]) -> None:
        """Run ``accumulate`` on the slots of ``names`` (role -> parameter name, or None for none):
        each slot is the accumulator, or for a sharded parameter a zero buffer of the full shape whose
        sum over the ranks is then added to the local shard."""
        padded = {name: self._buffer(name) for name in names.values() if name in self.rows}
        slots = {
            role: None if name is None else self.fisher[name] if name not in padded else self._full(name, padded[name])
            for role, name in names.items()
        }
        accumulate(slots)
        for name, buffer in padded.items():
            self._reduce_scatter(name, buffer)

    def _buffer(self, name: str) -> Tensor:
        chunk, row = self.rows[name]
        local = self.fisher[name]
        return torch.zeros(chunk * row * self.mesh.size(), dtype=local.dtype, device=local.device)

    def _full(self, name: str, buffer: Tensor) -> Tensor:
        shape = self.shapes[name]
        return buffer[: math.prod(shape)].view(shape)

    def _reduce_scatter(self, name: str, buffer: Tensor) -> None:
        chunk, row = self.rows[name]
        mine = torch.empty(chunk * row, dtype=buffer.dtype, device=buffer.device)
        dist.reduce_scatter_single(mine, buffer, group=self.mesh.get_group())
        local = self.fisher[name]
        local.view(-1).add_(mine[: local.numel()])
