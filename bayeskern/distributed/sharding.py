"""Where a rank's shard of a tensor lives in the global tensor (FSDP2 / DTensor parameters), and moving
tensors between plain and sharded layouts.

bayeskern's Philox noise is keyed by the *global* flattened index of an element
(``ops.philox``): element ``j`` of a tensor whose counters start at ``offset`` reads counter
position ``offset + j``.  A rank that holds only a shard of a DTensor draws its noise with
``offset + element_offset(t)`` over ``local_tensor(t)``, so every element gets the same counter
wherever it lives and a sharded run draws exactly the samples of a single process.  This only
works when the local shard is one contiguous range of the flattened global tensor, which holds
for FSDP2's ``Shard(0)`` on a 1-D mesh (uneven chunks included: ``torch.chunk`` semantics, chunk
size ``ceil(rows / world)``, so the last ranks may hold fewer or zero rows) and for
``Replicate()``; ``element_offset`` raises for layouts where it does not hold.

These helpers accept plain tensors too (the local shard is the tensor, offset 0), so the same code
serves sharded and unsharded runs.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..batches import as_call

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


def is_sharded(t: Tensor) -> bool:
    """True when ``t`` is a DTensor (a parameter of a ``fully_shard``-ed module, for instance)."""
    # no DTensor exists before torch.distributed.tensor is imported: ``import bayeskern`` stays light
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a DTensor (differentiable, ``DTensor.to_local``); ``t`` itself otherwise."""
    return cast("DTensor", t).to_local() if is_sharded(t) else t


def local_range(t: Tensor) -> tuple[int, int]:
    """``(start, numel)``: this rank's local shard is elements ``[start, start + numel)`` of the
    flattened (row-major) global tensor.  ``(0, t.numel())`` for a plain tensor.

    Raises ValueError when the local shard is not one contiguous range of the flattened global
    tensor (``Shard(1)`` of a matrix, for instance) or is not a slice of it at all (``Partial``)."""
    if not is_sharded(t):
        return 0, t.numel()
    from torch.distributed.tensor import DTensor, Partial
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    assert isinstance(t, DTensor)

    if any(isinstance(p, Partial) for p in t.placements):
        raise ValueError(f"a DTensor with Partial placements {t.placements} has no local slice of the global tensor")
    shape = tuple(t.shape)
    local_shape, offset = compute_local_shape_and_global_offset(shape, t.device_mesh, t.placements)
    numel = math.prod(local_shape)
    if numel == 0:
        return min(_flat_index(offset, shape), math.prod(shape)), 0
    # a box [offset, offset + local_shape) is contiguous in row-major order iff, for its first
    # partial dimension k, every later dimension is full and every earlier one has extent 1
    partial = [d for d, (n, m) in enumerate(zip(local_shape, shape)) if n != m]
    if partial:
        k = partial[0]
        if any(local_shape[d] != shape[d] for d in range(k + 1, len(shape))) or any(
            local_shape[d] != 1 for d in range(k)
        ):
            raise ValueError(
                f"the local shard {tuple(local_shape)} at {tuple(offset)} of a DTensor of shape {shape} with "
                f"placements {t.placements} is not a contiguous range of the flattened tensor; bayeskern's "
                "sharding-independent noise needs Shard(0) or Replicate() (FSDP2's default)"
            )
    return _flat_index(offset, shape), numel


def element_offset(t: Tensor) -> int:
    """Flattened index, in the global tensor, of the first element of this rank's local shard.

    0 for a plain tensor or a replicated DTensor; ``min(rank * ceil(rows / world), rows) *
    row_numel`` for FSDP2's ``Shard(0)`` on a 1-D mesh (a rank with zero rows gets the tensor's
    numel).  Raises ValueError when the local shard is not a contiguous range (``local_range``)."""
    return local_range(t)[0]


def common_mesh(tensors: Iterable[Tensor], what: str = "parameters") -> Any:
    """The one device mesh of the DTensors among ``tensors`` (None if there are none).

    Raises ValueError when they live on different meshes (bayeskern keys noise and reduces terms
    over one mesh) or on a mesh that is not 1-D."""
    meshes: list[Any] = []
    for t in tensors:
        mesh = cast("DTensor", t).device_mesh if is_sharded(t) else None
        if mesh is not None and not any(mesh is m or mesh == m for m in meshes):
            meshes.append(mesh)
    if len(meshes) > 1:
        raise ValueError(f"the {what} live on {len(meshes)} different device meshes ({meshes}); shard them on one mesh")
    if meshes and meshes[0].ndim != 1:
        raise ValueError(f"the {what} live on a {meshes[0].ndim}-D device mesh; bayeskern shards on a 1-D mesh")
    return meshes[0] if meshes else None


