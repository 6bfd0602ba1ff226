"""``ivon``: ``bayeskern.IVON`` as the fine-tuning run's optimizer, from the pretrained weights like
the plain fit; its posterior ``N(m, sigma^2)`` predicts by sampling (``--num-samples``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

import bayeskern as bk

from ..parallel import gathered
from .base import Method


class IVONMethod(Method):
    name = "ivon"
    in_all = False  # run when named: its defaults are still being measured (issue "IVON")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loop = self.make_loop(self.name, epochs=self.config.ivon_epochs or self.config.epochs)

    def train(self) -> None:
        """One sample per step inside ``sampled_params``, then ``step()``; the learning rate follows
        ``--lr-schedule`` over the run (cosine to zero by default).  Under ``torchrun`` the ranks draw
        the same sample (one seed, streams advancing together), so DDP's or FSDP2's averaged gradient
        gives the global batch's Hessian estimate; under ``--fsdp`` the backbone trains sharded and the
        posterior's stds are gathered with it."""
        a = self.config
        self.fit_noise_std()
        with self.parallel.sharded_backbone(self.backbone):
            model = self.backbone.model
            optimizer = bk.IVON(
                self.param_groups(self.trained(model), a.ivon_lr),
                lr=a.ivon_lr,
                num_data=self.num_data,
                prior_std=a.prior_std,
                prior_mean=self.prior_mean,
                new_params=self.backbone.new_params,
                temperature=a.ivon_temperature,
                hess_init=a.ivon_hess_init,
                beta2=a.ivon_beta2,
                seed=a.seed,
            )
            self.fit(model, optimizer)
            names = {p: n for n, p in model.named_parameters()}
            params = [p for group in optimizer.param_groups for p in group["params"]]
            std = gathered({names[p]: s for p, s in zip(params, optimizer.std())})
        model = self.backbone.model  # the unsharded trained model under --fsdp
        mean = {n: p.detach() for n, p in model.named_parameters() if n in std}
        self.posterior = bk.DiagonalGaussian(
            model, mean, std, seed=optimizer.seed, likelihood=self.likelihood, noise_std=self.noise_std
        )

    def fit(self, model: nn.Module, optimizer: bk.IVON) -> None:
        """The epochs of ``optimizer`` on ``model`` (DDP-wrapped under ``torchrun``)."""
        a = self.config
        stateful: dict = {"model": model, "optimizer": optimizer}
        scheduler = None
        if a.lr_schedule == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.steps(self.loop.epochs))
            stateful["scheduler"] = scheduler
        model.train()
        net = self.parallel.wrap(model)

        def step(inputs: Tensor, targets: Tensor) -> float:
            with optimizer.sampled_params(train=True):
                with self.loop.autocast():
                    loss = self.data_loss(self.logits(net, inputs), targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            return float(loss.detach())

        self.loop.run(self.splits.train, self.parallel.checkpointed(stateful), step)

    def predict(self, dataset: Dataset) -> Tensor:
        return self.predictive(dataset)[0]

    def predictive(self, dataset: Dataset) -> tuple[Tensor, Tensor]:
        self.backbone.model.eval()
        return self.mc_predictive(self.posterior, dataset)
