"""Per-example squared gradients of any parameter by torch.func: ``vmap`` over examples of ``grad``.

The model runs through ``functional_call`` on one example at a time (as a batch of one), so this
works for every module that torch.func can trace, at the cost of a vectorised forward and backward
over the batch.  Examples are processed in chunks so that the stacked per-example gradients stay
below ``CHUNK_ELEMENTS`` entries.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from .rules import add_square_sum

CHUNK_ELEMENTS = 2**24


def accumulate_per_example(
    model: nn.Module,
    fisher: dict[str, Tensor],
    args: tuple,
    kwargs: dict[str, Any],
    target: Tensor,
    loss_fn: Callable[[Any, Tensor, tuple[tuple, dict[str, Any]]], Tensor],
) -> None:
    """``fisher[name] += sum_b (d loss_fn(model(x_b), y_b, x_b) / d theta_name)^2`` for every name in
    fisher; ``x_b`` is example b's ``(args, kwargs)``, as a batch of one."""
    frozen = {name: p.detach() for name, p in model.named_parameters() if name not in fisher}
    frozen.update(model.named_buffers())
    chosen = {name: model.get_parameter(name).detach() for name in fisher}

    def example_loss(chosen: dict[str, Tensor], args: tuple, kwargs: dict[str, Any], target: Tensor) -> Tensor:
        batch_of_one = (tuple(a.unsqueeze(0) for a in args), {k: v.unsqueeze(0) for k, v in kwargs.items()})
        out = functional_call(model, {**frozen, **chosen}, *batch_of_one)
        return loss_fn(out, target.unsqueeze(0), batch_of_one)

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0, 0))
    chunk = max(1, CHUNK_ELEMENTS // max(1, sum(p.numel() for p in chosen.values())))
    for start in range(0, target.shape[0], chunk):
        piece = slice(start, start + chunk)
        grads = per_example(chosen, tuple(a[piece] for a in args), {k: v[piece] for k, v in kwargs.items()}, target[piece])
        for name, g in grads.items():
            add_square_sum(fisher[name], g)
