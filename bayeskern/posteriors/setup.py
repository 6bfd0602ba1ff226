"""``PosteriorSetup``: what every posterior over a model fixes when it is built, in one object.

* ``names`` -- the Bayesian parameters (``select_parameters``: ``params``, ``include_bias``,
  ``include_norm``), in ``model.named_parameters()`` order;
* ``prior`` -- the ``GaussianPrior`` over them (``prior_mean``, ``new_params``, ``prior_std``), or None
  for a posterior that keeps no prior (``SampleBank``: its chain's prior lives in the optimizer);
* ``offsets`` -- where each Bayesian parameter's Philox counters start (``ops.philox.named_offsets``
  over the global shapes, so a sharded parameter keeps the counters of the unsharded one);
* ``seed`` -- the base Philox seed (None asks ``distributed.seed_or_shared`` for one drawn on rank 0
  and broadcast: a collective, so every rank must build the posterior).

``VI``, ``MCDropout`` (through ``WeightPosterior``), ``DiagLaplace`` and ``SampleBank`` hold one as
``setup`` and read their ``names``, ``offsets`` and ``prior`` from it; a new posterior over a model
builds one the same way.  ``BayesSGLD`` is a ``torch.optim.Optimizer``: its parameters, prior means
and offsets come with its param groups instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from ..distributed.ranks import seed_or_shared
from ..ops import philox
from .prior import GaussianPrior, PriorMean, PriorStd
from .selection import ParamSelection, select_parameters


@dataclass(frozen=True)
class PosteriorSetup:
    """The Bayesian parameters of a model, their prior, their Philox offsets and the base seed."""

    names: list[str]
    prior: GaussianPrior | None
    offsets: dict[str, int]
    seed: int

    @classmethod
    def build(
        cls,
        model: nn.Module,
        *,
        params: ParamSelection = None,
        include_bias: bool = True,
        include_norm: bool = True,
        with_prior: bool = True,
        prior_mean: PriorMean = "pretrained",
        new_params: str | Sequence[str] | None = None,
        prior_std: PriorStd = 1.0,
        seed: int | None = None,
    ) -> PosteriorSetup:
        """Select the Bayesian parameters of ``model``, snapshot their prior (``with_prior``), place them
        in the Philox counter space and fix the seed (arguments as in docs/vocabulary.md)."""
        prior: GaussianPrior | None = None
        if with_prior:
            prior = GaussianPrior(
                model,
                params=params,
                include_bias=include_bias,
                include_norm=include_norm,
                prior_mean=prior_mean,
                new_params=new_params,
                prior_std=prior_std,
            )
            names = list(prior.names)
        else:
            names = select_parameters(model, params, include_bias=include_bias, include_norm=include_norm)
        shapes = dict(model.named_parameters())
        offsets = philox.named_offsets({name: shapes[name].shape for name in names})
        return cls(names=names, prior=prior, offsets=offsets, seed=seed_or_shared(seed))

    def require_prior(self) -> GaussianPrior:
        """The prior (a posterior that was built ``with_prior``)."""
        if self.prior is None:
            raise ValueError("this posterior was set up without a prior")
        return self.prior
