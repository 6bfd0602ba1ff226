"""BayesSGLD: stochastic-gradient Langevin dynamics as a drop-in ``torch.optim`` optimizer.

With the loss the mean minibatch NLL L (what training code already computes), N training examples,
the prior N(theta0, sp^2 I) and temperature T, one step is (``bayeskern.ops.sgld``, float32 maths)

    g_tot = grad L + (theta - theta0) / (N sp^2)
    theta <- theta - lr * g_tot + sqrt(2 lr T / N) * xi,        xi ~ N(0, I)

i.e. Langevin dynamics with step h = lr T / N on U / T, U = N L + ||theta - theta0||^2 / (2 sp^2) the
negative log joint: it samples the tempered posterior exp(-U / T) (docs/vocabulary.md); T = 0 is
gradient descent to the MAP.  ``preconditioner="rmsprop"`` gives pSGLD (Li et al. 2016) without its
Gamma correction term:

    v <- alpha v + (1 - alpha) g_tot^2,   G = 1 / (eps + sqrt(v))
    theta <- theta - lr * G * g_tot + sqrt(2 lr T G / N) * xi

theta0 is, by default, the parameters when the optimizer is built (``prior_mean="pretrained"``), with
the parameters named in ``new_params`` at zero.

The noise xi is counter-based Philox keyed by (seed, per-parameter offset, stream = the group's step
count); offsets are fixed at construction and seed, step and offsets live in the state dict, so a run
resumed from a checkpoint reproduces the uninterrupted run bit for bit.

Data parallel (``DistributedDataParallel``): DDP averages the gradients and every rank draws the same
noise (same seed, offsets and step; a default seed is drawn on rank 0 and broadcast), so the replicas
take identical steps and never drift apart.

Sharded (FSDP2, ``fully_shard``; build the optimizer after sharding, as for any ``torch.optim``
optimizer): the parameters, gradients, prior means and square averages are DTensors sharded alike
(``Shard(0)`` on one 1-D mesh), and each rank updates its local shard only.  Element j of a parameter
reads the Philox counter ``offset + j`` of its *global* index (``offset + sharding.element_offset(p)``
for the shard's first element), so a sharded run draws exactly the noise of a single process and, on
the same global batches (FSDP2 averages the gradients over the ranks), follows the same trajectory.
The non-finite check is agreed on by all ranks of the mesh (one all-reduce per group and step), so
every rank skips or raises together.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..distributed.ranks import shared_seed
from ..distributed.sharding import element_offset, first_on_every_rank, is_sharded, local_tensor
from ..ops import philox
from ..ops.sgld import check_hyperparameters, first_nonfinite, sgld
from ..validation import check_count
from .group_prior import check_group_prior, group_prior_means

_PRECONDITIONERS = (None, "rmsprop")
_NONFINITE = ("raise", "skip")


class BayesSGLD(Optimizer):
    """SGLD / pSGLD sampler with the interface of a ``torch.optim`` optimizer.

    Args (docs/vocabulary.md; every one after ``params`` may also be set per param group):
        params: parameters, ``model.named_parameters()`` (needed by ``new_params`` and a mapping
            ``prior_mean``), or param groups.
        lr: step size on the mean-loss scale (the update above); LR schedulers change it as usual.
        num_data: N, the number of training examples the mean loss averages over.
        prior_std: sp, the prior standard deviation.
        prior_mean: theta0: ``"pretrained"`` (a snapshot of the parameters at construction, kept in
            the optimizer state so checkpoints carry it), ``"zero"``, a mapping from parameter name
            to tensor, or a sequence of tensors (for the constructor: every parameter in order; in a
            param group: its own).  The means live in ``state[p]["prior_mean"]``; the group then
            records its kind (``"pretrained"``, ``"zero"`` or ``"given"``).
        new_params: names or globs of parameters whose prior mean is zero (a fresh head).
        temperature: T >= 0; 1 samples the posterior, 0 gives gradient descent to the MAP.
        preconditioner: None (SGLD) or ``"rmsprop"`` (pSGLD with decay ``alpha`` and ``eps``).
        seed: Philox key of the noise (None: drawn on rank 0 from torch's default generator and
            broadcast, so every rank must construct the optimizer).
        foreach: use the ``torch._foreach`` implementation (float32 maths, Philox noise tensors).
        fused: use the fused kernel ``bayeskern.ops.sgld_step_`` (the default: the C++ SIMD kernel on
            CPU, Triton or CUDA on GPU). ``foreach=False, fused=False`` runs the single-tensor reference.
        nonfinite: ``"raise"`` (RuntimeError naming the parameter) or ``"skip"`` (leave the group
            untouched for this step, counting it in ``group["skipped_steps"]``) when a gradient holds
            a NaN or infinity; the check runs before any parameter is written.

    Cyclical SGLD (Zhang et al. 2020) is a scheduler away: cosine cycles of ``cycle`` steps, keeping the
    iterate at the end of each cycle, where the step size is smallest (``bank.update()`` number
    ``k * cycle``)::

        opt = BayesSGLD(model.named_parameters(), lr=0.05, num_data=len(train_set), new_params=["fc.*"])
        sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=cycle)
        bank = bk.SampleBank(model, burnin=0, thin=cycle, max_samples=16)
        for x, y in loader:
            opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step(); sched.step(); bank.update()
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
        preconditioner: str | None = None,
        alpha: float = 0.99,
        eps: float = 1e-8,
        seed: int | None = None,
        foreach: bool | None = None,
        fused: bool | None = None,
        nonfinite: str = "raise",
    ) -> None:
        if seed is None:
            seed = shared_seed()
        defaults = dict(
            lr=lr,
            num_data=num_data,
            prior_std=prior_std,
            prior_mean=prior_mean,
            new_params=new_params,
            temperature=temperature,
            preconditioner=preconditioner,
            alpha=alpha,
            eps=eps,
            seed=seed,
            foreach=foreach,
            fused=fused,
            nonfinite=nonfinite,
        )
        _check_group(defaults)
        self._num_params = 0  # parameters placed so far, indexes a constructor-level prior_mean list
        self._next_offset = 0
        self._mesh: Any = None  # the device mesh of DTensor parameters (one for all), None if plain
        self._shard_offsets: dict[Tensor, int] = {}  # DTensor parameter -> element_offset (fixed layout)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group: validate its hyperparameters, place its parameters in the Philox counter space
        and snapshot / store its prior mean."""
        own_mean = "prior_mean" in param_group
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_group(group)
        self._check_sharding(group)
        first = 0 if own_mean else self._num_params
        means = group_prior_means(group, first)
        group["prior_mean"] = group["prior_mean"] if isinstance(group["prior_mean"], str) else "given"
        group.setdefault("step", 0)
        group.setdefault("skipped_steps", 0)
        for p, mean in zip(group["params"], means):
            state = self.state[p]
            state["offset"] = self._next_offset
            if mean is not None:
                state["prior_mean"] = mean
            if group["preconditioner"] == "rmsprop":  # eager: a checkpoint template (DCP) must hold it
                state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            self._next_offset += philox.tensor_span(p.numel())
        self._num_params += len(group["params"])

    def _check_sharding(self, group: dict[str, Any]) -> None:
        """Every parameter plain, or every one a DTensor on one mesh with a contiguous local shard."""
        for i, p in enumerate(group["params"]):
            sharded = is_sharded(p)
            if (self._num_params or i) and sharded != (self._mesh is not None):
                raise ValueError(
                    "params mix DTensor (fully_shard-ed) and plain parameters: shard the whole model "
                    "(fully_shard on the root module too) before building BayesSGLD"
                )
            if not sharded:
                continue
            if self._mesh is None:
                self._mesh = p.device_mesh
            elif p.device_mesh != self._mesh:
                raise ValueError(
                    f"param {_name_of(group, i)} is sharded on {p.device_mesh} but earlier parameters on "
                    f"{self._mesh}: BayesSGLD needs one device mesh for all its parameters"
                )
            if p.device_mesh.ndim != 1:
                raise ValueError(f"param {_name_of(group, i)} is sharded on a {p.device_mesh.ndim}-D mesh (need 1-D)")
            self._shard_offsets[p] = element_offset(p)  # raises unless the local shard is contiguous (Shard(0))

    def _init_group(
        self, group: dict[str, Any]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[int]]:
        """Params with a gradient, their gradients, prior means, square averages and Philox offsets
        (local shards and the offsets of their first elements for DTensor parameters)."""
        params: list[Tensor] = []
        grads: list[Tensor] = []
        means: list[Tensor] = []
        avgs: list[Tensor] = []
        offsets: list[int] = []  # state["offset"] is the int placed by add_param_group
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("BayesSGLD does not support sparse gradients")
            state = self.state[p]
            params.append(local_tensor(p))
            grads.append(local_tensor(p.grad))
            offsets.append(state["offset"] + self._shard_offsets.get(p, 0))
            if "prior_mean" in state:
                means.append(local_tensor(state["prior_mean"]))
            if group["preconditioner"] == "rmsprop":
                if "square_avg" not in state:  # preconditioner switched on after construction
                    state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                avgs.append(local_tensor(state["square_avg"]))
        return params, grads, means, avgs, offsets

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One Langevin step for every group (gradients are checked for NaN/inf before any update)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        ready = []
        for index, group in enumerate(self.param_groups):
            tensors = self._init_group(group)
            if not tensors[0]:
                continue
            bad = first_on_every_rank(first_nonfinite(tensors[1]), len(tensors[1]), self._mesh)
            if bad is not None:
                if group["nonfinite"] == "raise":
                    raise RuntimeError(f"BayesSGLD: non-finite gradient in {_describe(group, bad, index)}")
                group["skipped_steps"] += 1
                continue
            ready.append((group, tensors))
        for group, (params, grads, means, avgs, offsets) in ready:
            sgld(
                params,
                grads,
                means,
                avgs,
                lr=float(group["lr"]),
                num_data=group["num_data"],
                prior_std=group["prior_std"],
                temperature=group["temperature"],
                alpha=group["alpha"],
                eps=group["eps"],
                seed=group["seed"],
                step=group["step"],
                offsets=offsets,
                foreach=group["foreach"],
                fused=group["fused"],
            )
            group["step"] += 1
        return loss


def _name_of(group: dict[str, Any], index: int) -> str:
    names = group.get("param_names")
    return repr(names[index]) if names else str(index)


def _check_group(group: dict[str, Any]) -> None:
    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Invalid lr: a tensor lr must have one element")
        lr = float(lr)
    group["num_data"] = check_count(group["num_data"], "num_data", 1)
    check_hyperparameters(lr, group["num_data"], group["prior_std"], group["temperature"], group["alpha"], group["eps"])
    if group["preconditioner"] not in _PRECONDITIONERS:
        raise ValueError(f"Invalid preconditioner: {group['preconditioner']!r} (must be one of {_PRECONDITIONERS})")
    if group["nonfinite"] not in _NONFINITE:
        raise ValueError(f"Invalid nonfinite: {group['nonfinite']!r} (must be one of {_NONFINITE})")
    seed = group["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"Invalid seed: {seed!r} (must be an integer in [0, 2**63))")
    if group["foreach"] and group["fused"]:
        raise ValueError("Invalid foreach/fused: foreach=True and fused=True cannot be used together")
    check_group_prior(group)


def _describe(group: dict[str, Any], index: int, group_index: int) -> str:
    names = group.get("param_names")
    position = [i for i, p in enumerate(group["params"]) if p.grad is not None][index]  # params: those with a grad
    name = f"parameter {names[position]!r}" if names else f"parameter {position}"
    return f"{name} of param group {group_index} (shape {tuple(group['params'][position].shape)})"


__all__ = ["BayesSGLD", "sgld"]
