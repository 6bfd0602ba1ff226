"""The Gaussian prior every posterior shares: ``p(theta) = N(theta0, sp^2)`` per parameter.

``theta0`` (the prior mean, ``prior_mean``) is one of

* ``"pretrained"`` (the default) -- a frozen snapshot of the module's parameters taken once, at
  construction;
* ``"zero"``;
* a mapping (e.g. a ``state_dict``) from parameter name to tensor; it must hold every selected
  parameter not in ``new_params``, with the parameter's shape (extra keys such as buffers are
  ignored);
* a sequence of tensors, one per selected parameter, in ``named_parameters()`` order.

Parameters named in ``new_params`` (names or globs, e.g. ``"head.*"`` for a freshly initialised
classifier) get mean zero whatever ``prior_mean`` says.

``sp`` (the prior std, ``prior_std``) is a positive float, or a mapping from names/globs to a positive float or a
tensor broadcastable to the parameter (the first matching key wins; every selected parameter
must be covered).  A zero mean is stored as one 0-d zero and handed out as a broadcast view, so it
costs no memory.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..distributed.sharding import from_local_like, local_tensor, shard_copy
from .selection import ParamSelection, select_parameters

PriorMean = str | Mapping[str, Tensor] | Sequence[Tensor]
PRIOR_MEANS = ("pretrained", "zero")
PriorStd = float | Mapping[str, float | Tensor]


def mangle(name: str) -> str:
    """A parameter name usable as an attribute/buffer name (``.`` is not allowed there)."""
    return name.replace(".", "/")


def matches(name: str, patterns: Sequence[str]) -> bool:
    """True if ``name`` equals one of ``patterns`` or matches it as an ``fnmatch`` glob."""
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def new_param_patterns(new_params: str | Sequence[str] | None) -> tuple[str, ...]:
    """``new_params`` as a tuple of names/globs (ValueError naming it when malformed)."""
    return _as_patterns(new_params, "new_params")


def prior_mean_by_name(prior_mean: PriorMean, names: Sequence[str]) -> str | Mapping[str, Tensor]:
    """A ``prior_mean`` spec with a sequence of tensors turned into a mapping over ``names``."""
    if isinstance(prior_mean, str):
        if prior_mean not in PRIOR_MEANS:
            raise ValueError(
                f"prior_mean must be one of {PRIOR_MEANS}, a mapping or a sequence of tensors, got {prior_mean!r}"
            )
        return prior_mean
    if isinstance(prior_mean, Mapping):
        return prior_mean
    if isinstance(prior_mean, Sequence) and all(isinstance(t, Tensor) for t in prior_mean):
        if len(prior_mean) != len(names):
            raise ValueError(f"prior_mean holds {len(prior_mean)} tensors but {len(names)} parameters are selected")
        return dict(zip(names, cast(Sequence[Tensor], prior_mean)))  # a str was returned above
    raise ValueError(f"prior_mean must be one of {PRIOR_MEANS}, a mapping or a sequence of tensors, got {prior_mean!r}")


def _as_patterns(value: str | Sequence[str] | None, arg: str) -> tuple[str, ...]:
    if value is None:
        return ()
    patterns = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"{arg} must be a name, a glob or a sequence of them, got {value!r}")
    return patterns


def _check_std_value(name: str, value: float | Tensor, param: Tensor) -> float | Tensor:
    if isinstance(value, Tensor):
        if not value.dtype.is_floating_point or not bool((value > 0).all()):
            raise ValueError(f"prior_std for {name!r} must be a positive floating-point tensor")
        try:
            torch.broadcast_shapes(value.shape, param.shape)
        except RuntimeError:
            raise ValueError(
                f"prior_std for {name!r} has shape {tuple(value.shape)}, not broadcastable to "
                f"the parameter's {tuple(param.shape)}"
            ) from None
        return value.detach().to(device=param.device, dtype=param.dtype)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"prior_std must be positive, got {value!r} for {name!r}")
    return float(value)


class GaussianPrior(nn.Module):
    """Independent Gaussian prior ``N(theta0, sp^2)`` over the selected parameters of ``model``.

    An ``nn.Module`` so that its snapshot moves with ``.to()`` and is saved in ``state_dict``;
    the model itself is not registered and never modified.  ``names`` lists the parameters the
    prior covers (``params``/``include_bias``/``include_norm`` as in ``select_parameters``).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        params: ParamSelection = None,
        include_bias: bool = True,
        include_norm: bool = True,
        prior_mean: PriorMean = "pretrained",
        new_params: str | Sequence[str] | None = None,
        prior_std: PriorStd = 1.0,
    ) -> None:
        super().__init__()
        self.names: list[str] = select_parameters(model, params, include_bias=include_bias, include_norm=include_norm)
        fresh = new_param_patterns(new_params)
        model_params = dict(model.named_parameters())
        means = prior_mean_by_name(prior_mean, self.names)
        self._zero: dict[str, torch.Size] = {}
        self._layout: dict[str, Tensor] = {}  # once sharded: a DTensor laid out like each parameter
        self._std: dict[str, float | Tensor] = {}
        std_patterns = self._std_patterns(prior_std)
        for name in self.names:
            param = model_params[name]
            self._register_mean(name, param, means, matches(name, fresh))
            self._register_std(name, param, prior_std, std_patterns)

    @staticmethod
    def _std_patterns(std: PriorStd) -> tuple[str, ...] | None:
        if isinstance(std, Mapping):
            return _as_patterns(list(std), "prior_std keys")
        return None

    def _register_mean(self, name: str, param: Tensor, mean: str | Mapping[str, Tensor], fresh: bool) -> None:
        if fresh or (isinstance(mean, str) and mean == "zero"):
            self._zero[name] = param.shape
            self.register_buffer(mangle(name), param.new_zeros(()))
            return
        if isinstance(mean, str) and mean == "pretrained":
            value = param.detach().clone()
        else:
            if name not in mean:
                raise ValueError(
                    f"prior_mean has no entry for parameter {name!r} (list it in new_params for mean zero)"
                )
            value = cast(Mapping[str, Tensor], mean)[name]  # str specs were validated to the two above
            if not isinstance(value, Tensor) or value.shape != param.shape:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"prior_mean for {name!r} has shape {shape}, the parameter has {tuple(param.shape)}")
            value = value.detach().to(device=param.device, dtype=param.dtype).clone()
        self.register_buffer(mangle(name), value.contiguous())

    def _register_std(self, name: str, param: Tensor, std: PriorStd, patterns: tuple[str, ...] | None) -> None:
        if patterns is None:
            self._std[name] = _check_std_value(name, cast(float | Tensor, std), param)  # not a Mapping
            return
        key = next((p for p in patterns if matches(name, (p,))), None)
        if key is None:
            raise ValueError(f"prior_std has no entry (name or glob) for parameter {name!r}")
        value = _check_std_value(name, cast(Mapping[str, float | Tensor], std)[key], param)
        if isinstance(value, Tensor):
            self.register_buffer(mangle(name) + ":std", value)
        else:
            self._std[name] = value

    def mean(self, name: str) -> Tensor:
        """``theta0`` of parameter ``name`` with the parameter's shape (zero means are broadcast views;
        DTensors laid out like the parameter once sharded, ``shard_like``)."""
        value = self.get_buffer(mangle(name))
        if name not in self._zero:
            return value
        like = self._layout.get(name)
        if like is None:
            return value.expand(self._zero[name])
        return from_local_like(value.expand(local_tensor(like).shape), like)

    def std(self, name: str) -> float | Tensor:
        """``sp`` of parameter ``name``: a float, or a tensor broadcastable to the parameter."""
        if name in self._std:
            return self._std[name]
        return self.get_buffer(mangle(name) + ":std")

    def is_zero_mean(self, name: str) -> bool:
        return name in self._zero

    @torch.no_grad()
    def shard_like(self, params: Mapping[str, Tensor]) -> None:
        """Lay out every stored prior mean and tensor std like ``params[name]`` (the DTensor parameters of
        a sharded model, ``bayeskern.distributed.sharding.shard_copy``): each rank keeps its shard.  Zero means stay
        one 0-d zero, and so does a std tensor that broadcasts along the sharded first dimension; one that
        varies along it is expanded to the parameter's shape and sharded."""
        for name in self.names:
            like = params[name]
            self._layout[name] = like
            if not self.is_zero_mean(name):
                self.register_buffer(mangle(name), shard_copy(self.mean(name), like))
            sp = self.std(name)
            if isinstance(sp, Tensor) and sp.dim() == like.dim() and sp.shape[0] > 1:  # varies along sharded rows
                full = sp.expand(like.shape).contiguous()
                self.register_buffer(mangle(name) + ":std", shard_copy(full, like))

    def mean_std_lists(self) -> tuple[list[Tensor | None], list[float | Tensor]]:
        """The means (None where zero) and stds of ``names``, in order: the fused ops' prior arguments."""
        return [None if self.is_zero_mean(n) else self.mean(n) for n in self.names], [self.std(n) for n in self.names]

    def items(self) -> Iterator[tuple[str, Tensor, float | Tensor]]:
        """``(name, theta0, sp)`` for every parameter the prior covers."""
        for name in self.names:
            yield name, self.mean(name), self.std(name)

    def neg_log_prob(self, params: Mapping[str, Tensor]) -> Tensor:
        """``sum ||theta - theta0||^2 / (2 sp^2)`` over the covered parameters (``-log p`` up to a
        constant); ``params`` maps names to tensors (e.g. ``dict(model.named_parameters())``).  With
        DTensors (a sharded prior and parameters) it is this rank's part: the sum over its shards."""
        total: Tensor | None = None
        for name, theta0, sp in self.items():
            theta = local_tensor(params[name])  # a sharded prior: each rank sums its shard
            mean = None if self.is_zero_mean(name) else local_tensor(theta0)
            if isinstance(sp, Tensor):
                residual = theta if mean is None else theta - mean
                term = (residual.square() / (2 * local_tensor(sp) ** 2)).sum()
            else:
                term = _ScaledSquaredDistance.apply(theta, mean, 0.5 / sp**2)
            total = term if total is None else total + term
        return cast(Tensor, total)  # select_parameters never returns an empty selection


class _ScaledSquaredDistance(torch.autograd.Function):
    """``c * ||theta - theta0||^2`` (``theta0`` None means zero) with one pass each way: the residual
    is kept for the backward, ``grad = 2 c g (theta - theta0)``.  Autograd's composition of sub,
    square, scale and sum makes about four times the memory traffic."""

    @staticmethod
    def forward(ctx: Any, theta: Tensor, theta0: Tensor | None, c: float) -> Tensor:
        residual = (theta if theta0 is None else theta - theta0).reshape(-1)
        ctx.save_for_backward(residual)
        ctx.c, ctx.shape = c, theta.shape
        if residual.dtype in (torch.float32, torch.float64):
            return torch.dot(residual, residual) * c
        return residual.float().square().sum().to(theta.dtype) * c

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (residual,) = ctx.saved_tensors
        return (residual * (2 * ctx.c * grad)).view(ctx.shape), None, None