def first_on_every_rank(index: int | None, count: int, mesh: Any) -> int | None:
    """The smallest of the ranks' ``index`` values (None counts as ``count``: nothing found), so that
    every rank of ``mesh`` acts on the same answer (one all-reduce); ``index`` itself when ``mesh`` is
    None.  For instance the first tensor holding a non-finite gradient over every rank's shards."""
    if mesh is None:
        return index
    value = torch.tensor(count if index is None else index, device=mesh.device_type)
    dist.all_reduce(value, op=dist.ReduceOp.MIN, group=mesh.get_group())
    return None if int(value) == count else int(value)


class _GlobalSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, local: Tensor, group: Any) -> Tensor:
        total = local.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def global_sum(local: Tensor, mesh: Any) -> Tensor:
    """The sum over ``mesh``'s ranks of the per-rank term ``local`` (a collective), whose gradient
    on each rank is the gradient of its own term: right for a sum of per-element terms over a
    sharded tensor (a KL), where each rank differentiates the elements it holds.  ``local`` itself
    when ``mesh`` is None."""
    if mesh is None:
        return local
    out: Tensor = _GlobalSum.apply(local, mesh.get_group())
    return out


def _flat_index(index: tuple[int, ...] | list[int], shape: tuple[int, ...]) -> int:
    """Row-major flat position of a multi-index (indices may equal the dimension's size)."""
    flat = 0
    for i, n in zip(index, shape):
        flat = flat * n + i
    return flat


def shard_like(full: Tensor, like: Tensor) -> Tensor:
    """``full`` (a plain tensor of ``like``'s global shape) laid out like the DTensor ``like``: a DTensor
    whose local shard is a view of this rank's slice of ``full`` (no communication); ``full`` itself
    when ``like`` is a plain tensor."""
    if not is_sharded(like):
        return full
    if tuple(full.shape) != tuple(like.shape):
        raise ValueError(f"full has shape {tuple(full.shape)} but the DTensor has shape {tuple(like.shape)}")
    start, numel = local_range(like)
    return from_local_like(full.reshape(-1)[start : start + numel].view(local_tensor(like).shape), like)


def shard_copy(full: Tensor, like: Tensor) -> Tensor:
    """Like ``shard_like``, but the local shard is a copy on ``like``'s device (the full tensor can then
    be freed; a posterior created on the CPU follows a model FSDP2 moved to the GPU); ``full``
    detached and copied when ``like`` is a plain tensor."""
    if not is_sharded(like):
        return full.detach().clone()
    local = local_tensor(shard_like(full.detach(), like))
    return from_local_like(local.to(local_tensor(like).device, copy=True), like)


def from_local_like(local: Tensor, like: Tensor) -> Tensor:
    """This rank's shard ``local`` as a DTensor laid out like the DTensor ``like`` (same mesh,
    placements, global shape and stride; no communication); ``local`` itself when ``like`` is plain."""
    if not is_sharded(like):
        return local
    from torch.distributed.tensor import DTensor

    assert isinstance(like, DTensor)
    return DTensor.from_local(
        local, like.device_mesh, like.placements, shape=like.shape, stride=like.stride(), run_check=False
    )


@torch.no_grad()
def forward_with(model: nn.Module, weights: dict[str, Tensor], inputs: Any) -> Any:
    """``model``'s output on ``inputs`` (``bayeskern.batches``) with its parameters named in ``weights``
    replaced by them (DTensors laid out like the parameters), restored afterwards: the per-sample
    forward of a posterior whose mean is the sharded model's own weights (``SampleBank``,
    ``DiagLaplace``).  Each rank writes its local shards; FSDP2 gathers them in the forward, so every
    rank must call it.  The model's blocks are resharded before and after, so no gathered copy of
    other weights outlives the call."""
    from torch.distributed.fsdp import FSDPModule

    def reshard() -> None:
        for module in model.modules():  # an eval forward without backward leaves the root gathered
            if isinstance(module, FSDPModule):
                module.reshard()

    params = dict(model.named_parameters())
    saved = {n: local_tensor(params[n]).clone() for n in weights}
    args, kwargs = as_call(inputs)
    reshard()
    try:
        for n, w in weights.items():
            local_tensor(params[n]).copy_(local_tensor(w))
        return model(*args, **kwargs)
    finally:
        reshard()
        for n, w in saved.items():
            local_tensor(params[n]).copy_(w)


__all__ = [
    "common_mesh",
    "element_offset",
    "forward_with",
    "from_local_like",
    "global_sum",
    "is_sharded",
    "local_range",
    "local_tensor",
    "shard_copy",
    "shard_like",
]
