"""Batches and model outputs as the ecosystem makes them.

Inputs (what the model is called with):

* a Tensor ``x`` -- ``model(x)``;
* a tuple (or list) of positional arguments -- ``model(*inputs)``;
* a Mapping of keyword arguments -- ``model(**inputs)`` (``transformers`` models: ``input_ids``,
  ``attention_mask``, ``pixel_values``, ...).

A loader's batch is ``(inputs, targets, ...)`` (``TensorDataset``, torchvision), a Mapping that
holds the targets under ``"labels"`` (what ``transformers`` collators produce; the other keys are
the inputs), or the inputs alone where no target is needed.  Where one argument takes either one
batch of inputs or several loader batches (``bayeskern.predict``'s ``inputs``), a tuple is one
call's positional inputs and several batches come as a list or a loader.

Outputs: a Tensor is the logits (or, for regression, the predicted mean); of a tuple or list, the
first element; of an object or Mapping with ``logits`` (``transformers``' ``ModelOutput``), that
field.  ``output_fn(output, inputs) -> Tensor`` maps anything else, e.g. a causal LM's logits at the
last non-padding position restricted to the answer tokens (docs/design.md, "Batches and outputs").
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves, tree_map

LABELS = "labels"
Inputs = Tensor | tuple | list | Mapping[str, Any]
OutputFn = Callable[[Any, Any], Tensor]


def split_batch(batch: Any, *, need_targets: bool = True) -> tuple[Inputs, Tensor | None]:
    """``(inputs, targets)`` of one loader batch (module docstring).

    Raises ValueError naming the problem when targets are needed and the batch holds none (a
    Mapping without ``"labels"``, a bare tensor)."""
    if isinstance(batch, Mapping):
        inputs = {key: value for key, value in batch.items() if key != LABELS}
        targets = batch.get(LABELS)
        if targets is None and need_targets:
            raise ValueError(f"a Mapping batch must hold its targets under {LABELS!r}; its keys are {sorted(batch)}")
        return inputs, targets
    if isinstance(batch, (tuple, list)):
        if len(batch) >= 2:
            return batch[0], batch[1]
        if need_targets:
            raise ValueError(f"a batch of {len(batch)} element(s) holds no targets: give (inputs, targets)")
        return batch[0], None
    if need_targets:
        raise ValueError(
            f"a batch of type {type(batch).__name__} holds no targets: give (inputs, targets) or a "
            f"Mapping with {LABELS!r}"
        )
    return batch, None


def inputs_of(batch: Any) -> Inputs:
    """The inputs of a loader batch: ``split_batch`` without requiring targets."""
    return split_batch(batch, need_targets=False)[0]


def as_call(inputs: Inputs) -> tuple[tuple, dict[str, Any]]:
    """The model's positional and keyword arguments for ``inputs``."""
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def move_to(value: Any, device: torch.device) -> Any:
    """Every tensor in ``value`` (inputs, targets, nested containers) moved to ``device``."""
    return tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, value)


def batch_length(inputs: Inputs) -> int:
    """The number of examples: the largest first dimension of the tensors in ``inputs`` (keyword
    inputs shared by every example, such as a ``(1, T)`` ``position_ids``, broadcast over it)."""
    lengths = [leaf.shape[0] for leaf in tree_leaves(inputs) if isinstance(leaf, Tensor) and leaf.dim() > 0]
    if not lengths:
        raise ValueError("the inputs hold no tensor with a batch dimension")
    return max(lengths)


def split_inputs(inputs: Inputs, size: int) -> list[Inputs]:
    """``inputs`` cut into pieces of at most ``size`` examples (every batch-first tensor is split alike)."""
    length = batch_length(inputs)

    def piece(t: Any, start: int) -> Any:
        return t[start : start + size] if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == length else t

    return [tree_map(functools.partial(piece, start=start), inputs) for start in range(0, length, size)]


def logits_of(
    output: Any, inputs: Inputs, output_fn: OutputFn | None = None, *, classification: bool = False
) -> Tensor:
    """The logits (or regression mean) in a model's ``output``, checked to have one row per example
    (and, with ``classification``, to be ``(N, num_classes)``).

    Raises ValueError naming what was found when no tensor can be read, or when ``output_fn``
    returns something other than a tensor with the batch's first dimension."""
    if output_fn is not None:
        logits = output_fn(output, inputs)
        where = "output_fn"
    else:
        logits = _default_logits(output)
        where = "the model's output"
    if not isinstance(logits, Tensor):
        raise ValueError(f"{where} gave a {type(logits).__name__}, not a tensor of logits")
    length = batch_length(inputs)
    if logits.dim() == 0 or logits.shape[0] != length:
        raise ValueError(
            f"{where} gave logits of shape {tuple(logits.shape)}; expected ({length}, ...), one row per example"
        )
    if classification:
        check_classification_logits(logits, output_fn)
    return logits


def check_classification_logits(logits: Tensor, output_fn: OutputFn | None = None) -> Tensor:
    """``logits`` if it is ``(N, num_classes)``; else ValueError naming its shape (e.g. a causal LM's
    ``(N, T, V)`` logits of every position, where ``output_fn`` should pick the answer's)."""
    if logits.dim() != 2:
        where = "output_fn" if output_fn is not None else "the model's output"
        raise ValueError(
            f"{where} gave logits of shape {tuple(logits.shape)}; classification expects "
            f"({logits.shape[0]}, num_classes), one row of class logits per example"
        )
    return logits


def _default_logits(output: Any) -> Any:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output:
        return output[0]
    raise ValueError(
        f"cannot read logits from a {type(output).__name__}: return a tensor, a tuple, an object "
        "with .logits, or pass output_fn"
    )
