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
With ``--fsdp`` every method trains sharded with FSDP2 instead (``bayeskern.distributed.fully_shard``:
the backbone for the plain fit, SGLD and Laplace, the posterior for VI and MC-dropout), using the
library's sharded support (BayesSGLD and a SampleBank of shards, ``DiagLaplace.fit`` on the sharded
model, its prior precision tuned sharded); once trained, each is gathered into an unsharded copy
(``gathered``, a collective) that rank 0 evaluates as without ``--fsdp``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, Subset

import bayeskern as bk
from bayeskern.batches import Inputs, as_call, inputs_of, logits_of, move_to
from bayeskern.distributed import is_distributed, is_sharded, world_size
from bayeskern.likelihoods import negative_log_likelihood

from .data import Splits
from .errors import UsageError
from .models import Backbone
from .training import EpochLoop


def gathered(state):
    """``state`` (a state_dict, nested dicts and lists allowed) with every DTensor gathered into a
    full tensor: a collective, every rank must call it."""
    if isinstance(state, dict):
        return {k: gathered(v) for k, v in state.items()}
    if isinstance(state, list):
        return [gathered(v) for v in state]
    return state.full_tensor() if isinstance(state, Tensor) and is_sharded(state) else state


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
        """The pretrained weights when there are any (those the MAP replaced, after ``start_from_map``)
        and ``--prior-mean pretrained``, else zero."""
        if not self.args.pretrained or getattr(self.args, "prior_mean", "pretrained") == "zero":
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

    def parallel(self, module: nn.Module) -> nn.Module:
        """``module`` inside ``DistributedDataParallel`` under torch.distributed (gradients averaged)."""
        return DistributedDataParallel(module) if is_distributed() else module

    @property
    def sharded(self) -> bool:
        """``--fsdp``: train with FSDP2 instead of DDP (UsageError without a process group)."""
        if not getattr(self.args, "fsdp", False):
            return False
        if not is_distributed():
            raise UsageError("--fsdp needs torchrun (an initialised process group)")
        return True

    def shard_backbone(self) -> nn.Module:
        """``--fsdp``: shard the backbone's model in place per block (``bk.distributed.fully_shard``, a
        collective); returns an unsharded copy taken first, for ``unshard_backbone``."""
        unsharded = copy.deepcopy(self.backbone.model)
        bk.distributed.fully_shard(self.backbone.model)
        return unsharded

    def unshard_backbone(self, unsharded: nn.Module) -> None:
        """Load the sharded model's gathered state (a collective; buffers such as BatchNorm statistics
        are rank-local under FSDP2, each rank keeps its own) into ``unsharded`` and make it the model."""
        unsharded.load_state_dict(gathered(self.backbone.model.state_dict()))
        self.backbone.model = unsharded

    def eval_loader(self, dataset: Dataset):
        return self.loop.loader(dataset, shuffle=False)

    def predict_loader(self, dataset: Dataset):
        """Batches of ``--eval-batch-size`` for the predictive: a posterior's weight samples not kept
        in memory are redrawn for every batch, so fewer, larger batches cost less."""
        return dataclasses.replace(self.loop, batch_size=self.args.eval_batch_size).loader(dataset, shuffle=False)

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

    def mc_predictive(self, posterior, dataset: Dataset) -> tuple[Tensor, Tensor]:
        """``predictive`` of a posterior's Monte-Carlo predictive: MI = H[probs] - mean_s H[p_s]."""
        prediction = bk.predict(
            posterior, self.predict_loader(dataset), num_samples=self.args.num_samples, compile=self.args.compile
        )
        if self.likelihood == "regression":
            return cast(Tensor, prediction.mean).float().cpu(), cast(Tensor, prediction.variance).float().cpu()
        mutual_information = (prediction.entropy - prediction.expected_entropy).clamp_min(0.0)
        return prediction.probs.float().cpu(), mutual_information.float().cpu()

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
        unsharded = self.shard_backbone() if self.sharded else None
        net = model if unsharded is not None else self.parallel(model)
        optimizer, scheduler = self.adam(self.trained(model), self.args.lr, loop)
        self.train_supervised(
            model,
            {} if unsharded is not None else {"model": model, "optimizer": optimizer},
            lambda x, y: self.data_loss(self.logits(net, x), y),
            optimizer,
            loop=loop,
            scheduler=scheduler,
        )
        if unsharded is not None:
            self.unshard_backbone(unsharded)
            model = self.backbone.model
        self.shared["map_state"] = copy.deepcopy(model.state_dict())
        if self.likelihood == "regression":  # sigma: the maximum-likelihood fit of the validation residuals
            mean = self.deterministic_probs(model, self.splits.val)
            targets = torch.stack([self.splits.val[i][1] for i in range(len(self.splits.val))])
            self.shared["noise_std"] = float((mean - targets.reshape(mean.shape)).square().mean().sqrt())

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

    def posterior_options(self) -> dict:
        """The arguments VI and MC-dropout share: the selection, the prior and the likelihood."""
        a = self.args
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
        self.fit_noise_std()
        if self.sharded:
            self.train_sharded()
            return
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

    def train_sharded(self) -> None:
        """``--fsdp``: train the posterior sharded with FSDP2 (``bayeskern.distributed.fully_shard``),
        then gather it into an unsharded posterior on a copy of the backbone, which rank 0 evaluates.
        The per-epoch checkpoints keep the scheduler only (``--fsdp`` excludes ``--resume``)."""
        unsharded_model = copy.deepcopy(self.backbone.model)
        sharded = self.build().to(self.device)
        bk.distributed.fully_shard(sharded)
        lr = getattr(self.args, self.lr_option)
        optimizer, scheduler = self.adam(list(sharded.named_parameters()), lr, self.loop)
        self.train_supervised(sharded, {}, sharded, optimizer, scheduler=scheduler)
        state = gathered(sharded.state_dict())
        self.backbone.model = unsharded_model
        self.posterior = self.build().to(self.device)
        self.posterior.load_state_dict(state)

    def predict(self, dataset: Dataset) -> Tensor:
        return self.predictive(dataset)[0]

    def predictive(self, dataset: Dataset) -> tuple[Tensor, Tensor]:
        self.posterior.eval()
        return self.mc_predictive(self.posterior, dataset)


