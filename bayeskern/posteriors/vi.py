"""Mean-field Gaussian variational inference over any ``nn.Module`` (design.md section 5).

``q(w) = N(mu, s^2)``, ``s = softplus(rho)``, initialised at ``mu = current weights`` and
``s = init_std``.  The loss is the mean NLL over S reparameterised draws
``w_s = mu + s * eps_s`` plus ``kl_weight * KL(q || p) / N`` with the Gaussian prior
``p = N(theta0, sp^2)``.  Every draw (training, ``forward``, ``sample``) comes with the KL from one
fused op over all tensors (``bayeskern.ops.draw.gaussian_sample_kl``); only the first draw of a step
keeps its KL.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.kl import gaussian_kl
from ..ops.draw import gaussian_sample_kl
from .prior import PriorMean, PriorStd, mangle
from .wrapper import WeightPosterior, check_positive


class VI(WeightPosterior):
    """Mean-field Gaussian VI over the parameters selected by ``params`` (all by default).

    ``init_std`` is the initial posterior std ``softplus(rho)``; the other arguments are those of
    ``WeightPosterior`` (``num_data`` is required).
    """

    variational = ("mu", "rho")

    def __init__(
        self,
        model: nn.Module,
        prior_mean: PriorMean = "pretrained",
        prior_std: PriorStd = 1.0,
        init_std: float = 1e-3,
        **options: Any,
    ) -> None:
        self.init_rho = math.log(math.expm1(check_positive(init_std, "init_std")))
        super().__init__(model, prior_mean, prior_std, **options)

    def _init_bayesian(self, param: Tensor) -> dict[str, Tensor]:
        return {"mu": param.detach().clone(), "rho": torch.full_like(param, self.init_rho)}

    def _pairs(self):
        for name in self.names:
            key = mangle(name)
            yield name, self.mu._parameters[key], self.rho._parameters[key]

    def _draw_with_kl(self, seed: Tensor, stream: int) -> tuple[dict[str, Tensor], Tensor]:
        """One draw and ``kl()`` from the fused ``gaussian_sample_kl``."""
        _, mus, rhos = zip(*self._pairs())
        prior_means, prior_stds, offsets = self._fused_args()
        samples, kl = gaussian_sample_kl(mus, rhos, prior_means, prior_stds, seed, offsets, stream=stream)
        return dict(zip(self.names, samples)), kl

    def kl(self) -> Tensor:
        """``KL(q || p)`` summed over all Bayesian parameters."""
        prior_means, prior_stds = self.prior.mean_std_lists()
        return sum(
            gaussian_kl(mu, rho, m0, sp) for (_, mu, rho), m0, sp in zip(self._pairs(), prior_means, prior_stds)
        )

    def mean(self) -> dict[str, Tensor]:
        """Posterior means ``mu`` (with the point estimates and buffers, ready for functional_call)."""
        return self._full({name: mu.detach() for name, mu, _ in self._pairs()})

    def std(self) -> dict[str, Tensor]:
        """Posterior stds ``softplus(rho)`` of the Bayesian parameters."""
        return {name: F.softplus(rho.detach()) for name, _, rho in self._pairs()}
