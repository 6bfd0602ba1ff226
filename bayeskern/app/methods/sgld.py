"""``sgld``: ``bayeskern.BayesSGLD`` started from the MAP, its thinned samples in a ``SampleBank``."""

from __future__ import annotations

from torch import Tensor, nn
from torch.utils.data import Dataset

import bayeskern as bk

from ..errors import UsageError
from .base import Method


class SGLD(Method):
    name = "sgld"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loop = self.make_loop(self.name, epochs=self.config.sgld_epochs)

    def train(self) -> None:
        """Under ``--fsdp`` the chain runs on the sharded backbone and the bank stores each rank's
        shards; both are then gathered into an unsharded model and bank that rank 0 evaluates."""
        self.start_from_map()
        with self.parallel.sharded_backbone(self.backbone):
            bank, burnin = self.sample(self.backbone.model)
        self.bank = self.parallel.unsharded(
            bank, lambda: self.sample_bank(self.backbone.model, burnin, rank_zero_only=False)
        )

    def sample(self, model: nn.Module) -> tuple[bk.SampleBank, int]:
        """BayesSGLD on ``model`` from its current weights: the bank of its thinned samples and the
        burn-in steps."""
        a = self.config
        optimizer = bk.BayesSGLD(
            self.param_groups(self.trained(model), a.sgld_lr),
            lr=a.sgld_lr,
            num_data=self.num_data,
            prior_mean=self.prior_mean,
            new_params=self.backbone.new_params,
            prior_std=a.prior_std,
            temperature=a.sgld_temperature,
            seed=a.seed,
        )
        steps = self.steps(a.sgld_epochs)
        burnin = int(a.sgld_burnin * steps)
        if steps - burnin < a.sgld_thin:
            raise UsageError(
                f"SGLD keeps no sample: {steps} steps, {burnin} of burn-in, thinning {a.sgld_thin}; "
                "raise --sgld-epochs or lower --sgld-burnin / --sgld-thin"
            )
        bank = self.sample_bank(model, burnin, rank_zero_only=not self.parallel.sharded)
        net = self.parallel.wrap(model)
        self.train_supervised(
            model,
            self.parallel.checkpointed({"model": model, "optimizer": optimizer, "bank": bank}),
            lambda x, y: self.data_loss(self.logits(net, x), y),
            optimizer,
            after_step=bank.update,
        )
        return bank, burnin

    def sample_bank(self, model: nn.Module, burnin: int, rank_zero_only: bool) -> bk.SampleBank:
        a = self.config
        return bk.SampleBank(
            model,
            params=self.backbone.params,
            burnin=burnin,
            thin=a.sgld_thin,
            max_samples=a.num_samples,
            seed=a.seed,
            rank_zero_only=rank_zero_only,
            likelihood=self.likelihood,
            noise_std=self.noise_std,
        )

    def predict(self, dataset: Dataset) -> Tensor:
        return self.predictive(dataset)[0]

    def predictive(self, dataset: Dataset) -> tuple[Tensor, Tensor]:
        self.backbone.model.eval()
        return self.mc_predictive(self.bank, dataset)
