"""Mean-field Gaussian variational inference over any ``nn.Module`` (docs/design.md, "VI").

``q(w) = N(mu, s^2)``, ``s = softplus(rho)``, initialised at ``mu = current weights`` and
``s = init_std``.  With the Gaussian prior ``p = N(theta0, sp^2)``, N examples and temperature T
(the target is the tempered posterior ``p(w | D)^(1/T)``, docs/vocabulary.md), the loss is

    (1/S) sum_s NLL(w_s) + (KL(q || p) - (T - 1) H[q]) / N,     w_s = mu + s * eps_s,

the mean negative log-likelihood over S reparameterised draws plus the regulariser; it is
``T / N`` times ``KL(q || p_T)`` up to a constant, and the negative ELBO per example at T = 1.
``H[q] = sum log s + (D / 2) log(2 pi e)`` is the entropy of q (D weights).  Every draw (training,
``forward``, ``sample``) comes with the KL from one fused op over all tensors
(``bayeskern.ops.draw.gaussian_sample_kl``); only the first draw of a step keeps its KL.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..curvature.rows import JacobianRows
from ..distributed.sharding import global_sum, local_tensor
from ..ops.draw import gaussian_sample_kl
from ..ops.kl import gaussian_kl
from ..validation import check_nonnegative, check_positive
from .gaussian import diagonal_functional_variance
from .prior import mangle
from .weight_posterior import WeightPosterior


class VI(WeightPosterior):
    """Mean-field Gaussian VI over the parameters selected by ``params`` (all by default).

    ``init_std`` is the initial posterior std ``softplus(rho)``; ``temperature`` is T >= 0 (module
    docstring); the other arguments are those of ``WeightPosterior`` (``num_data`` is required).
    """

    variational = ("mu", "rho")

    def __init__(self, model: nn.Module, *, init_std: float = 1e-3, temperature: float = 1.0, **options: Any) -> None:
        self.init_rho = math.log(math.expm1(check_positive(init_std, "init_std")))
        self.temperature = check_nonnegative(temperature, "temperature")
        super().__init__(model, **options)

    def _init_bayesian(self, param: Tensor) -> dict[str, Tensor]:
        return {"mu": param.detach().clone(), "rho": torch.full_like(param, self.init_rho)}

    def _pairs(self) -> Iterator[tuple[str, Tensor, Tensor]]:
        mu, rho = self._store("mu"), self._store("rho")
        for name in self.names:
            key = mangle(name)
            yield name, mu[key], rho[key]

    def _draw_with_regulariser(self, seed: Tensor, stream: int) -> tuple[dict[str, Tensor], Tensor]:
        """One draw and ``kl()`` from the fused ``gaussian_sample_kl`` (sharded: this rank's shards and its
        part of the KL)."""
        _, mus, rhos = zip(*self._pairs())
        prior_means, prior_stds, offsets = self._fused_args()
        samples, kl = gaussian_sample_kl(
            [local_tensor(mu) for mu in mus],
            [local_tensor(rho) for rho in rhos],
            prior_means,
            prior_stds,
            seed,
            offsets,
            stream=stream,
        )
        return dict(zip(self.names, samples)), kl

    def kl(self) -> Tensor:
        """``KL(q || p)`` summed over all Bayesian parameters."""
        prior_means, prior_stds, _ = self._fused_args()
        total = sum(
            gaussian_kl(local_tensor(mu), local_tensor(rho), m0, sp)
            for (_, mu, rho), m0, sp in zip(self._pairs(), prior_means, prior_stds)
        )
        return global_sum(cast(Tensor, total), self.mesh)  # names is never empty, so not the start value 0

    def entropy(self) -> Tensor:
        """``H[q] = sum log s + (D / 2) log(2 pi e)`` over the Bayesian parameters (float32 or wider)."""
        total: Tensor | None = None
        for _, _, rho in self._pairs():
            rho = local_tensor(rho)
            rho = rho.float() if rho.dtype in (torch.float16, torch.bfloat16) else rho
            term = torch.log(F.softplus(rho)).sum() + 0.5 * rho.numel() * (1.0 + math.log(2 * math.pi))
            total = term if total is None else total + term
        return global_sum(cast(Tensor, total), self.mesh)  # names is never empty

    def _tempered(self, kl: Tensor) -> Tensor:
        """``KL - (T - 1) H[q]``: the KL alone at T = 1 (no extra pass over rho)."""
        if self.temperature == 1.0:
            return kl
        return kl - (self.temperature - 1.0) * self.entropy()

    def regulariser(self) -> Tensor:
        """``KL(q || p) - (T - 1) H[q]``, added to the loss divided by ``num_data``."""
        return self._tempered(self.kl())

    def mean(self) -> dict[str, Tensor]:
        """Posterior means ``mu`` of the Bayesian parameters."""
        return {name: mu.detach() for name, mu, _ in self._pairs()}

    def std(self) -> dict[str, Tensor]:
        """Posterior stds ``softplus(rho)`` of the Bayesian parameters."""
        return {name: F.softplus(rho.detach()) for name, _, rho in self._pairs()}

    def functional_variance(self, jacobians: JacobianRows) -> Tensor:
        """``sum_p j_p^2 softplus(rho_p)^2`` (``protocol.GaussianPosterior``; the linearised predictive)."""
        return diagonal_functional_variance(jacobians, {name: std.square() for name, std in self.std().items()})
