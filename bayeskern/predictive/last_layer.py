"""The last-layer path of the sampled predictive: when one submodule (the head) holds every random
tensor and the model returns its output as it is, the body runs once per batch and the head per
sample (``sampling.py`` has the checks)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_leaves

from ..batches import as_call
from .base import _bytes, _Samples, _warn


def _owner(names: Iterable[str]) -> str:
    """The dotted path of the deepest module holding every named tensor ("" for the root)."""
    paths = [name.split(".")[:-1] for name in names]
    common = paths[0] if paths else []
    for path in paths[1:]:
        k = 0
        while k < min(len(common), len(path)) and common[k] == path[k]:
            k += 1
        common = common[:k]
    return ".".join(common)


@dataclass
class _PerSample:
    """One batch's per-sample call: ``module(*args, **kwargs)`` with ``base`` updated by a sample's
    tensors under ``prefix`` (the module's path in the model, with its dot; "" for the model)."""

    module: nn.Module
    base: dict[str, Tensor]
    prefix: str
    args: tuple
    kwargs: dict[str, Any]
    module_bytes: int  # of the module's tensors in ``base`` (random ones included)

    def params(self, drawn: dict[str, Tensor]) -> dict[str, Tensor]:
        cut = len(self.prefix)
        return {**self.base, **{name[cut:]: t for name, t in drawn.items() if name.startswith(self.prefix)}}


class _Target:
    """What runs per sample: the whole model on the batch, or (see the module docstring) the
    submodule owning every random tensor of the samples on the inputs it gets in one forward."""

    def __init__(
        self, model: nn.Module, base: dict[str, Tensor], samples: _Samples, model_device: torch.device
    ) -> None:
        self.model, self.base = model, base
        self.model_bytes = _bytes(base.values())
        path = _owner(samples.random)
        first = samples[0]  # held or cached: not drawn again
        floating = all(t.is_floating_point() for t in first.values())
        self.head = model.get_submodule(path) if path and floating and model_device == samples.device else None
        if self.head is not None and type(self.head).forward is nn.Module.forward:
            self.head = None  # a container that is never called (ModuleList of LoRA'd layers): no head
        if self.head is not None:
            # the body runs with the random tensors all NaN: a head input with a NaN used them
            poisoned = {n: torch.full_like(t, math.nan) for n, t in first.items()}
            self.body_params = {**self.base, **poisoned}
            self.path, self.prefix = path, path + "."
            self.head_base = {n[len(self.prefix) :]: t for n, t in base.items() if n.startswith(self.prefix)}
            self.head_bytes = _bytes(self.head_base.values())

    def per_sample(self, x: Any) -> _PerSample:
        args, kwargs = as_call(x)
        if self.head is not None:
            captured = _submodule_inputs(self.model, self.body_params, self.head, args, kwargs)
            if not isinstance(captured, str):
                return _PerSample(self.head, self.head_base, self.prefix, *captured, self.head_bytes)
            _warn(
                f"last-layer prediction: {self.path!r} holds every random tensor but {captured}; "
                "running the whole network per sample"
            )
            self.head = None  # the check failed: run the whole network from now on
        return _PerSample(self.model, self.base, "", args, kwargs, self.model_bytes)


def _submodule_inputs(
    model: nn.Module, params: dict[str, Tensor], head: nn.Module, args: tuple, kwargs: dict[str, Any]
) -> tuple[tuple, dict[str, Any]] | str:
    """The args and kwargs ``head`` gets in one forward of ``model`` (with ``params``) on ``x``, if
    the model returns the output of that one call of ``head`` unmodified and its inputs hold no NaN;
    else the condition that failed, as a clause ("it ran 2 times in one forward")."""
    calls: list[tuple[tuple, dict[str, Any], Any, int]] = []

    def capture(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        calls.append((args, kwargs, output, getattr(output, "_version", -1)))

    handle = head.register_forward_hook(capture, with_kwargs=True)
    try:
        out = functional_call(model, params, args, kwargs)
    finally:
        handle.remove()
    if len(calls) != 1:
        return f"it ran {len(calls)} times in one forward"
    if calls[0][2] is not out or not isinstance(out, Tensor):
        return "the model does not return its output as it is"
    if out._version != calls[0][3]:
        return "the model modifies its output in place"
    args, kwargs = calls[0][0], calls[0][1]
    if any(t.is_floating_point() and t.isnan().any() for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)):
        return "its inputs depend on the random tensors"
    return args, kwargs
