"""Per-example squared gradients of any parameter by torch.func: ``vmap`` over examples of ``grad``.

The model runs through ``functional_call`` on one example at a time (as a batch of one), so this
works for every module that torch.func can trace, at the cost of a vectorised forward and backward
over the batch.  Examples are processed in chunks so that the stacked per-example gradients stay
below ``CHUNK_ELEMENTS`` entries.

The inputs are any ``(args, kwargs)`` tree (``transformers`` models take Mappings of keyword
inputs): its tensors whose first dimension is the batch are split into examples, every other
leaf (``use_cache=False``, None, a ``(1, T)`` ``position_ids``, a tensor without a batch axis)
reaches every example's call unchanged.  Models whose forward has data-dependent control flow
(``transformers``' attention-mask construction checks ``mask.all()``) cannot run under ``vmap``;
for them ``PerExample`` switches, once, to a loop of ``grad`` over the examples (exact as well, B
forward and backward passes of one example each).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from .rules import add_square_sum

CHUNK_ELEMENTS = 2**24

LossFn = Callable[[Any, Tensor, tuple[tuple, dict[str, Any]]], Tensor]


def _is_batched(leaf: Any, batch: int) -> bool:
    return isinstance(leaf, Tensor) and leaf.dim() > 0 and leaf.shape[0] == batch


class PerExample:
    """The torch.func accumulation, remembering whether the model runs under ``vmap``."""

    def __init__(self) -> None:
        self.vectorised = True

    def __call__(
        self,
        model: nn.Module,
        fisher: dict[str, Tensor],
        args: tuple,
        kwargs: dict[str, Any],
        target: Tensor,
        loss_fn: LossFn,
    ) -> None:
        """``fisher[name] += sum_b (d loss_fn(model(x_b), y_b, x_b) / d theta_name)^2`` for every name
        in fisher; ``x_b`` is example b's ``(args, kwargs)``, as a batch of one."""
        batch = target.shape[0]
        frozen = {name: p.detach() for name, p in model.named_parameters() if name not in fisher}
        frozen.update(model.named_buffers())
        chosen = {name: model.get_parameter(name).detach() for name in fisher}
        leaves, spec = tree_flatten((args, kwargs))
        batched = [i for i, leaf in enumerate(leaves) if _is_batched(leaf, batch)]

        def example_loss(chosen: dict[str, Tensor], examples: list[Tensor], target: Tensor) -> Tensor:
            """The loss of one example; ``examples`` are its batched leaves, each as a batch of one."""
            call = list(leaves)
            for i, leaf in zip(batched, examples):
                call[i] = leaf
            batch_of_one = tree_unflatten(call, spec)
            out = functional_call(model, {**frozen, **chosen}, batch_of_one[0], batch_of_one[1])
            return loss_fn(out, target, batch_of_one)

        inputs = [leaves[i] for i in batched]
        if self.vectorised:
            try:
                self._vectorised(example_loss, chosen, fisher, inputs, target)
                return
            except (RuntimeError, NotImplementedError):  # data-dependent control flow, no batching rule
                self.vectorised = False  # nothing was added yet: the chunks only add once all succeed
        gradient = grad(example_loss)
        for b in range(batch):
            grads = gradient(chosen, [t[b : b + 1] for t in inputs], target[b : b + 1])
            for name, g in grads.items():
                add_square_sum(fisher[name], g.unsqueeze(0))

    @staticmethod
    def _vectorised(
        example_loss: Callable,
        chosen: dict[str, Tensor],
        fisher: dict[str, Tensor],
        inputs: list[Tensor],
        target: Tensor,
    ) -> None:
        def one(chosen: dict[str, Tensor], examples: list[Tensor], target: Tensor) -> dict[str, Tensor]:
            grads: dict[str, Tensor] = grad(example_loss)(
                chosen, [t.unsqueeze(0) for t in examples], target.unsqueeze(0)
            )
            return grads

        per_example = vmap(one, in_dims=(None, 0, 0))
        chunk = max(1, CHUNK_ELEMENTS // max(1, sum(p.numel() for p in chosen.values())))
        squares = {name: torch.zeros_like(f) for name, f in fisher.items()}
        for start in range(0, target.shape[0], chunk):
            piece = slice(start, start + chunk)
            grads = per_example(chosen, [t[piece] for t in inputs], target[piece])
            for name, g in grads.items():
                add_square_sum(squares[name], g)
        for name, f in fisher.items():
            f.add_(squares[name])


def accumulate_per_example(
    model: nn.Module,
    fisher: dict[str, Tensor],
    args: tuple,
    kwargs: dict[str, Any],
    target: Tensor,
    loss_fn: LossFn,
) -> None:
    """``fisher[name] += sum_b (d loss_fn(model(x_b), y_b, x_b) / d theta_name)^2`` for every name in
    fisher; ``x_b`` is example b's ``(args, kwargs)``, as a batch of one (``PerExample``)."""
    PerExample()(model, fisher, args, kwargs, target, loss_fn)
