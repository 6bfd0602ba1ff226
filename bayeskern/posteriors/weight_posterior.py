"""``WeightPosterior``: the machinery VI and MC-dropout share (posteriors trained by gradient descent).

``WeightPosterior`` is an ``nn.Module`` wrapping an unmodified network.  The network is *held, not
registered*: its code and its parameter objects are never touched.  The wrapper registers

* the variational parameters of the Bayesian weights (defined by the subclass: mu, rho, ...),
* trainable copies of every other trainable parameter (``point``: ordinary point estimates) and
  copies of the buffers (``buffers_``: BatchNorm running statistics update in place as usual);
  frozen parameters (``requires_grad=False``, e.g. the base weights of a PEFT model) are read from
  the model at every call and never copied,
* the prior snapshot (``prior``) and the noise state ``rng_state = (base seed, steps taken)``,

so ``post.parameters()`` is everything an optimizer trains and ``state_dict`` captures a run,
including where the noise stream is.  A forward pass draws weights and runs the network through
``torch.func.functional_call``.  ``sample(i)`` and ``mean()`` return the Bayesian tensors only;
``fixed_tensors()`` returns the point estimates and buffers (docs/vocabulary.md).  Inputs, loader
batches and model outputs follow ``bayeskern.batches`` (tensors, tuples, Mappings with ``labels``,
outputs with ``logits``, or ``output_fn``).

Noise (docs/design.md, "Noise"): parameter ``k`` owns Philox elements ``[offset_k, offset_k + numel_k)``
(``ops.philox.tensor_offsets``).  Training call ``t`` uses seed ``(base + (t + 1) * 0x9E3779B97F4A7C15)
mod 2**63`` and sample ``s`` of the call uses ``stream = s``; ``sample(index)`` uses seed ``base`` and
``stream = index``, so it is deterministic in ``index``.

Data parallel (``torch.distributed``): wrap the posterior in ``DistributedDataParallel`` and call the
wrapped module with the targets, ``loss = ddp_post(inputs, targets)``: ``forward`` then returns
``loss(inputs, targets)`` through DDP's hooks, so the variational parameters' gradients are averaged
like any others and the replicas stay identical (calling ``ddp_post.module.loss`` would skip DDP's
gradient synchronisation).  DDP broadcasts ``rng_state`` with the buffers, so every rank uses the same
training seed; the streams are folded with the rank (``s + (rank << 32)``, ``distributed.rank_stream``),
so each rank draws its own weights: a K-rank step averages K * S independent draws (variance
reduction).  Rank 0 and a single process use ``stream = s`` as above; ``sample(index)`` is the same on
every rank.

Sharded (FSDP2; ``bayeskern.distributed.fully_shard(posterior)``, docs/guide/distributed.md): the held
model is sharded per block and becomes the posterior's workspace, every variational parameter, point
estimate and prior tensor is a DTensor laid out like the model parameter it stands for.  A training
call draws one global sample (stream 0 on every rank) on each rank's local shards, with the Philox
counters of the global elements (``offset + sharding.element_offset``), writes it into the model's
sharded parameters and runs the model, whose blocks FSDP2 gathers one at a time; the gradients FSDP2
reduce-scatters onto the model's parameters are chained to the variational ones at the end of
``backward()`` (``_ChainSharded``).  The regulariser is summed over the ranks
(``sharding.global_sum``).  So a sharded step equals the single-process step on the global batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..batches import LABELS, Inputs, OutputFn, as_call, logits_of, move_to, split_batch
from ..distributed.fsdp import shard_model
from ..distributed.ranks import rank_stream
from ..distributed.sharding import (
    common_mesh,
    element_offset,
    from_local_like,
    global_sum,
    is_sharded,
    local_tensor,
    shard_copy,
)
from ..likelihoods import LIKELIHOODS, negative_log_likelihood
from ..ops import philox
from ..validation import check_choice, check_count, check_positive
from .prior import PriorMean, PriorStd, mangle
from .selection import ParamSelection
from .setup import PosteriorSetup

Criterion = Callable[[Any, Tensor], Tensor]


def step_seed(base: int, step: int) -> int:
    """The Philox seed of training call ``step`` (0-based) of a posterior with base seed ``base``."""
    return (base + (step + 1) * philox.WEYL_INCREMENT) % 2**63


class _Store(nn.Module):
    """A flat container of parameters or buffers keyed by (mangled) parameter names."""

    def parameters_by_name(self) -> dict[str, nn.Parameter]:
        """The stored parameters (``_parameters``, which never holds None here)."""
        return cast(dict[str, nn.Parameter], self._parameters)

    def buffers_by_name(self) -> dict[str, Tensor]:
        """The stored buffers (``_buffers``, which never holds None here)."""
        return cast(dict[str, Tensor], self._buffers)


def _local_std(sp: float | Tensor) -> float | Tensor:
    return local_tensor(sp) if isinstance(sp, Tensor) else sp


def _check_equal_batches(targets: Tensor, mesh: Any) -> None:
    """Raise ValueError unless every rank of ``mesh`` holds a minibatch of the same size: FSDP2 averages
    the ranks' gradients, the gradient of the global batch's mean only when the sizes are equal."""
    import torch.distributed as dist

    n = targets.shape[0] if targets.dim() else 1
    sizes = torch.tensor([n, -n], dtype=torch.int64)
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=mesh.get_group())
    if int(sizes[0]) != -int(sizes[1]):
        raise ValueError(
            f"targets: the ranks' minibatches differ in size (from {-int(sizes[1])} to {int(sizes[0])}); give every "
            "rank the same number of examples (a global batch divisible by the world size)"
        )


class _ChainSharded(torch.autograd.Function):
    """Joins the regulariser to the loss and, in backward, defers the step's chain rule to the end of
    the backward pass: FSDP2 reduce-scatters the model's gradients in its own final callback, so the
    chain runs in a callback queued after it (callbacks run in order and may queue more)."""

    @staticmethod
    def forward(ctx: Any, anchor: Tensor, value: Tensor, state: tuple[Any, Tensor, dict[str, Tensor]]) -> Tensor:
        ctx.state = state
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        posterior, term, thetas = ctx.state
        ctx.state = None
        engine = torch.autograd.Variable._execution_engine
        chain = lambda: posterior._chain(term, grad, thetas)  # noqa: E731
        engine.queue_callback(lambda: engine.queue_callback(chain))
        return torch.zeros(()), None, None


class WeightPosterior(nn.Module):
    """Base of ``VI`` and ``MCDropout``: see the module docstring.

    Subclasses name their variational stores in ``variational`` (each holds one parameter per
    Bayesian weight, under the mangled weight name), initialise them in ``_init_bayesian`` and implement
    ``_draw_with_regulariser`` (Bayesian weights for one seed and stream with the regulariser: one fused
    op), ``regulariser``, ``mean`` and ``std``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        params: ParamSelection = None,
        include_bias: bool = True,
        include_norm: bool = True,
        prior_mean: PriorMean = "pretrained",
        new_params: str | Sequence[str] | None = None,
        prior_std: PriorStd = 1.0,
        num_data: int,
        train_samples: int = 1,
        likelihood: str = "classification",
        noise_std: float = 1.0,
        output_fn: OutputFn | None = None,
        seed: int | None = None,
    ) -> None:
        """Arguments shared by every subclass (docs/vocabulary.md):

        model: any ``nn.Module``; never modified.
        params, include_bias, include_norm: which parameters are Bayesian (``select_parameters``); the
            rest are point estimates.
        prior_mean, new_params, prior_std: the ``GaussianPrior``.
        num_data: N, the training-set size (the regulariser is divided by it).
        train_samples: S, weight draws averaged per ``loss`` call.
        likelihood, noise_std: the likelihood of ``loss``'s default criterion and of ``bayeskern.predict``.
        output_fn: ``(output, inputs) -> logits`` for outputs ``bayeskern.batches`` cannot read.
        seed: base Philox seed (None: drawn on rank 0 and broadcast, ``distributed.shared_seed``).
        """
        super().__init__()
        self.num_data = check_count(num_data, "num_data", 1)
        self.train_samples = check_count(train_samples, "train_samples", 1)
        self.likelihood = check_choice(likelihood, "likelihood", LIKELIHOODS)
        self.noise_std = check_positive(noise_std, "noise_std")
        self.output_fn = output_fn
        if any(is_sharded(p) for p in model.parameters()):
            raise ValueError(
                "model: its parameters are sharded (DTensors) already; create the posterior on the unsharded "
                "model, then shard both with bayeskern.distributed.fully_shard(posterior)"
            )
        self.__dict__["model"] = model  # held, not registered: the wrapper trains its own copies
        self.__dict__["_sharded"] = None  # the model's FSDP2 parameters by name, once sharded
        self.__dict__["mesh"] = None
        self.setup = PosteriorSetup.build(
            model,
            params=params,
            include_bias=include_bias,
            include_norm=include_norm,
            prior_mean=prior_mean,
            new_params=new_params,
            prior_std=prior_std,
            seed=seed,
        )
        self.prior = self.setup.require_prior()  # registered: its snapshot is in state_dict
        self.names: list[str] = self.setup.names
        self.offsets = self.setup.offsets
        model_params = dict(model.named_parameters())
        self._point_names = [name for name, p in model_params.items() if name not in self.offsets and p.requires_grad]
        self.point = _Store()
        for name in self._point_names:
            param = model_params[name]
            self.point.register_parameter(mangle(name), nn.Parameter(param.detach().clone(), param.requires_grad))
        self._buffer_names = [name for name, _ in model.named_buffers()]
        self.buffers_ = _Store()
        for name, buffer in model.named_buffers():
            self.buffers_.register_buffer(mangle(name), buffer.detach().clone())
        self.register_buffer("rng_state", torch.tensor([self.setup.seed, 0], dtype=torch.int64))
        for store in self.variational:
            self.add_module(store, _Store())
        with torch.no_grad():
            for name in self.names:
                for store, value in self._init_bayesian(model_params[name]).items():
                    self.get_submodule(store).register_parameter(mangle(name), nn.Parameter(value))

    pred_type = "nn"  # bayeskern.predict samples the network (protocol.Posterior.pred_type)
    model: nn.Module  # set through __dict__ in __init__: held, not registered
    rng_state: Tensor  # a registered buffer
    _sharded: dict[str, Tensor] | None  # set through __dict__: the model's FSDP2 parameters once sharded
    mesh: Any  # set through __dict__: the 1-D device mesh once sharded, else None

    # -- subclass hooks ------------------------------------------------------------------------
    variational: tuple[str, ...] = ()  # names of the stores holding the variational parameters

    def _init_bayesian(self, param: Tensor) -> dict[str, Tensor]:
        """Initial value of each variational store for one Bayesian parameter."""
        raise NotImplementedError

    def _draw_with_regulariser(self, seed: Tensor, stream: int) -> tuple[dict[str, Tensor], Tensor]:
        """The Bayesian weights of one draw and ``regulariser()``, differentiable in the variational
        parameters."""
        raise NotImplementedError

    def regulariser(self) -> Tensor:
        """The term added to the loss as ``regulariser() / num_data``."""
        raise NotImplementedError

    def _fused_args(self) -> tuple[list[Tensor | None], list[float | Tensor], list[int]]:
        """Prior means, prior stds and Philox offsets of the Bayesian parameters: the fused draws' lists."""
        means, stds = self.prior.mean_std_lists()
        first = self._store(self.variational[0])
        offsets = [self.offsets[name] + element_offset(first[mangle(name)]) for name in self.names]
        return [None if m is None else local_tensor(m) for m in means], [_local_std(sp) for sp in stds], offsets

    def mean(self) -> dict[str, Tensor]:
        """The expected Bayesian weights."""
        raise NotImplementedError

    def std(self) -> dict[str, Tensor]:
        """The per-weight posterior std of each Bayesian parameter."""
        raise NotImplementedError

    # -- shared machinery ----------------------------------------------------------------------
    def train(self, mode: bool = True) -> WeightPosterior:
        """Set the wrapper's and the wrapped model's training mode (BatchNorm, dropout layers)."""
        self.model.train(mode)
        return super().train(mode)

    def _next_seed(self) -> Tensor:
        base, step = self.rng_state.tolist()
        self.rng_state[1] += 1
        return philox.seed_tensor(step_seed(base, step))

    def _store(self, store: str) -> dict[str, nn.Parameter]:
        """The parameters of the variational store ``store``, keyed by mangled parameter name."""
        return cast(_Store, self.get_submodule(store)).parameters_by_name()

    def _eval_seed(self) -> Tensor:
        return philox.seed_tensor(int(self.rng_state[0]))

    def _draw(self, seed: Tensor, stream: int) -> dict[str, Tensor]:
        """The Bayesian weights of one draw; its regulariser, a few flops per weight in the same
        pass, is dropped (one fused call over all tensors costs less than one op per tensor)."""
        return self._draw_with_regulariser(seed, stream)[0]

    def _others(self) -> dict[str, Tensor]:
        """Point-estimate parameters and buffers, keyed by the model's names."""
        buffers, point = self.buffers_.buffers_by_name(), self.point.parameters_by_name()
        out = {name: buffers[mangle(name)] for name in self._buffer_names}
        out.update((name, point[mangle(name)]) for name in self._point_names)
        return out

    def fixed_tensors(self) -> dict[str, Tensor]:
        """The trained point estimates and the buffers (detached): what the posterior holds in place of
        the model's tensors besides the Bayesian ones."""
        return {name: t.detach() for name, t in self._others().items()}

    def _device(self) -> torch.device:
        """Where the Bayesian weights live (the model's device, or wherever ``.to()`` moved them)."""
        return self._store(self.variational[0])[mangle(self.names[0])].device

    def functional_forward(self, weights: dict[str, Tensor], inputs: Inputs) -> Any:
        """Run the wrapped model on ``inputs`` (moved to the posterior's device) with ``weights`` for
        the Bayesian parameters; returns the model's output as it is."""
        args, kwargs = as_call(move_to(inputs, self._device()))
        if self._sharded is not None:
            self._load({**self._point_locals(), **weights})
            return self.model(*args, **kwargs)
        if is_sharded(next(self.model.parameters())):
            raise ValueError(
                "model: it was sharded after the posterior was created; shard both together with "
                "bayeskern.distributed.fully_shard(posterior)"
            )
        return functional_call(self.model, {**self._others(), **weights}, args, kwargs)

    def forward(self, inputs: Inputs, targets: Tensor | None = None, criterion: Criterion | None = None) -> Any:
        """One stochastic forward pass with freshly drawn weights (the model's output as it is); with
        ``targets`` -- or a Mapping ``inputs`` holding ``labels`` -- ``loss(inputs, targets, criterion)``
        instead (the call to make through ``DistributedDataParallel``)."""
        if targets is not None or (isinstance(inputs, Mapping) and LABELS in inputs):
            return self.loss(inputs, targets, criterion)
        return self.functional_forward(self._draw(self._next_seed(), rank_stream(0)), inputs)

    def nll(self, output: Tensor, targets: Tensor) -> Tensor:
        """The mean negative log-likelihood of a minibatch under ``likelihood`` (``bayeskern.likelihoods``)."""
        return negative_log_likelihood(output, targets, self.likelihood, self.noise_std)

    def loss(self, inputs: Inputs, targets: Tensor | None = None, criterion: Criterion | None = None) -> Tensor:
        """``(1/S) sum_s criterion(logits_{w_s}(inputs), targets) + regulariser() / num_data``.

        ``inputs`` are the model's inputs (``bayeskern.batches``); without ``targets`` they must be a
        Mapping batch holding them under ``labels`` (the other keys are the model's keyword inputs).
        ``logits`` is read from the model's output (``bayeskern.batches.logits_of``, ``output_fn``).
        ``criterion`` returns the mean negative log-likelihood of the minibatch (default: ``nll``, the
        posterior's likelihood); the S = ``train_samples`` weight draws share one fresh seed and use
        streams ``0..S-1`` (folded with the rank under ``torch.distributed``, see the module
        docstring).  In train mode BatchNorm running statistics update once per draw.
        """
        if targets is None:
            inputs, targets = split_batch(inputs)
        inputs, targets = move_to((inputs, targets), self._device())
        classification = criterion is None and self.likelihood == "classification"  # (N, C) logits
        criterion = self.nll if criterion is None else criterion
        steps_taken = int(self.rng_state[1])
        seed = self._next_seed()
        if self._sharded is not None:
            try:
                return self._sharded_loss(inputs, targets, criterion, classification, seed)
            except Exception:
                self.rng_state[1] = steps_taken
                raise
        try:
            first, regulariser = self._draw_with_regulariser(seed, rank_stream(0))
            draws = itertools.chain([first], (self._draw(seed, rank_stream(s)) for s in range(1, self.train_samples)))
            nll = (
                sum(
                    criterion(
                        logits_of(
                            self.functional_forward(weights, inputs),
                            inputs,
                            self.output_fn,
                            classification=classification,
                        ),
                        targets,
                    )
                    for weights in draws
                )
                / self.train_samples
            )
        except Exception:
            self.rng_state[1] = steps_taken  # a failed call leaves the noise stream where it was
            raise
        return nll + self._tempered(regulariser) / self.num_data

    def _tempered(self, regulariser: Tensor) -> Tensor:
        """The regulariser of the tempered objective (the identity unless a subclass tempers)."""
        return regulariser

    @torch.no_grad()
    def sample(self, index: int) -> dict[str, Tensor]:
        """The index-th posterior sample of the Bayesian weights: drawn with seed ``base`` and stream
        ``index`` (deterministic in ``index``); DTensors sharded like the model's parameters once
        sharded (the same values as the unsharded posterior's sample)."""
        drawn = self._draw(self._eval_seed(), check_count(index, "index", 0))
        if self._sharded is None:
            return drawn
        store = self._store(self.variational[0])
        return {name: from_local_like(w, store[mangle(name)]) for name, w in drawn.items()}

    # -- sharded training (FSDP2) --------------------------------------------------------------
    @property
    def is_sharded(self) -> bool:
        """True once ``bayeskern.distributed.fully_shard`` sharded the posterior and its model."""
        return self._sharded is not None

    def shard(self, *, mesh: Any = None, blocks: Iterable[nn.Module] | None = None, **fsdp_options: Any) -> None:
        """Apply FSDP2 to the held model per block (``distributed.shard_model``) and lay out every
        variational parameter, point estimate and prior tensor like the model parameter it stands
        for (``distributed.ShardsItself``); ``bayeskern.distributed.fully_shard(posterior)`` calls it."""
        if self._sharded is not None:
            raise ValueError("posterior: it is sharded already; call bayeskern.distributed.fully_shard once")
        if self.train_samples != 1:
            raise ValueError(
                f"train_samples must be 1 to shard with FSDP2 (got {self.train_samples}): FSDP2 re-gathers the "
                "weights of the last draw in backward; average more draws over steps or batches instead"
            )
        mesh = shard_model(self.model, mesh=mesh, blocks=blocks, **fsdp_options)
        sharded = dict(self.model.named_parameters())
        common_mesh(sharded.values(), "model's parameters")
        for name in self.names:
            element_offset(sharded[name])  # a contiguous local range, or ValueError
        with torch.no_grad():
            stores = [*self.variational, "point"]
            for store in stores:
                params = self._store(store)
                for key, param in list(params.items()):
                    like = sharded[key.replace("/", ".")]
                    params[key] = nn.Parameter(shard_copy(param, like), param.requires_grad)
            self.prior.shard_like(sharded)
            buffers = self.buffers_.buffers_by_name()
            for name in self._buffer_names:  # the model runs on the posterior's buffers from now on
                owner, _, leaf = name.rpartition(".")
                self.model.get_submodule(owner).register_buffer(leaf, buffers[mangle(name)])
        self.__dict__["_sharded"] = {name: sharded[name] for name in [*self._point_names, *self.names]}
        self.__dict__["mesh"] = mesh

    def _point_locals(self) -> dict[str, Tensor]:
        point = self.point.parameters_by_name()
        return {name: local_tensor(point[mangle(name)]) for name in self._point_names}

    @torch.no_grad()
    def _load(self, weights: Mapping[str, Tensor]) -> None:
        """Write ``weights`` (local shards or DTensors) into the model's sharded parameters, which
        FSDP2 gathers block by block in the model's forward (and again in backward)."""
        from torch.distributed.fsdp import FSDPModule

        assert self._sharded is not None
        for module in self.model.modules():  # a forward without backward (eval) leaves the root gathered
            if isinstance(module, FSDPModule):
                module.reshard()
        for name, w in weights.items():
            local_tensor(self._sharded[name]).copy_(local_tensor(w))

    def _sharded_loss(
        self, inputs: Inputs, targets: Tensor, criterion: Criterion, classification: bool, seed: Tensor
    ) -> Tensor:
        """``loss`` on the sharded model: one global draw (stream 0 on every rank, so all ranks use the
        same weights, those of a single process), each rank drawing its local shards; FSDP2 averages
        the likelihood gradients over the ranks and reduce-scatters them onto the model's sharded
        parameters, from which ``_ChainSharded`` carries them to the variational parameters."""
        assert self._sharded is not None
        _check_equal_batches(targets, self.mesh)
        weights, regulariser = self._draw_with_regulariser(seed, 0)
        thetas = {**self._point_locals(), **weights}
        self._load(thetas)
        args, kwargs = as_call(inputs)
        output = self.model(*args, **kwargs)
        nll = criterion(logits_of(output, inputs, self.output_fn, classification=classification), targets)
        term = self._tempered(global_sum(regulariser, self.mesh)) / self.num_data
        anchor = torch.zeros((), requires_grad=True)
        joined: Tensor = _ChainSharded.apply(anchor, term.detach(), (self, term, thetas))
        return nll + joined

    def _chain(self, term: Tensor, grad_term: Tensor, thetas: dict[str, Tensor]) -> None:
        """Backpropagate the gradients FSDP2 left on the model's sharded parameters (and the
        regulariser's) through this step's draw to the variational parameters and point estimates;
        clears the model's gradients."""
        assert self._sharded is not None
        grads = []
        for name, theta in thetas.items():
            param = self._sharded[name]
            grads.append(torch.zeros_like(theta) if param.grad is None else local_tensor(param.grad))
            param.grad = None
        tensors = [term, *thetas.values()]
        given = [grad_term, *grads]
        keep = [k for k, t in enumerate(tensors) if t.requires_grad]
        torch.autograd.backward([tensors[k] for k in keep], [given[k] for k in keep])
