"""Parameter-level MC-dropout over any ``nn.Module`` (docs/design.md, "MC-dropout").

Each Bayesian weight is kept with probability ``1 - p`` (the mask is regenerated in backward).
``mode="scale"``: ``w = z * mu / (1 - p)``; ``mode="prior"``: ``w = z * mu + (1 - z) * theta0``
(dropped weights fall back to the prior mean, as in BayesDLL).
Regulariser (in place of the KL): ``(1 - p) / (2 sp^2) * ||mu - theta0||^2``, added to the loss as
``reg / N``.  There is no temperature: with ``p`` fixed, the entropy of the dropout family does not
depend on ``mu``, so tempering would leave the objective unchanged; ``p`` sets the spread and
``prior_std`` the strength of the pull towards theta0.  Every draw comes with the regulariser
from one fused op over all tensors (``bayeskern.ops.draw.weight_dropout_l2``); only the first draw of a step keeps it.

Moments of one weight: scale mode ``E w = mu``, ``Var w = mu^2 p / (1 - p)``; prior mode
``E w = (1 - p) mu + p theta0``, ``Var w = p (1 - p) (mu - theta0)^2``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed.sharding import global_sum, local_tensor
from ..ops.draw import weight_dropout_l2
from ..ops.dropout import check_probability
from ..validation import check_choice
from .prior import mangle
from .weight_posterior import WeightPosterior

MODES = ("scale", "prior")


class MCDropout(WeightPosterior):
    """Parameter-level MC-dropout with drop probability ``p`` over the parameters selected by ``params``.

    ``mode`` is "scale" or "prior" (see the module docstring); the other arguments are those of
    ``WeightPosterior`` (``num_data`` is required).
    """

    variational = ("mu",)

    def __init__(self, model: nn.Module, *, p: float = 0.1, mode: str = "scale", **options: Any) -> None:
        check_probability(p)
        self.p, self.mode = float(p), check_choice(mode, "mode", MODES)
        super().__init__(model, **options)

    def _init_bayesian(self, param: Tensor) -> dict[str, Tensor]:
        return {"mu": param.detach().clone()}

    def _mus(self) -> Iterator[tuple[str, Tensor, Tensor]]:
        mu = self._store("mu")
        for name in self.names:
            yield name, mu[mangle(name)], self.prior.mean(name)

    def regulariser(self) -> Tensor:
        """``sum (1 - p) / (2 sp^2) * ||mu - theta0||^2`` over the Bayesian parameters."""
        local = self.prior.neg_log_prob({name: mu for name, mu, _ in self._mus()})  # this rank's part if sharded
        return (1 - self.p) * global_sum(local, self.mesh)

    def _draw_with_regulariser(self, seed: Tensor, stream: int) -> tuple[dict[str, Tensor], Tensor]:
        """One draw and ``regulariser()`` from the fused ``weight_dropout_l2``."""
        prior_means, prior_stds, offsets = self._fused_args()
        samples, l2 = weight_dropout_l2(
            [local_tensor(mu) for _, mu, _ in self._mus()],
            self.p,
            prior_means,
            prior_stds,
            seed,
            offsets,
            fill_prior=self.mode == "prior",
            stream=stream,
        )
        return dict(zip(self.names, samples)), l2

    def mean(self) -> dict[str, Tensor]:
        """Expected Bayesian weights: ``mu`` (scale mode) or ``(1 - p) mu + p theta0`` (prior mode)."""
        if self.mode == "scale":
            return {name: mu.detach() for name, mu, _ in self._mus()}
        return {name: torch.lerp(mu.detach(), theta0, self.p) for name, mu, theta0 in self._mus()}

    def std(self) -> dict[str, Tensor]:
        """Per-weight std of the dropout distribution (see the module docstring)."""
        if self.mode == "scale":
            return {name: mu.detach().abs() * (self.p / (1 - self.p)) ** 0.5 for name, mu, _ in self._mus()}
        return {name: (mu.detach() - theta0).abs() * (self.p * (1 - self.p)) ** 0.5 for name, mu, theta0 in self._mus()}
