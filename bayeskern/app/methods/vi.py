"""``vi``: mean-field Gaussian VI (``bayeskern.VI``), Adam on the ELBO."""

from __future__ import annotations

from torch import nn

import bayeskern as bk

from .weight_posterior import WeightPosteriorMethod


class VariationalInference(WeightPosteriorMethod):
    name = "vi"

    def build(self) -> nn.Module:
        a = self.config
        return bk.VI(
            self.backbone.model,
            init_std=a.vi_init_std,
            rho_scale=a.vi_rho_scale,
            temperature=a.vi_temperature,
            train_samples=a.vi_train_samples,
            **self.posterior_options(),
        )
