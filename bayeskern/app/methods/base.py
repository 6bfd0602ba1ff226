"""``Method``: what every method of ``bayeskern-finetune`` shares: the MAP it may start from, Adam and
its schedule, the training step, the loaders and the predictive."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

import bayeskern as bk
from bayeskern.batches import Inputs, as_call, inputs_of, logits_of, move_to
from bayeskern.likelihoods import negative_log_likelihood

from ..parallel import Parallel
from ..shared import Backbone, Splits
from ..training import EpochLoop

if TYPE_CHECKING:  # the config names the methods (config.METHOD_NAMES); it is only read here
    from ..config import RunConfig


class Method:
    name = ""
    in_all = True  # run by ``--method all`` (the default); a method too costly for the default job opts out

    def __init__(
        self,
        config: RunConfig,
        splits: Splits,
        make_backbone: Callable[[], Backbone],
        make_loop: Callable[..., EpochLoop],
        shared: dict,
        parallel: Parallel,
    ):
        """``shared`` carries results between the methods of one invocation (the vanilla MAP);
        ``parallel`` is how they train over the ranks."""
        self.config, self.splits, self.shared, self.parallel = config, splits, shared, parallel
        self.device = config.device
        self.make_loop = make_loop
        self.backbone = make_backbone()
        self.backbone.model.to(self.device)
        self.loop = make_loop(self.name)
        self.num_data = len(splits.train)
        self.pretrained_weights: dict[str, Tensor] | None = None  # kept by start_from_map

    # -- to implement ----------------------------------------------------------------------------
    def train(self) -> None:
        raise NotImplementedError

    def predict(self, dataset: Dataset) -> Tensor:
        """Predictive probabilities (N, C), float32 on the CPU."""
        raise NotImplementedError

    # -- shared pieces ---------------------------------------------------------------------------
    @property
    def prior_mean(self) -> str | dict[str, Tensor]:
        """The pretrained weights when there are any (those the MAP replaced, after ``start_from_map``)
        and ``--prior-mean pretrained``, else zero."""
        if not self.config.pretrained or self.config.prior_mean == "zero":
            return "zero"
        return self.pretrained_weights if self.pretrained_weights is not None else "pretrained"

    def param_groups(self, named: list[tuple[str, nn.Parameter]], lr: float) -> list[dict]:
        """Two groups of named parameters, so the (new) classifier head can take ``--lr-head``."""
        head = set(self.backbone.classifier)
        is_head = [any(name.replace("/", ".").endswith(h) for h in head) for name, _ in named]
        lr_head = self.config.lr_head if self.config.lr_head is not None else lr
        groups = [
            {"params": [pair for pair, h in zip(named, is_head) if not h], "lr": lr},
            {"params": [pair for pair, h in zip(named, is_head) if h], "lr": lr_head},
        ]
        return [g for g in groups if g["params"]]

    def trained(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """The named parameters training updates: all, or ``Backbone.params`` (LoRA: adapters and head)."""
        chosen = self.backbone.params
        if chosen is None:
            return list(model.named_parameters())
        return [(name, p) for name, p in model.named_parameters() if name in set(chosen)]

    @staticmethod
    def logits(net: nn.Module, inputs: Inputs) -> Tensor:
        """``net`` called on ``inputs`` (a tensor, or a Mapping of keyword inputs), its logits read
        from the output (``bayeskern.batches``)."""
        args, kwargs = as_call(inputs)
        return logits_of(net(*args, **kwargs), inputs)

    @property
    def likelihood(self) -> str:
        """``"classification"``, or ``"regression"`` on a tabular dataset (``bayeskern.app.regression``)."""
        return self.splits.likelihood

    @property
    def noise_std(self) -> float:
        """The regression likelihood's sigma: the plain fit's validation RMSE once it is fitted (1 before)."""
        return float(self.shared.get("noise_std", 1.0))

    def data_loss(self, output: Tensor, targets: Tensor) -> Tensor:
        """The mean negative log-likelihood: cross-entropy, or Gaussian with std ``noise_std``."""
        return negative_log_likelihood(output, targets, self.likelihood, self.noise_std)

    def fit_noise_std(self) -> None:
        """Regression: fit the plain fit if no method has (the backbone's weights are kept), so that
        ``noise_std`` is known before a method that does not start from it (VI) trains."""
        if self.likelihood == "regression" and "noise_std" not in self.shared:
            initial = copy.deepcopy(self.backbone.model.state_dict())
            self.train_map(self.make_loop("map"))
            self.backbone.model.load_state_dict(initial)

    def eval_loader(self, dataset: Dataset):
        return self.loop.loader(dataset, shuffle=False)

    def predict_loader(self, dataset: Dataset):
        """Batches of ``--eval-batch-size`` for the predictive: a posterior's weight samples not kept
        in memory are redrawn for every batch, so fewer, larger batches cost less."""
        return dataclasses.replace(self.loop, batch_size=self.config.eval_batch_size).loader(dataset, shuffle=False)

    @torch.no_grad()
    def deterministic_probs(self, model: nn.Module, dataset: Dataset) -> Tensor:
        model.eval()
        chunks = []
        for batch in self.predict_loader(dataset):
            with self.loop.autocast():
                logits = self.logits(model, move_to(inputs_of(batch), self.device))
            regression = self.likelihood == "regression"
            chunks.append((logits.float() if regression else F.softmax(logits.float(), dim=-1)).cpu())
        return torch.cat(chunks)

    def predictive(self, dataset: Dataset) -> tuple[Tensor, Tensor]:
        """Predictive probabilities (N, C) and the mutual information between prediction and weights
        (N,), float32 on the CPU; a point estimate has none (zero).  Regression: the predictive mean
        and variance (N, 1), the variance including ``noise_std ** 2``."""
        probs = self.predict(dataset)
        if self.likelihood == "regression":
            return probs, torch.full_like(probs, self.noise_std**2)
        return probs, torch.zeros(len(probs))

    def mc_predictive(self, posterior, dataset: Dataset, **options) -> tuple[Tensor, Tensor]:
        """``predictive`` of a posterior's sampled predictive (``bk.predict`` with ``options``, e.g. the
        linearised one's MC link): MI = H[probs] - mean_s H[p_s]."""
        prediction = bk.predict(
            posterior,
            self.predict_loader(dataset),
            num_samples=self.config.num_samples,
            compile=self.config.compile,
            **options,
        )
        if self.likelihood == "regression":
            return cast(Tensor, prediction.mean).float().cpu(), cast(Tensor, prediction.variance).float().cpu()
        mutual_information = (prediction.entropy - prediction.expected_entropy).clamp_min(0.0)
        return prediction.probs.float().cpu(), mutual_information.float().cpu()

    def steps(self, epochs: int) -> int:
        """Optimizer steps of ``epochs`` epochs on this rank (its ``DistributedSampler`` share)."""
        per_rank = -(-self.num_data // self.parallel.world_size)
        return epochs * -(-per_rank // self.config.batch_size)

    def adam(self, named: list[tuple[str, nn.Parameter]], lr: float, loop: EpochLoop) -> tuple:
        """Adam over ``param_groups`` and, under ``--lr-schedule cosine``, its learning rates decayed
        to zero by a cosine over the ``loop``'s steps: ``lr_t = lr (1 + cos(pi t / steps)) / 2``."""
        optimizer = torch.optim.Adam(self.param_groups(named, lr))
        if self.config.lr_schedule == "constant":
            return optimizer, None
        return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.steps(loop.epochs))

    def train_supervised(
        self,
        model: nn.Module,
        stateful: dict,
        loss_fn,
        optimizer,
        after_step=None,
        loop: EpochLoop | None = None,
        scheduler=None,
    ) -> None:
        """The common step: loss, backward, optimizer and scheduler step (and a hook, e.g. the sample bank)."""
        model.train()
        if scheduler is not None:
            stateful = {**stateful, "scheduler": scheduler}

        def step(inputs: Tensor, targets: Tensor) -> float:
            with self.loop.autocast():
                loss = loss_fn(inputs, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if after_step is not None:
                after_step()
            return float(loss.detach())

        (loop or self.loop).run(self.splits.train, stateful, step)

    def train_map(self, loop: EpochLoop) -> None:
        """The deterministic fit of the backbone (Adam on the mean cross-entropy); shared as the MAP."""
        with self.parallel.sharded_backbone(self.backbone):
            model = self.backbone.model
            net = self.parallel.wrap(model)
            optimizer, scheduler = self.adam(self.trained(model), self.config.lr, loop)
            self.train_supervised(
                model,
                self.parallel.checkpointed({"model": model, "optimizer": optimizer}),
                lambda x, y: self.data_loss(self.logits(net, x), y),
                optimizer,
                loop=loop,
                scheduler=scheduler,
            )
        model = self.backbone.model
        self.shared["map_state"] = copy.deepcopy(model.state_dict())
        if self.likelihood == "regression":  # sigma: the maximum-likelihood fit of the validation residuals
            mean = self.deterministic_probs(model, self.splits.val)
            targets = torch.stack([self.splits.val[i][1] for i in range(len(self.splits.val))])
            self.shared["noise_std"] = float((mean - targets.reshape(mean.shape)).square().mean().sqrt())

    def start_from_map(self) -> None:
        """Put the MAP into the backbone, fitting it first if no method has; the pretrained weights
        it replaces stay the prior mean."""
        if self.config.pretrained:
            self.pretrained_weights = {n: p.detach().clone() for n, p in self.backbone.model.named_parameters()}
        if "map_state" in self.shared:
            self.backbone.model.load_state_dict(self.shared["map_state"])
        else:
            self.train_map(self.make_loop("map"))
