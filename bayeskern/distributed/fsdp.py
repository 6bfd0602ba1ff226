"""FSDP2 for bayeskern: ``fully_shard`` (the entry point), the blocks and mesh it uses, and the one
method an object that shards itself implements (``ShardsItself``).

A posterior that holds trainable copies of the model's tensors (``VI``, ``MCDropout``) must lay them
out like the sharded model's parameters: it implements ``shard``, which ``fully_shard`` calls.
Posteriors that read the model's own parameters (``BayesSGLD``, ``DiagLaplace``, ``SampleBank``)
need nothing: the model is sharded and they see DTensors.  So this module imports no posterior.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

import torch.distributed as dist
from torch import nn

from .sharding import is_sharded


@runtime_checkable
class ShardsItself(Protocol):
    """An object that ``fully_shard`` asks to shard itself instead of sharding it as a module."""

    def shard(self, *, mesh: Any = None, blocks: Iterable[nn.Module] | None = None, **fsdp_options: Any) -> None:
        """Shard the held model with ``shard_model(model, mesh=..., blocks=..., **fsdp_options)`` and
        lay out every tensor held in the model's place like the parameter it stands for."""


def default_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules ``shard_model`` wraps one by one when none are named: the entries of every
    ``nn.ModuleList`` (a transformer's layers), or, where the model has none, its children that hold
    parameters (the layers of an MLP).  The root is wrapped last and takes what is left."""
    entries = [m for lst in model.modules() if isinstance(lst, nn.ModuleList) for m in lst]
    if entries:
        return entries
    return [child for child in model.children() if any(True for _ in child.parameters())]


def default_mesh() -> Any:
    """A 1-D device mesh over the default process group (CUDA under NCCL, else CPU)."""
    from torch.distributed.device_mesh import init_device_mesh

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("sharding needs an initialised default process group (torchrun or init_process_group)")
    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device_type, (dist.get_world_size(),))


def shard_model(
    model: nn.Module, *, mesh: Any = None, blocks: Iterable[nn.Module] | None = None, **fsdp_options: Any
) -> Any:
    """Apply FSDP2 (``torch.distributed.fsdp.fully_shard``) to each of ``blocks`` (default
    ``default_blocks(model)``), then to ``model``, all on ``mesh`` (default ``default_mesh()``), with
    ``fsdp_options`` (``reshard_after_forward``, ``mp_policy``, ...); returns the mesh.

    Raises ValueError when part of ``model`` is sharded already (shard once, through one call), when
    a block is not a submodule of ``model``, or when the mesh is not 1-D."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if any(isinstance(m, FSDPModule) for m in model.modules()) or any(is_sharded(p) for p in model.parameters()):
        raise ValueError("model: part of it is sharded already; shard the unsharded model once, through one call")
    mesh = default_mesh() if mesh is None else mesh
    if mesh.ndim != 1:
        raise ValueError(f"mesh must be 1-D (one FSDP2 shard group), got a {mesh.ndim}-D mesh")
    blocks = default_blocks(model) if blocks is None else list(blocks)
    inside = {id(m) for m in model.modules()}
    for block in blocks:
        if id(block) not in inside or block is model:
            raise ValueError(f"blocks must be submodules of the model, got {type(block).__name__}")
    for block in blocks:
        fully_shard(block, mesh=mesh, **fsdp_options)
    fully_shard(model, mesh=mesh, **fsdp_options)
    return mesh


def fully_shard(
    module: nn.Module, *, mesh: Any = None, blocks: Iterable[nn.Module] | None = None, **fsdp_options: Any
) -> Any:
    """Shard ``module`` with FSDP2 (``torch.distributed.fsdp.fully_shard``) per block; returns ``module``.

    A ``VI`` or ``MCDropout`` posterior (any ``ShardsItself``): its ``shard`` shards its model per block
    (``blocks``, default ``default_blocks``: the entries of every ``nn.ModuleList``, else the children
    holding parameters; then the root), and lays out every variational parameter, point estimate and
    prior tensor like the model parameter it stands for, so a rank holds ~1/world of them and of the
    optimizer state.  Create the posterior on the unsharded model, shard it here, then build the
    optimizer; ``docs/guide/distributed.md`` has the design.  Any other module (the model of
    ``BayesSGLD`` or ``DiagLaplace``) is sharded with ``shard_model``.  ``mesh`` defaults to a 1-D mesh
    over the default group; ``fsdp_options`` go to every ``fully_shard`` call (``reshard_after_forward``,
    ``mp_policy``, ...).  A collective: every rank must call it."""
    if isinstance(module, ShardsItself):
        module.shard(mesh=mesh, blocks=blocks, **fsdp_options)
    else:
        shard_model(module, mesh=mesh, blocks=blocks, **fsdp_options)
    return module


__all__ = ["ShardsItself", "default_blocks", "default_mesh", "fully_shard", "shard_model"]
