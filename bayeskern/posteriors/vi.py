"""Mean-field Gaussian variational inference over any ``nn.Module`` (docs/design.md, "VI").

``q(w) = N(mu, s^2)``, ``s = softplus(rho_scale * rho)``, initialised at ``mu = current weights``
and ``s = init_std``.  The stored ``rho`` is scaled so that the std moves as fast as the mean under
Adam: Adam moves every parameter by at most about ``lr`` per step whatever its gradient's scale, and
for small s, ``d log s / d rho = rho_scale``, so one step moves ``log s`` by up to ``rho_scale * lr``.
At ``rho_scale = 1`` a fine-tuning run (a few hundred steps at lr 1e-3) cannot move s by even one
e-fold, so the std stays where it was initialised; the default 30 lets it reach the ELBO's optimum
(docs/guide/vi.md).  With the Gaussian prior ``p = N(theta0, sp^2)``, N examples and temperature T
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

    ``init_std`` is the initial posterior std ``softplus(rho_scale * rho)``; ``rho_scale`` > 0 how
    fast an optimizer moves the std (module docstring; kept in ``state_dict`` as a buffer, so a
    checkpoint loads with the scale it was trained at); ``temperature`` is T >= 0 (module docstring);
    the other arguments are those of ``WeightPosterior`` (``num_data`` is required).
    """

    variational = ("mu", "rho")
    rho_scale: Tensor  # a registered buffer (0-d, float32)

    def __init__(
        self,
        model: nn.Module,
        *,
        init_std: float = 1e-3,
        rho_scale: float = 30.0,
        temperature: float = 1.0,
        **options: Any,
    ) -> None:
        check_positive(rho_scale, "rho_scale")
        self.init_rho = math.log(math.expm1(check_positive(init_std, "init_std"))) / rho_scale
        self.temperature = check_nonnegative(temperature, "temperature")
        super().__init__(model, **options)
        self.register_buffer("rho_scale", torch.tensor(float(rho_scale), device=self.rng_state.device))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """A checkpoint written before ``rho_scale`` existed was trained at ``rho_scale = 1``."""
        state_dict.setdefault(prefix + "rho_scale", torch.tensor(1.0))
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _init_bayesian(self, param: Tensor) -> dict[str, Tensor]:
        return {"mu": param.detach().clone(), "rho": torch.full_like(param, self.init_rho)}

    def _pairs(self) -> Iterator[tuple[str, Tensor, Tensor]]:
        """``(name, mu, rho)`` per Bayesian parameter: the stored parameters (``rho`` unscaled)."""
        mu, rho = self._store("mu"), self._store("rho")
        for name in self.names:
            key = mangle(name)
            yield name, mu[key], rho[key]

    def _local_scaled(self, rho: Tensor) -> Tensor:
        """``rho_scale * rho`` on this rank's shard: the argument of the softplus, differentiable."""
        return local_tensor(rho) * self.rho_scale

    def _draw_with_regulariser(self, seed: Tensor, stream: int) -> tuple[dict[str, Tensor], Tensor]:
        """One draw and ``kl()`` from the fused ``gaussian_sample_kl`` (sharded: this rank's shards and its
        part of the KL)."""
        _, mus, rhos = zip(*self._pairs())
        prior_means, prior_stds, offsets = self._fused_args()
        samples, kl = gaussian_sample_kl(
            [local_tensor(mu) for mu in mus],
            [self._local_scaled(rho) for rho in rhos],
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
            gaussian_kl(local_tensor(mu), self._local_scaled(rho), m0, sp)
            for (_, mu, rho), m0, sp in zip(self._pairs(), prior_means, prior_stds)
        )
        return global_sum(cast(Tensor, total), self.mesh)  # names is never empty, so not the start value 0

    def entropy(self) -> Tensor:
        """``H[q] = sum log s + (D / 2) log(2 pi e)`` over the Bayesian parameters (float32 or wider)."""
        total: Tensor | None = None
        for _, _, stored in self._pairs():
            rho = self._local_scaled(stored)
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
        """Posterior stds ``softplus(rho_scale * rho)`` of the Bayesian parameters."""
        scale = float(self.rho_scale)
        return {name: F.softplus(rho.detach() * scale) for name, _, rho in self._pairs()}

    def functional_variance(self, jacobians: JacobianRows) -> Tensor:
        """``sum_p j_p^2 s_p^2`` (``protocol.GaussianPosterior``; the linearised predictive)."""
        return diagonal_functional_variance(jacobians, {name: std.square() for name, std in self.std().items()})