class VariationalInference(_WeightPosteriorMethod):
    name = "vi"

    def build(self) -> nn.Module:
        a = self.args
        return bk.VI(
            self.backbone.model,
            init_std=a.vi_init_std,
            temperature=a.vi_temperature,
            train_samples=a.vi_train_samples,
            **self.posterior_options(),
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
            **self.posterior_options(),
        )


class SGLD(Method):
    name = "sgld"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loop = self.make_loop(self.name, epochs=self.args.sgld_epochs)

    def train(self) -> None:
        """Under ``--fsdp`` the chain runs on the sharded backbone and the bank stores each rank's
        shards; both are then gathered into an unsharded model and bank that rank 0 evaluates."""
        a = self.args
        self.start_from_map()
        unsharded = self.shard_backbone() if self.sharded else None
        model = self.backbone.model
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
        self.bank = self.sample_bank(model, burnin, rank_zero_only=unsharded is None)
        net = model if unsharded is not None else self.parallel(model)
        self.train_supervised(
            model,
            {} if unsharded is not None else {"model": model, "optimizer": optimizer, "bank": self.bank},
            lambda x, y: self.data_loss(self.logits(net, x), y),
            optimizer,
            after_step=self.bank.update,
        )
        if unsharded is not None:
            state = gathered(self.bank.state_dict())
            self.unshard_backbone(unsharded)
            self.bank = self.sample_bank(self.backbone.model, burnin, rank_zero_only=False)
            self.bank.load_state_dict(state)

    def sample_bank(self, model: nn.Module, burnin: int, rank_zero_only: bool) -> bk.SampleBank:
        a = self.args
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


class Laplace(Method):
    name = "laplace"

    def train(self) -> None:
        """Under ``--fsdp`` the Fisher is fitted on the sharded backbone, every rank on as many examples
        (``floor(N / K)``: FSDP2 gathers per batch, so the ranks need as many batches; up to K - 1
        examples are left out), then gathered into an unsharded DiagLaplace on every rank, whose prior
        precision is tuned there (a sharded predictive runs eagerly, one sample per call: several
        times slower) and which rank 0 evaluates."""
        a = self.args
        self.start_from_map()
        unsharded = self.shard_backbone() if self.sharded else None
        model = self.backbone.model
        self.laplace = self.diag_laplace(model)
        model.eval()
        data = self.splits.train
        if unsharded is not None:
            data = Subset(data, range(len(data) - len(data) % world_size()))
        self.laplace.fit(self.eval_loader(self.loop.shard(data)), progress=self.loop.show_progress)
        if unsharded is not None:
            state = gathered(self.laplace.state_dict())
            self.unshard_backbone(unsharded)
            self.laplace = self.diag_laplace(self.backbone.model)
            self.laplace.load_state_dict(state)
            self.backbone.model.eval()
        if a.laplace_optimize != "none":
            self.laplace.optimize_prior_precision(
                method=a.laplace_optimize,
                val_loader=self.predict_loader(self.splits.val),
                grid=self.precision_grid(),
                num_samples=a.num_samples,
            )

    def diag_laplace(self, model: nn.Module) -> bk.DiagLaplace:
        a = self.args
        return bk.DiagLaplace(
            model,
            likelihood=self.likelihood,
            noise_std=self.noise_std,
            params=a.laplace_params or self.backbone.params,
            prior_mean=self.prior_mean,
            new_params=self.backbone.new_params,
            prior_precision=a.laplace_prior_precision,
            fisher_type=a.laplace_fisher,
        )

    def precision_grid(self) -> list[float]:
        """The ``val_nll`` search: ``--laplace-grid-points`` log-spaced values from the other methods'
        prior precision ``1 / sp^2`` up to ``1e8 / sp^2`` (17: half-decade steps; a few-shot MAP fits its
        training set, F is small, and the best precision sits high: at 1e4 the library's default grid
        ends on it).  Each value costs one ``--num-samples`` predictive over the validation split."""
        return (torch.logspace(0, 8, self.args.laplace_grid_points) / self.args.prior_std**2).tolist()

    def predict(self, dataset: Dataset) -> Tensor:
        return self.predictive(dataset)[0]

    def predictive(self, dataset: Dataset) -> tuple[Tensor, Tensor]:
        self.laplace.model.eval()
        return self.mc_predictive(self.laplace, dataset)


METHODS: dict[str, type[Method]] = {m.name: m for m in (Vanilla, VariationalInference, MCDropoutMethod, SGLD, Laplace)}
