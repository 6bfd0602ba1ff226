"""Prior means of an optimizer's param groups (``BayesSGLD``, ``IVON``): the ``prior_mean`` and
``new_params`` arguments of docs/vocabulary.md read per param group.

A group's ``prior_mean`` is ``"pretrained"`` (a snapshot of its parameters when the group is added),
``"zero"``, a mapping from parameter name to tensor, or a sequence of tensors (for the constructor:
every parameter in order; in a param group: its own); once placed, the group records its kind
(``"pretrained"``, ``"zero"`` or ``"given"``) and the means live in the optimizer state, so
checkpoints carry them.  ``new_params`` names parameters whose mean is zero (a fresh head).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..distributed.sharding import is_sharded, shard_like
from .prior import PRIOR_MEANS, matches, new_param_patterns

MEAN_KINDS = (*PRIOR_MEANS, "given")  # what a group records of its prior mean once placed


def check_group_prior(group: dict[str, Any]) -> None:
    """Validate the group's ``prior_mean`` and normalise its ``new_params`` to patterns."""
    mean = group["prior_mean"]
    if (isinstance(mean, str) and mean not in MEAN_KINDS) or not isinstance(mean, (str, Mapping, list, tuple)):
        raise ValueError(
            f"Invalid prior_mean: {mean!r} (must be one of {PRIOR_MEANS}, a mapping or a sequence of tensors)"
        )
    group["new_params"] = new_param_patterns(group["new_params"])


def _names(group: dict[str, Any], why: str) -> list[str]:
    names: list[str] | None = group.get("param_names")
    if names is None:
        raise ValueError(f"{why} needs named parameters: pass model.named_parameters() (or param groups with them)")
    return names


def group_prior_means(group: dict[str, Any], first: int) -> list[Tensor | None]:
    """The prior mean of each parameter of a new group (None: zero, or already in the state);
    ``first`` indexes a constructor-level sequence spec (the parameters placed before the group)."""
    spec, params = group["prior_mean"], group["params"]
    fresh = [False] * len(params)
    if group["new_params"]:
        fresh = [matches(name, group["new_params"]) for name in _names(group, "new_params")]
    if isinstance(spec, str):
        if spec != "pretrained":  # "zero", or "given": a group restored from a state dict
            return [None] * len(params)
        means = [p.detach().clone(memory_format=torch.preserve_format) for p in params]  # DTensors: sharded alike
    elif isinstance(spec, Mapping):
        means = []
        for name, p in zip(_names(group, "a mapping prior_mean"), params):
            if name not in spec and not matches(name, group["new_params"]):
                raise ValueError(
                    f"prior_mean has no entry for parameter {name!r} (list it in new_params for mean zero)"
                )
            means.append(spec.get(name, p))
        means = [_checked_mean(m, p, f" {n!r}") for m, p, n in zip(means, params, group["param_names"])]
    else:
        if first + len(params) > len(spec):
            raise ValueError(
                f"prior_mean has {len(spec)} tensors but there are at least {first + len(params)} parameters"
            )
        means = [_checked_mean(spec[i], p, f"[{i}]") for i, p in enumerate(params, start=first)]
    # a zero mean among given ones is stored as zeros, so the group's means stay one per parameter
    return [torch.zeros_like(m) if new else m for m, new in zip(means, fresh)]


def _checked_mean(mean: Any, param: Tensor, where: str) -> Tensor:
    if not isinstance(mean, Tensor) or mean.shape != param.shape:
        shape = tuple(mean.shape) if isinstance(mean, Tensor) else type(mean).__name__
        raise ValueError(f"prior_mean{where} has shape {shape} but its parameter has shape {tuple(param.shape)}")
    if is_sharded(param) and not is_sharded(mean):  # a full mean: this rank keeps its shard
        return shard_like(mean.detach().to(device=param.device, dtype=param.dtype), param).clone()
    return mean.detach().to(device=param.device, dtype=param.dtype).clone(memory_format=torch.preserve_format)
