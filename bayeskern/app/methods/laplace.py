"""``laplace``: ``bayeskern.DiagLaplace`` around the MAP, its prior precision tuned on the validation split."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

import bayeskern as bk

from .base import Method


class Laplace(Method):
    name = "laplace"
    posterior: type[bk.Laplace] = bk.DiagLaplace  # the Laplace structure; the rest of the method is shared

    sharded_fit = True  # under --fsdp, fit on the sharded backbone (the posterior supports it)

    def train(self) -> None:
        """Under ``--fsdp`` (``sharded_fit``) the curvature is fitted on the sharded backbone, every rank
        on as many examples (``floor(N / K)``: FSDP2 gathers per batch, so the ranks need as many
        batches; up to K - 1 examples are left out), then gathered into an unsharded posterior on every
        rank, whose prior precision is tuned there (a sharded predictive runs eagerly, one sample per
        call) and which rank 0 evaluates.  A posterior that cannot fit a sharded model fits the whole
        model on every rank instead, each on its share of the data, the curvature all-reduced."""
        a = self.config
        self.start_from_map()
        if self.sharded_fit:
            with self.parallel.sharded_backbone(self.backbone):
                laplace = self.fitted(self.backbone.model)
            self.laplace = self.parallel.unsharded(laplace, lambda: self.build(self.backbone.model))
        else:
            self.laplace = self.fitted(self.backbone.model)
        self.backbone.model.eval()
        if a.laplace_optimize != "none":
            self.laplace.optimize_prior_precision(
                method=a.laplace_optimize,
                val_loader=self.predict_loader(self.splits.val),
                grid=self.precision_grid(),
                pred_type="glm",
                link_approx="probit",
            )

    def fitted(self, model: nn.Module) -> bk.Laplace:
        """The posterior around ``model`` fitted on this rank's share of the training split."""
        laplace = self.build(model)
        model.eval()
        data = self.parallel.equal_shares(self.splits.train)
        laplace.fit(self.eval_loader(self.loop.shard(data)), progress=self.loop.show_progress)
        return laplace

    def build(self, model: nn.Module) -> bk.Laplace:
        """The posterior (``posterior``) around ``model`` with the run's Laplace options."""
        a = self.config
        return self.posterior(
            model,
            likelihood=self.likelihood,
            noise_std=self.noise_std,
            params=a.laplace_selection or self.backbone.params,
            prior_mean=self.prior_mean,
            new_params=self.backbone.new_params,
            prior_precision=a.laplace_prior_precision,
            fisher_type=a.laplace_fisher,
        )

    def precision_grid(self) -> list[float]:
        """The ``val_nll`` search: ``--laplace-grid-points`` log-spaced values from the other methods'
        prior precision ``1 / sp^2`` up to ``1e8 / sp^2`` (17: half-decade steps).  The range reaches
        high precisions because a few-shot MAP fits its training set, so the Fisher F is small.  Each
        value is scored by the GLM probit over the validation split: the linearised predictive the
        method predicts with (``predictive``), its link in closed form, so the search has no
        Monte-Carlo noise and costs C + 1 passes per batch instead of ``--num-samples`` products."""
        return (torch.logspace(0, 8, self.config.laplace_grid_points) / self.config.prior_std**2).tolist()

    def predict(self, dataset: Dataset) -> Tensor:
        return self.predictive(dataset)[0]

    def predictive(self, dataset: Dataset) -> tuple[Tensor, Tensor]:
        """The linearised (GLM) predictive.  Classification: the probabilities from its probit link,
        the closed form the ``val_nll`` search scored (``precision_grid``), which an MC estimate at
        ``--num-samples`` draws would bias (E log of a mean of S draws < log of the mean: the NLL
        rises as S falls); the mutual information (the OOD score) from its MC link, the only one with
        samples.  Regression: the closed-form mean and variance.  A sharded fit's posterior, gathered
        before it predicts, takes it too."""
        self.laplace.model.eval()
        if self.likelihood == "regression":
            return self.mc_predictive(self.laplace, dataset, pred_type="glm", link_approx="probit")
        _, mutual_information = self.mc_predictive(self.laplace, dataset, pred_type="glm", link_approx="mc")
        probit = bk.predict(self.laplace, self.predict_loader(dataset), pred_type="glm", link_approx="probit")
        return probit.probs.float().cpu(), mutual_information
