"""``WeightPosteriorMethod``: what the methods whose posterior is an ``nn.Module`` trained by Adam
(VI, MC-dropout) share."""

from __future__ import annotations

from torch import Tensor, nn
from torch.utils.data import Dataset

from .base import Method


class WeightPosteriorMethod(Method):
    """VI and MC-dropout: an nn.Module posterior trained by Adam on ``posterior.loss`` (called as
    ``posterior(inputs, targets)``, so that it runs through DDP when distributed)."""

    lr_option = "lr"  # the argument holding the learning rate

    def build(self) -> nn.Module:
        raise NotImplementedError

    def posterior_options(self) -> dict:
        """The arguments VI and MC-dropout share: the selection, the prior and the likelihood."""
        a = self.config
        return dict(
            params=self.backbone.params,
            prior_mean=self.prior_mean,
            new_params=self.backbone.new_params,
            prior_std=a.prior_std,
            likelihood=self.likelihood,
            noise_std=self.noise_std,
            num_data=self.num_data,
            seed=a.seed,
        )

    def train(self) -> None:
        """Adam on the posterior's loss.  Under ``--fsdp`` the posterior is sharded (and the backbone's
        model with it), then gathered into a posterior on an unsharded copy of the backbone, which
        rank 0 evaluates; the per-epoch checkpoints then keep the scheduler only."""
        self.fit_noise_std()
        with self.parallel.restoring(self.backbone):
            posterior = self.parallel.shard(self.build().to(self.device))
            lr = getattr(self.config, self.lr_option)
            optimizer, scheduler = self.adam(list(posterior.named_parameters()), lr, self.loop)
            self.train_supervised(
                posterior,
                self.parallel.checkpointed({"posterior": posterior, "optimizer": optimizer}),
                self.parallel.wrap(posterior),
                optimizer,
                scheduler=scheduler,
            )
        self.posterior = self.parallel.unsharded(posterior, lambda: self.build().to(self.device))

    def predict(self, dataset: Dataset) -> Tensor:
        return self.predictive(dataset)[0]

    def predictive(self, dataset: Dataset) -> tuple[Tensor, Tensor]:
        self.posterior.eval()
        return self.mc_predictive(self.posterior, dataset)
