"""The methods ``bayeskern-finetune`` compares, by name: each trains from a fresh backbone and
returns predictive probabilities.  One class per method on a shared base; ``METHODS`` is the
registry the CLI reads.

* ``vanilla``    -- the deterministic baseline: Adam on the cross-entropy.
* ``vi``         -- mean-field Gaussian VI (``bayeskern.VI``), Adam on the ELBO.
* ``mc_dropout`` -- parameter-level MC-dropout (``bayeskern.MCDropout``) started from the MAP: its
  variational mean begins at the MAP weights and ``--dropout-epochs`` of Adam at ``--dropout-lr``
  optimise the dropout objective.  Normalisation-layer scales and shifts stay point estimates unless
  ``--dropout-norm``: dropping one switches off (or de-centres) a whole channel for every input, and
  with them dropped the predictive came out underconfident on the validation split.
* ``sgld``       -- ``bayeskern.BayesSGLD`` started from the MAP, ``--sgld-epochs`` of sampling into
  a ``SampleBank`` (burn-in, thinning).
* ``laplace``    -- ``bayeskern.DiagLaplace`` around the MAP, prior precision tuned on the
  validation split (``Laplace.precision_grid``).

The MAP is the vanilla fit: reused when ``vanilla`` ran first in the same invocation, otherwise
trained once (checkpointed under ``map/``) and shared by the methods that need it.  BayesDLL starts
every method from pretrained weights; without them the MAP plays that part for the methods that
refine a fit (MC-dropout, SGLD, Laplace).  Adam's learning rate is decayed to zero by a cosine over
each training run (``--lr-schedule``), so that MAP is a converged fit rather than a point of a
noisy constant-rate trajectory -- otherwise the extra low-rate epochs of the refining methods would
be credited to their being Bayesian.  The defaults of the Bayesian methods were chosen on the
validation split (metrics.json records it), never on test.

Under ``torchrun`` the trained modules run inside ``DistributedDataParallel`` (``Method.parallel``;
VI and MC-dropout through ``forward(inputs, targets)``, their loss), the SGLD bank keeps samples on
rank 0 only and Laplace fits each rank's shard of the training set (the Fisher is all-reduced).
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

import bayeskern as bk
from bayeskern.distributed import is_distributed, world_size

from .data import Splits
from .errors import UsageError
from .models import Backbone
from .training import EpochLoop


class Method:
    name = ""

    def __init__(
        self,
        args: argparse.Namespace,
        splits: Splits,
        make_backbone: Callable[[], Backbone],
        make_loop: Callable[..., EpochLoop],
        device: torch.device,
        shared: dict,
    ):
        """``shared`` carries results between the methods of one invocation (the vanilla MAP)."""
        self.args, self.splits, self.device, self.shared = args, splits, device, shared
        self.make_loop = make_loop
        self.backbone = make_backbone()
        self.backbone.model.to(device)
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
        """The pretrained weights when there are any (those the MAP replaced, after ``start_from_map``),
        else zero."""
        if not self.args.pretrained:
            return "zero"
        return self.pretrained_weights if self.pretrained_weights is not None else "pretrained"

    def param_groups(self, named: list[tuple[str, nn.Parameter]], lr: float) -> list[dict]:
        """Two groups of named parameters, so the (new) classifier head can take ``--lr-head``."""
        head = set(self.backbone.classifier)
        is_head = [any(name.replace("/", ".").endswith(h) for h in head) for name, _ in named]
        lr_head = self.args.lr_head if self.args.lr_head is not None else lr
        groups = [
            {"params": [pair for pair, h in zip(named, is_head) if not h], "lr": lr},
            {"params": [pair for pair, h in zip(named, is_head) if h], "lr": lr_head},
        ]
        return [g for g in groups if g["params"]]

    def parallel(self, module: nn.Module) -> nn.Module:
        """``module`` inside ``DistributedDataParallel`` under torch.distributed (gradients averaged)."""
        return DistributedDataParallel(module) if is_distributed() else module

    def eval_loader(self, dataset: Dataset):
        return self.loop.loader(dataset, shuffle=False)

    @torch.no_grad()
    def deterministic_probs(self, model: nn.Module, dataset: Dataset) -> Tensor:
        model.eval()
        chunks = []
        for inputs, _ in self.eval_loader(dataset):
            with self.loop.autocast():
                logits = model(inputs.to(self.device))
            chunks.append(F.softmax(logits.float(), dim=-1).cpu())
        return torch.cat(chunks)

    def mc_probs(self, posterior, dataset: Dataset) -> Tensor:
        prediction = bk.predict(
            posterior, self.eval_loader(dataset), num_samples=self.args.num_samples, compile=self.args.compile
        )
        return prediction.probs.float().cpu()

    def steps(self, epochs: int) -> int:
        """Optimizer steps of ``epochs`` epochs on this rank (its ``DistributedSampler`` share)."""
        per_rank = -(-self.num_data // world_size())
        return epochs * -(-per_rank // self.args.batch_size)

    def adam(self, named: list[tuple[str, nn.Parameter]], lr: float, loop: EpochLoop) -> tuple:
        """Adam over ``param_groups`` and, under ``--lr-schedule cosine``, its learning rates decayed
        to zero by a cosine over the ``loop``'s steps: ``lr_t = lr (1 + cos(pi t / steps)) / 2``."""
        optimizer = torch.optim.Adam(self.param_groups(named, lr))
        if self.args.lr_schedule == "constant":
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
        model = self.backbone.model
        net = self.parallel(model)
        optimizer, scheduler = self.adam(list(model.named_parameters()), self.args.lr, loop)
        self.train_supervised(
            model,
            {"model": model, "optimizer": optimizer},
            lambda x, y: F.cross_entropy(net(x), y),
            optimizer,
            loop=loop,
            scheduler=scheduler,
        )
        self.shared["map_state"] = copy.deepcopy(model.state_dict())

    def start_from_map(self) -> None:
        """Put the MAP into the backbone, fitting it first if no method has; the pretrained weights
        it replaces stay the prior mean."""
        if self.args.pretrained:
            self.pretrained_weights = {n: p.detach().clone() for n, p in self.backbone.model.named_parameters()}
        if "map_state" in self.shared:
            self.backbone.model.load_state_dict(self.shared["map_state"])
        else:
            self.train_map(self.make_loop("map"))


