"""``IVON``: improved variational online Newton (Shen et al., ICML 2024) as a ``torch.optim`` optimizer.

The parameters are the posterior mean m; the posterior std is ``1 / sqrt(ess (h + delta))`` with
``ess = num_data / temperature`` and ``delta = 1 / (num_data prior_std^2)``, h a Hessian estimate the
steps keep (``bayeskern.ops.ivon`` has the update).  The step pattern is ``ivon-opt``'s::

    opt = bk.IVON(model.named_parameters(), lr=0.1, num_data=len(train_set))
    for x, y in loader:
        for _ in range(opt.train_samples):
            with opt.sampled_params(train=True):   # the parameters hold a posterior sample here
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
        opt.step()                                  # the mean, momentum and h, from the samples' gradients
    posterior = opt.posterior(model)                # for bk.predict, the metrics, checkpoints

Inside ``sampled_params`` each parameter holds ``m + sigma eps``, eps the Philox normals of (seed, the
parameter's element offsets, stream = the group's draw count); on leaving it the parameter is m again
(bit for bit: m is kept aside while the sample is in place) and, with ``train=True``, the gradients
are added to the step's sums.  Unlike ``ivon-opt``, the decay pulls towards the prior mean theta0 (the
pretrained weights by default; ``new_params`` at zero), not towards zero.

Sharded (FSDP2): build the optimizer after ``fully_shard``; each rank updates its local shards, whose
element j reads the Philox counter of its global index (``offset + sharding.element_offset(p) + j``),
so a sharded run draws the noise of one process.  Data parallel: the ranks share the seed and the
draw counts, hence each sample; the averaged gradient times eps is the global batch's estimate.

Memory: the persistent state per parameter is the momentum and h (AdamW's two moments), plus the prior
mean when it is not zero (one more copy: ``prior_mean="zero"`` leaves it out).  A step holds
transiently one copy of the parameters (m, while a sample is in place) and two gradient sums.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..batches import OutputFn
from ..distributed.ranks import seed_or_shared
from ..distributed.sharding import common_mesh, element_offset, first_on_every_rank, local_tensor
from ..ops import philox
from ..ops.ivon import ivon_collect_, ivon_draw_, ivon_update_, posterior_std, sum_dtype
from ..ops.sgld import first_nonfinite
from ..validation import check_count, check_positive
from .diagonal_gaussian import DiagonalGaussian
from .group_prior import check_group_prior, group_prior_means


class IVON(Optimizer):
    """IVON with a pretrained prior mean (module docstring).

    Args (docs/vocabulary.md; every one after ``params`` but ``train_samples`` and ``seed`` may also be
    set per param group):
        params: parameters, ``model.named_parameters()`` (needed by ``new_params`` and a mapping
            ``prior_mean``), or param groups.
        lr: the learning rate (scaled by ``hess_init + delta`` under ``rescale_lr``, as ``ivon-opt``).
        num_data: N, the number of training examples the mean loss averages over.
        prior_std: sp, the prior standard deviation (delta = 1 / (N sp^2) is ``ivon-opt``'s weight decay).
        prior_mean: theta0: ``"pretrained"``, ``"zero"``, a mapping from name to tensor or a sequence of
            tensors (``BayesSGLD``'s meaning).
        new_params: names or globs of parameters whose prior mean is zero (a fresh head).
        temperature: T > 0; the effective sample size is N / T (``ivon-opt``'s ``ess``).
        hess_init: h0 > 0, the initial Hessian estimate (the initial std is 1 / sqrt(ess (h0 + delta))).
        beta1, beta2: the momentum and Hessian averaging factors, in [0, 1).
        clip_radius: r > 0, the elementwise clip of the preconditioned step.
        rescale_lr: scale lr by (h0 + delta).
        train_samples: K >= 1, the samples per step ``step(closure)`` draws (and a loop should).
        seed: Philox key of the samples (None: drawn on rank 0 and broadcast).
        foreach: use the ``torch._foreach`` implementation of the ops (float32 maths, Philox noise tensors).
        fused: use the fused kernels of ``bayeskern.ops.ivon`` (the default: the C++ SIMD kernels on CPU,
            Triton or CUDA on GPU).  ``foreach=False, fused=False`` runs the single-tensor reference.
    """

    def __init__(
        self,
        params: Any,
        *,
        lr: float,
        num_data: int,
        prior_std: float = 1.0,
        prior_mean: str | Mapping[str, Tensor] | Sequence[Tensor] = "pretrained",
        new_params: str | Sequence[str] | None = None,
        temperature: float = 1.0,
        hess_init: float = 1.0,
        beta1: float = 0.9,
        beta2: float = 0.99999,
        clip_radius: float = math.inf,
        rescale_lr: bool = True,
        train_samples: int = 1,
        seed: int | None = None,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            num_data=num_data,
            prior_std=prior_std,
            prior_mean=prior_mean,
            new_params=new_params,
            temperature=temperature,
            hess_init=hess_init,
            beta1=beta1,
            beta2=beta2,
            clip_radius=clip_radius,
            rescale_lr=rescale_lr,
            foreach=foreach,
            fused=fused,
        )
        _check_group(defaults)
        self.train_samples = check_count(train_samples, "train_samples", 1)
        self.seed = seed_or_shared(seed)
        self._num_params = 0  # parameters placed so far, indexes a constructor-level prior_mean list
        self._next_offset = 0
        self._collected = 0  # samples whose gradients the sums hold, since the last step
        self._sampling = False
        self._mesh: Any = None  # the device mesh of DTensor (fully_shard-ed) parameters, None if plain
        self._shard_offsets: dict[Tensor, int] = {}  # DTensor parameter -> its local shard's first element
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group: validate its hyperparameters, place its parameters in the Philox counter space
        and set their state (momentum 0, h = ``hess_init``, the prior mean)."""
        own_mean = "prior_mean" in param_group
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_group(group)
        known = [q for g in self.param_groups for q in g["params"]]
        self._mesh = common_mesh(known)
        if self._mesh is not None and any(common_mesh([q]) is None for q in known):
            raise ValueError(
                "params mix DTensor (fully_shard-ed) and plain parameters: shard the whole model "
                "(fully_shard on the root module too) before building IVON"
            )
        for q in group["params"]:
            if self._mesh is not None:
                self._shard_offsets[q] = element_offset(q)  # raises unless the local shard is contiguous
        means = group_prior_means(group, 0 if own_mean else self._num_params)
        group["prior_mean"] = group["prior_mean"] if isinstance(group["prior_mean"], str) else "given"
        group.setdefault("step", 0)
        group.setdefault("draws", 0)
        for p, mean in zip(group["params"], means):
            state = self.state[p]
            state["offset"] = self._next_offset
            state["momentum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["hess"] = torch.full_like(p, group["hess_init"], memory_format=torch.preserve_format)
            if mean is not None:
                state["prior_mean"] = mean
            self._next_offset += philox.tensor_span(p.numel())
        self._num_params += len(group["params"])

    @staticmethod
    def _scales(group: dict[str, Any]) -> tuple[float, float]:
        """``ess = N / T`` and ``delta = 1 / (N sp^2)``."""
        return group["num_data"] / group["temperature"], 1.0 / (group["num_data"] * group["prior_std"] ** 2)

    @contextmanager
    def sampled_params(self, train: bool = False) -> Iterator[None]:
        """Put a posterior sample ``m + sigma eps`` in the parameters for the block, and m back after it.

        With ``train=True`` the gradients the block leaves in ``.grad`` (zero them inside the block;
        a parameter without one counts as zero) are collected for ``step()``; a non-finite gradient
        raises RuntimeError naming the parameter, with m back in place and nothing collected."""
        if self._sampling:
            raise RuntimeError("IVON.sampled_params: already inside a sampled_params block")
        self._sampling = True
        kept: list[tuple[dict[str, Any], list[Tensor], int]] = []  # group, its m, stream
        try:
            for group in self.param_groups:
                ess, delta = self._scales(group)
                params = group["params"]
                locals_ = [local_tensor(p.detach()) for p in params]
                means = [torch.empty_like(t) for t in locals_]
                ivon_draw_(
                    locals_,
                    means,
                    [local_tensor(self.state[p]["hess"]) for p in params],
                    ess=ess,
                    delta=delta,
                    seed=self.seed,
                    stream=group["draws"],
                    offsets=self._offsets(params),
                    implementation=_implementation(group),
                )
                kept.append((group, means, group["draws"]))  # only a completed draw has m kept aside
                group["draws"] += 1
            yield
        finally:
            with torch.no_grad():
                for group, means, _ in kept:
                    torch._foreach_copy_([local_tensor(p.detach()) for p in group["params"]], means)
            self._sampling = False
        if train:
            self._collect([(group, stream) for group, _, stream in kept])

    @torch.no_grad()
    def _collect(self, draws: list[tuple[dict[str, Any], int]]) -> None:
        """Add each parameter's gradient g and g eps (eps of its group's draw) to the step's sums."""
        with_grad = [[p for p in group["params"] if p.grad is not None] for group, _ in draws]
        grads = [local_tensor(p.grad) for ps in with_grad for p in ps]
        bad = first_on_every_rank(first_nonfinite(grads), len(grads), self._mesh)
        if bad is not None:
            param = [p for ps in with_grad for p in ps][bad]
            raise RuntimeError(f"IVON: non-finite gradient in {self._describe(param)}; nothing was collected")
        for (group, stream), params in zip(draws, with_grad):
            fresh = [p for p in params if "grad_sum" not in self.state[p]]  # their first sample of the step
            summed = [p for p in params if "grad_sum" in self.state[p]]
            for p in fresh:
                self._new_sums(p, torch.empty_like)
            for accumulate, chosen in ((False, fresh), (True, summed)):
                ivon_collect_(
                    [local_tensor(p.grad) for p in chosen],
                    [self.state[p]["grad_sum"] for p in chosen],
                    [self.state[p]["grad_eps_sum"] for p in chosen],
                    accumulate=accumulate,
                    seed=self.seed,
                    stream=stream,
                    offsets=self._offsets(chosen),
                    implementation=_implementation(group),
                )
        self._collected += 1

    def _offsets(self, params: list[Tensor]) -> list[int]:
        """Each parameter's Philox offset of its (local shard's) first element."""
        return [self.state[p]["offset"] + self._shard_offsets.get(p, 0) for p in params]

    def _new_sums(self, p: Tensor, make: Callable[..., Tensor]) -> None:
        """The step's gradient sums of ``p`` (its local shard's shape, ``sum_dtype``), by ``make``."""
        local = local_tensor(p.detach())
        self.state[p]["grad_sum"] = make(local, dtype=sum_dtype(local))
        self.state[p]["grad_eps_sum"] = make(local, dtype=sum_dtype(local))

    def _describe(self, param: Tensor) -> str:
        for group in self.param_groups:
            for index, p in enumerate(group["params"]):
                if p is param:
                    names = group.get("param_names")
                    return f"parameter {names[index]!r}" if names else f"parameter {index} of its group"
        raise ValueError("not a parameter of this optimizer")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update every group from the gradients collected since the last step.

        With a ``closure`` (it zeroes the gradients, computes the loss and calls ``backward``), draws
        ``train_samples`` samples first and returns the mean of its losses.  Raises RuntimeError when
        no gradient was collected under ``sampled_params(train=True)``."""
        loss = None
        if closure is not None:
            losses = []
            for _ in range(self.train_samples):
                with self.sampled_params(train=True), torch.enable_grad():
                    losses.append(closure())
            loss = sum(losses) / len(losses)
        if self._collected == 0:
            raise RuntimeError(
                "IVON.step(): no gradient was collected since the last step; compute the loss and call "
                "backward() inside `with opt.sampled_params(train=True):` (or pass a closure)"
            )
        for group in self.param_groups:
            ess, delta = self._scales(group)
            group["step"] += 1
            lr = float(group["lr"]) * ((group["hess_init"] + delta) if group["rescale_lr"] else 1.0)
            for p in group["params"]:  # no gradient in any sample: the prior and momentum still act
                if "grad_sum" not in self.state[p]:
                    self._new_sums(p, torch.zeros_like)
            for with_mean in (True, False):  # one call with the prior means, one for a zero prior mean
                params = [p for p in group["params"] if ("prior_mean" in self.state[p]) == with_mean]
                states = [self.state[p] for p in params]
                ivon_update_(
                    [local_tensor(p.detach()) for p in params],
                    [local_tensor(state["momentum"]) for state in states],
                    [local_tensor(state["hess"]) for state in states],
                    [state.pop("grad_sum") for state in states],
                    [state.pop("grad_eps_sum") for state in states],
                    [local_tensor(state["prior_mean"]) for state in states] if with_mean else None,
                    lr=lr,
                    ess=ess,
                    delta=delta,
                    beta1=group["beta1"],
                    beta2=group["beta2"],
                    step=group["step"],
                    clip_radius=group["clip_radius"],
                    scale=1.0 / self._collected,
                    implementation=_implementation(group),
                )
        self._collected = 0
        return loss

    def std(self) -> list[Tensor]:
        """The posterior stds ``1 / sqrt(ess (h + delta))``, one per parameter in group order."""
        stds = []
        for group in self.param_groups:
            ess, delta = self._scales(group)
            stds += [posterior_std(self.state[p]["hess"], ess, delta).to(p.dtype) for p in group["params"]]
        return stds

    def posterior(
        self,
        model: nn.Module,
        *,
        likelihood: str = "classification",
        noise_std: float = 1.0,
        output_fn: OutputFn | None = None,
    ) -> DiagonalGaussian:
        """The current posterior ``N(m, sigma^2)`` over the optimizer's parameters of ``model`` (a
        snapshot, with the optimizer's seed), for ``bayeskern.predict``, the metrics and checkpoints."""
        if self._sampling:
            raise RuntimeError("IVON.posterior: called inside sampled_params (the parameters hold a sample)")
        names = {p: name for name, p in model.named_parameters()}
        params = [p for group in self.param_groups for p in group["params"]]
        missing = [i for i, p in enumerate(params) if p not in names]
        if missing:
            raise ValueError(f"model: {len(missing)} of the optimizer's parameters are not the model's")
        mean = {names[p]: p.detach() for p in params}
        std = {names[p]: s for p, s in zip(params, self.std())}
        return DiagonalGaussian(
            model, mean, std, seed=self.seed, likelihood=likelihood, noise_std=noise_std, output_fn=output_fn
        )

    def state_dict(self) -> dict[str, Any]:
        """``Optimizer.state_dict`` plus the seed; refused between a collected sample and its step."""
        if self._collected or self._sampling:
            raise RuntimeError("IVON.state_dict: gradients are collected but not stepped; save after step()")
        state = super().state_dict()
        state["seed"] = self.seed
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        self.seed = seed_or_shared(int(state.pop("seed")))
        super().load_state_dict(state)


def _implementation(group: dict[str, Any]) -> str:
    """The ops' implementation the group's ``foreach`` / ``fused`` flags ask for (fused by default)."""
    if group["foreach"]:
        return "foreach"
    return "reference" if group["fused"] is False and group["foreach"] is False else "fused"


def _check_group(group: dict[str, Any]) -> None:
    lr = group["lr"]
    check_positive(float(lr) if isinstance(lr, Tensor) else lr, "lr")
    group["num_data"] = check_count(group["num_data"], "num_data", 1)
    check_positive(group["prior_std"], "prior_std")
    check_positive(group["temperature"], "temperature")
    check_positive(group["hess_init"], "hess_init")
    radius = group["clip_radius"]
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or math.isnan(radius) or radius <= 0:
        raise ValueError(f"clip_radius must be > 0 (inf: no clipping), got {radius!r}")
    for name in ("beta1", "beta2"):
        value = group[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    if group["foreach"] and group["fused"]:
        raise ValueError("foreach=True and fused=True cannot be used together")
    check_group_prior(group)


__all__ = ["IVON"]
