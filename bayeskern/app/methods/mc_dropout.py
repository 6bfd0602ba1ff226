"""``mc_dropout``: parameter-level MC-dropout (``bayeskern.MCDropout``) started from the MAP."""

from __future__ import annotations

from torch import nn

import bayeskern as bk

from .weight_posterior import WeightPosteriorMethod


class MCDropoutMethod(WeightPosteriorMethod):
    name = "mc_dropout"
    lr_option = "dropout_lr"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loop = self.make_loop(self.name, epochs=self.config.dropout_epochs)

    def train(self) -> None:
        self.start_from_map()
        super().train()

    def build(self) -> nn.Module:
        a = self.config
        return bk.MCDropout(
            self.backbone.model,
            p=a.dropout_p,
            mode=a.dropout_mode,
            include_norm=a.dropout_norm,
            **self.posterior_options(),
        )