class Vanilla(Method):
    name = "vanilla"

    def train(self) -> None:
        self.train_map(self.loop)

    def predict(self, dataset: Dataset) -> Tensor:
        return self.deterministic_probs(self.backbone.model, dataset)


class _WeightPosteriorMethod(Method):
    """VI and MC-dropout: an nn.Module posterior trained by Adam on ``posterior.loss`` (called as
    ``posterior(inputs, targets)``, so that it runs through DDP when distributed)."""

    lr_option = "lr"  # the argument holding the learning rate

    def build(self) -> nn.Module:
        raise NotImplementedError

    def train(self) -> None:
        self.posterior = self.build().to(self.device)
        lr = getattr(self.args, self.lr_option)
        optimizer, scheduler = self.adam(list(self.posterior.named_parameters()), lr, self.loop)
        self.train_supervised(
            self.posterior,
            {"posterior": self.posterior, "optimizer": optimizer},
            self.parallel(self.posterior),
            optimizer,
            scheduler=scheduler,
        )

    def predict(self, dataset: Dataset) -> Tensor:
        self.posterior.eval()
        return self.mc_probs(self.posterior, dataset)


class VariationalInference(_WeightPosteriorMethod):
    name = "vi"

    def build(self) -> nn.Module:
        a = self.args
        return bk.VI(
            self.backbone.model,
            prior_mean=self.prior_mean,
            new_params=self.backbone.new_params,
            prior_std=a.prior_std,
            init_std=a.vi_init_std,
            num_data=self.num_data,
            temperature=a.vi_temperature,
            train_samples=a.vi_train_samples,
            seed=a.seed,
        )


class MCDropoutMethod(_WeightPosteriorMethod):
    name = "mc_dropout"
    lr_option = "dropout_lr"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loop = self.make_loop(self.name, epochs=self.args.dropout_epochs)

    def train(self) -> None:
        self.start_from_map()
        super().train()

    def build(self) -> nn.Module:
        a = self.args
        return bk.MCDropout(
            self.backbone.model,
            p=a.dropout_p,
            mode=a.dropout_mode,
            include_norm=a.dropout_norm,
            prior_mean=self.prior_mean,
            new_params=self.backbone.new_params,
            prior_std=a.prior_std,
            num_data=self.num_data,
            seed=a.seed,
        )


class SGLD(Method):
    name = "sgld"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loop = self.make_loop(self.name, epochs=self.args.sgld_epochs)

    def train(self) -> None:
        a, model = self.args, self.backbone.model
        self.start_from_map()
        optimizer = bk.BayesSGLD(
            self.param_groups(list(model.named_parameters()), a.sgld_lr),
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
        self.bank = bk.SampleBank(
            model, burnin=burnin, thin=a.sgld_thin, max_samples=a.num_samples, seed=a.seed, rank_zero_only=True
        )
        net = self.parallel(model)
        self.train_supervised(
            model,
            {"model": model, "optimizer": optimizer, "bank": self.bank},
            lambda x, y: F.cross_entropy(net(x), y),
            optimizer,
            after_step=self.bank.update,
        )

    def predict(self, dataset: Dataset) -> Tensor:
        self.backbone.model.eval()
        return self.mc_probs(self.bank, dataset)


class Laplace(Method):
    name = "laplace"

    def train(self) -> None:
        a, model = self.args, self.backbone.model
        self.start_from_map()
        self.laplace = bk.DiagLaplace(
            model,
            likelihood="classification",
            params=a.laplace_params,
            prior_mean=self.prior_mean,
            new_params=self.backbone.new_params,
            prior_precision=a.laplace_prior_precision,
            fisher_type=a.laplace_fisher,
        )
        model.eval()
        self.laplace.fit(self.eval_loader(self.loop.shard(self.splits.train)), progress=self.loop.show_progress)
        if a.laplace_optimize != "none":
            self.laplace.optimize_prior_precision(
                method=a.laplace_optimize, val_loader=self.eval_loader(self.splits.val), grid=self.precision_grid()
            )

    def precision_grid(self) -> list[float]:
        """The ``val_nll`` search: half-decade steps from the other methods' prior precision ``1 / sp^2``
        up to ``1e8 / sp^2`` (a few-shot MAP fits its training set, F is small, and the best precision
        sits high: at 1e4 the library's default grid ends on it)."""
        return (torch.logspace(0, 8, 17) / self.args.prior_std**2).tolist()

    def predict(self, dataset: Dataset) -> Tensor:
        self.laplace.model.eval()
        return self.mc_probs(self.laplace, dataset)


METHODS: dict[str, type[Method]] = {m.name: m for m in (Vanilla, VariationalInference, MCDropoutMethod, SGLD, Laplace)}
