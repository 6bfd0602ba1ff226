"""Shared machinery of the posteriors trained by gradient descent (VI, MC-dropout).

``WeightPosterior`` is an ``nn.Module`` wrapping an unmodified network.  The network is *held, not
registered*: its code and its parameter objects are never touched.  The wrapper registers

* the variational parameters of the Bayesian weights (defined by the subclass: mu, rho, ...),
* trainable copies of every other parameter (``point``: ordinary point estimates) and copies of
  the buffers (``buffers``: BatchNorm running statistics update in place as usual),
* the prior snapshot (``prior``) and the noise state ``rng_state = (base seed, steps taken)``,

so ``post.parameters()`` is everything an optimizer trains and ``state_dict`` captures a run,
including where the noise stream is.  A forward pass draws weights and runs the network through
``torch.func.functional_call``.

Noise (design.md section 3): parameter ``k`` owns Philox elements ``[offset_k, offset_k + numel_k)``,
offsets being cumulative numels rounded up to 4 (one Philox block never straddles two tensors).
Training call ``t`` uses seed ``(base + (t + 1) * 0x9E3779B97F4A7C15) mod 2**63`` and sample ``s`` of
the call uses ``stream = s``; ``sample(index)`` uses seed ``base`` and ``stream = index``, so it is
deterministic in ``index``.

Data parallel (``torch.distributed``): wrap the posterior in ``DistributedDataParallel`` and call the
wrapped module with the targets, ``loss = ddp_post(inputs, targets)``: ``forward`` then returns
``loss(inputs, targets)`` through DDP's hooks, so the variational parameters' gradients are averaged
like any others and the replicas stay identical (calling ``ddp_post.module.loss`` would skip DDP's
gradient synchronisation).  DDP broadcasts ``rng_state`` with the buffers, so every rank uses the same
training seed; the streams are folded with the rank (``s + (rank << 32)``, ``distributed.rank_stream``),
so each rank draws its own weights: a K-rank step averages K * S independent draws (variance
reduction).  Rank 0 and a single process use ``stream = s`` as above; ``sample(index)`` is the same on
every rank.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..distributed import rank_stream
from ..ops import philox
from .prior import GaussianPrior, PriorMean, PriorStd, mangle
from .selection import ParamSelection

_WEYL = 0x9E3779B97F4A7C15
LIKELIHOODS = ("classification", "regression")
Inputs = Tensor | tuple[Any, ...]


def philox_offsets(shapes: Sequence[torch.Size]) -> list[int]:
    """Start of each tensor in the Philox element space: cumulative numels rounded up to 4."""
    offsets, start = [], 0
    for shape in shapes:
        offsets.append(start)
        start += -(-math.prod(shape) // 4) * 4
    return offsets


def step_seed(base: int, step: int) -> int:
    """The Philox seed of training call ``step`` (0-based) of a posterior with base seed ``base``."""
    return (base + (step + 1) * _WEYL) % 2**63


def check_positive(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _check_count(value: int, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class _Store(nn.Module):
    """A flat container of parameters or buffers keyed by (mangled) parameter names."""


class WeightPosterior(nn.Module):
    """Base of ``VI`` and ``MCDropout``: see the module docstring.

    Subclasses name their variational stores in ``variational`` (each holds one parameter per
    Bayesian weight, under the mangled weight name), initialise them in ``_init_bayesian`` and implement
    ``_draw_with_kl`` (Bayesian weights for one seed and stream, with ``kl()``: one fused op), ``kl``,
    ``mean`` and ``std``.
    """

    def __init__(
        self,
        model: nn.Module,
        prior_mean: PriorMean = "pretrained",
        prior_std: PriorStd = 1.0,
        *,
        num_data: int,
        kl_weight: float = 1.0,
        num_samples: int = 1,
        params: ParamSelection = None,
        new_params: str | Sequence[str] | None = None,
        include_bias: bool = True,
        include_norm: bool = True,
        likelihood: str = "classification",
        seed: int | None = None,
    ) -> None:
        """Args shared by every subclass:

        model: any ``nn.Module``; never modified.
        prior_mean, prior_std, new_params, include_bias, include_norm: the ``GaussianPrior``.
        num_data: N, the training-set size (the regulariser is divided by it).
        kl_weight: multiplies ``kl() / N`` (1 for the ELBO; < 1 tempers the prior).
        num_samples: S, weight draws averaged per ``loss`` call.
        params: which parameters are Bayesian (``select_parameters``); the rest are point estimates.
        likelihood: "classification" or "regression" (read by ``bayeskern.predict``).
        seed: base Philox seed (default: drawn from torch's global generator).
        """
        super().__init__()
        self.num_data = _check_count(num_data, "num_data", 1)
        self.num_samples = _check_count(num_samples, "num_samples", 1)
        if isinstance(kl_weight, bool) or not isinstance(kl_weight, (int, float)) or not kl_weight >= 0:
            raise ValueError(f"kl_weight must be a non-negative number, got {kl_weight!r}")
        self.kl_weight = float(kl_weight)
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        self.likelihood = likelihood
        self.__dict__["model"] = model  # held, not registered: the wrapper trains its own copies
        self.prior = GaussianPrior(
            model, prior_mean, prior_std, params=params, new_params=new_params,
            include_bias=include_bias, include_norm=include_norm,
        )
        self.names: list[str] = list(self.prior.names)
        model_params = dict(model.named_parameters())
        self.offsets = dict(zip(self.names, philox_offsets([model_params[n].shape for n in self.names])))
        self._point_names = [name for name in model_params if name not in self.offsets]
        self.point = _Store()
        for name in self._point_names:
            param = model_params[name]
            self.point.register_parameter(mangle(name), nn.Parameter(param.detach().clone(), param.requires_grad))
        self._buffer_names = [name for name, _ in model.named_buffers()]
        self.buffers_ = _Store()
        for name, buffer in model.named_buffers():
            self.buffers_.register_buffer(mangle(name), buffer.detach().clone())
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        philox.check_key(seed, 0)
        self.register_buffer("rng_state", torch.tensor([seed, 0], dtype=torch.int64))
        for store in self.variational:
            self.add_module(store, _Store())
        with torch.no_grad():
            for name in self.names:
                for store, value in self._init_bayesian(model_params[name]).items():
                    self.get_submodule(store).register_parameter(mangle(name), nn.Parameter(value))

    # -- subclass hooks ------------------------------------------------------------------------
    variational: tuple[str, ...] = ()  # names of the stores holding the variational parameters

    def _init_bayesian(self, param: Tensor) -> dict[str, Tensor]:
        """Initial value of each variational store for one Bayesian parameter."""
        raise NotImplementedError

    def _draw_with_kl(self, seed: Tensor, stream: int) -> tuple[dict[str, Tensor], Tensor]:
        """The Bayesian weights of one draw and ``kl()``, differentiable in the variational parameters."""
        raise NotImplementedError

    def kl(self) -> Tensor:
        """The regulariser added to the loss as ``kl_weight * kl() / num_data``."""
        raise NotImplementedError

    def _fused_args(self) -> tuple[list[Tensor | None], list[float | Tensor], list[int]]:
        """Prior means, prior stds and Philox offsets of the Bayesian parameters: the fused draws' lists."""
        return (*self.prior.mean_std_lists(), [self.offsets[name] for name in self.names])

    def mean(self) -> dict[str, Tensor]:
        """The expected weights, with the point estimates and buffers (ready for functional_call)."""
        raise NotImplementedError

    def std(self) -> dict[str, Tensor]:
        """The per-weight posterior std of each Bayesian parameter."""
        raise NotImplementedError

    # -- shared machinery ----------------------------------------------------------------------
    def train(self, mode: bool = True) -> "WeightPosterior":
        """Set the wrapper's and the wrapped model's training mode (BatchNorm, dropout layers)."""
        self.model.train(mode)
        return super().train(mode)

    def _next_seed(self) -> Tensor:
        base, step = self.rng_state.tolist()
        self.rng_state[1] += 1
        return philox.seed_tensor(step_seed(base, step))

    def _eval_seed(self) -> Tensor:
        return philox.seed_tensor(int(self.rng_state[0]))

    def _draw(self, seed: Tensor, stream: int) -> dict[str, Tensor]:
        """The Bayesian weights of one draw; its regulariser, a few flops per weight in the same
        pass, is dropped (one fused call over all tensors costs less than one op per tensor)."""
        return self._draw_with_kl(seed, stream)[0]

    def _others(self) -> dict[str, Tensor]:
        """Point-estimate parameters and buffers, keyed by the model's names."""
        out = {name: self.buffers_._buffers[mangle(name)] for name in self._buffer_names}
        out.update((name, self.point._parameters[mangle(name)]) for name in self._point_names)
        return out

    def _full(self, bayesian: dict[str, Tensor]) -> dict[str, Tensor]:
        """``bayesian`` plus detached point estimates and buffers: all that differs from the model."""
        return {**{k: v.detach() for k, v in self._others().items()}, **bayesian}

    def functional_forward(self, weights: dict[str, Tensor], inputs: Inputs) -> Any:
        """Run the wrapped model with ``weights`` for the Bayesian parameters."""
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        return functional_call(self.model, {**self._others(), **weights}, args)

    def forward(
        self,
        inputs: Inputs,
        targets: Tensor | None = None,
        criterion: Callable[[Any, Tensor], Tensor] = F.cross_entropy,
    ) -> Any:
        """One stochastic forward pass with freshly drawn weights; with ``targets``, ``loss(inputs,
        targets, criterion)`` instead (the call to make through ``DistributedDataParallel``)."""
        if targets is not None:
            return self.loss(inputs, targets, criterion)
        return self.functional_forward(self._draw(self._next_seed(), rank_stream(0)), inputs)

    def loss(
        self,
        inputs: Inputs,
        targets: Tensor,
        criterion: Callable[[Any, Tensor], Tensor] = F.cross_entropy,
    ) -> Tensor:
        """``(1/S) sum_s criterion(model_{w_s}(inputs), targets) + kl_weight * kl() / num_data``.

        ``criterion`` returns the mean negative log-likelihood of the minibatch; the S weight
        draws share one fresh seed and use streams ``0..S-1`` (folded with the rank under
        ``torch.distributed``, see the module docstring).  In train mode BatchNorm running
        statistics update once per draw.
        """
        seed = self._next_seed()
        first, regulariser = self._draw_with_kl(seed, rank_stream(0))
        draws = itertools.chain([first], (self._draw(seed, rank_stream(s)) for s in range(1, self.num_samples)))
        nll = sum(criterion(self.functional_forward(weights, inputs), targets) for weights in draws) / self.num_samples
        return nll + (self.kl_weight / self.num_data) * regulariser

    @torch.no_grad()
    def sample(self, index: int) -> dict[str, Tensor]:
        """The index-th posterior sample: Bayesian weights drawn with seed ``base`` and stream
        ``index``, plus the trained point estimates and buffers (all that differs from the model)."""
        return self._full(self._draw(self._eval_seed(), int(index)))
