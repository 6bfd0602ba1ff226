"""BayesSGLD: stochastic-gradient Langevin dynamics as a drop-in ``torch.optim`` optimizer.

With the loss the mean minibatch NLL L (what training code already computes), N training examples
and the prior N(theta0, sp^2 I), one step is (``bayeskern.ops.sgld``, float32 maths)

    g_tot = grad L + (theta - theta0) / (N sp^2)
    theta <- theta - lr * g_tot + sqrt(2 lr T / N) * xi,        xi ~ N(0, I)

i.e. Langevin dynamics with step 2 lr / N on U = N L + ||theta - theta0||^2 / (2 sp^2) at temperature
T.  ``preconditioner="rmsprop"`` gives pSGLD (Li et al. 2016) without its Gamma correction term:

    v <- alpha v + (1 - alpha) g_tot^2,   G = 1 / (eps + sqrt(v))
    theta <- theta - lr * G * g_tot + sqrt(2 lr T G / N) * xi

The noise xi is counter-based Philox keyed by (seed, per-parameter offset, stream = the group's step
count); offsets are fixed at construction and seed, step and offsets live in the state dict, so a run
resumed from a checkpoint reproduces the uninterrupted run bit for bit.

Data parallel (``DistributedDataParallel``): DDP averages the gradients and every rank draws the same
noise (same seed, offsets and step; a default seed is drawn on rank 0 and broadcast), so the replicas
take identical steps and never drift apart.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer

from bayeskern.distributed import shared_seed
from bayeskern.ops import noise
from bayeskern.ops.sgld import check_hyperparameters, first_nonfinite, reference_sgld_step_, sgld_step_

_PRECONDITIONERS = (None, "rmsprop")
_NONFINITE = ("raise", "skip")
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _offset_span(numel: int) -> int:
    """Counter space a parameter takes: its size rounded up to whole Philox blocks of 4."""
    return -(-numel // 4) * 4


class BayesSGLD(Optimizer):
    """SGLD / pSGLD sampler with the interface of a ``torch.optim`` optimizer.

    Args:
        params: parameters or param groups; every hyperparameter below may be set per group.
        lr: step size on the mean-loss scale (the update above); LR schedulers change it as usual.
        num_data: N, the number of training examples the mean loss averages over.
        prior_std: sp, the prior standard deviation.
        prior_mean: theta0: None (zero), ``"pretrained"`` (a snapshot of the parameters at
            construction, kept in the optimizer state so checkpoints carry it), or one tensor per
            parameter (for the constructor: all parameters in order; in a param group: its own).
            The means live in ``state[p]["prior_mean"]``; the group then records which kind it
            has (None, ``"pretrained"`` or ``"given"``).
        temperature: T; 1 samples the posterior, 0 gives gradient descent to the MAP.
        preconditioner: None (SGLD) or ``"rmsprop"`` (pSGLD with decay ``alpha`` and ``eps``).
        seed: Philox key of the noise (drawn from torch's default generator when None; under
            ``torch.distributed`` rank 0's draw is broadcast, so every rank must construct the optimizer).
        foreach: use the ``torch._foreach`` implementation (float32 maths, Philox noise tensors).
        fused: use the fused kernel ``bayeskern.ops.sgld_step_`` (the default: the C++ SIMD kernel on
            CPU, Triton or CUDA on GPU). ``foreach=False, fused=False`` runs the single-tensor reference.
        nonfinite: ``"raise"`` (RuntimeError naming the parameter) or ``"skip"`` (leave the group
            untouched for this step, counting it in ``group["skipped_steps"]``) when a gradient holds
            a NaN or infinity; the check runs before any parameter is written.

    Cyclical SGLD (Zhang et al. 2020) is a scheduler away: cosine cycles of ``cycle`` steps, keeping the
    iterate at the end of each cycle, where the step size is smallest (``bank.update()`` number
    ``k * cycle``)::

        opt = BayesSGLD(model.parameters(), lr=0.05, num_data=len(train_set), prior_mean="pretrained")
        sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=cycle)
        bank = bk.SampleBank(model, burnin=0, thin=cycle, max_samples=16)
        for x, y in loader:
            opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step(); sched.step(); bank.update()
    """

    def __init__(
        self,
        params: Any,
        lr: float,
        num_data: int,
        prior_std: float = 1.0,
        prior_mean: None | str | Sequence[Tensor] = None,
        temperature: float = 1.0,
        preconditioner: str | None = None,
        alpha: float = 0.99,
        eps: float = 1e-8,
        seed: int | None = None,
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
        nonfinite: str = "raise",
    ) -> None:
        if seed is None:
            seed = shared_seed()
        defaults = dict(
            lr=lr, num_data=num_data, prior_std=prior_std, prior_mean=prior_mean, temperature=temperature,
            preconditioner=preconditioner, alpha=alpha, eps=eps, seed=seed, foreach=foreach, fused=fused,
            nonfinite=nonfinite,
        )
        _check_group(defaults)
        self._num_params = 0  # parameters placed so far, indexes a constructor-level prior_mean list
        self._next_offset = 0
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group: validate its hyperparameters, place its parameters in the Philox counter space
        and snapshot / store its prior mean."""
        own_mean = "prior_mean" in param_group
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_group(group)
        first = 0 if own_mean else self._num_params
        means = _prior_means(group["prior_mean"], group["params"], first)
        group["prior_mean"] = None if group["prior_mean"] is None else ("pretrained" if group["prior_mean"] == "pretrained" else "given")
        group.setdefault("step", 0)
        group.setdefault("skipped_steps", 0)
        for p, mean in zip(group["params"], means):
            state = self.state[p]
            state["offset"] = self._next_offset
            if mean is not None:
                state["prior_mean"] = mean
            self._next_offset += _offset_span(p.numel())
        self._num_params += len(group["params"])

    def _init_group(self, group: dict[str, Any]) -> tuple[list[Tensor], ...]:
        params, grads, means, avgs, offsets = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("BayesSGLD does not support sparse gradients")
            state = self.state[p]
            params.append(p)
            grads.append(p.grad)
            offsets.append(state["offset"])
            if "prior_mean" in state:
                means.append(state["prior_mean"])
            if group["preconditioner"] == "rmsprop":
                if "square_avg" not in state:
                    state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                avgs.append(state["square_avg"])
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
            bad = first_nonfinite(tensors[1])
            if bad is not None:
                if group["nonfinite"] == "raise":
                    raise RuntimeError(f"BayesSGLD: non-finite gradient in {_describe(group, tensors[0], bad, index)}")
                group["skipped_steps"] += 1
                continue
            ready.append((group, tensors))
        for group, (params, grads, means, avgs, offsets) in ready:
            sgld(
                params, grads, means, avgs, lr=float(group["lr"]), num_data=group["num_data"],
                prior_std=group["prior_std"], temperature=group["temperature"], alpha=group["alpha"],
                eps=group["eps"], seed=group["seed"], step=group["step"], offsets=offsets,
                foreach=group["foreach"], fused=group["fused"],
            )
            group["step"] += 1
        return loss


def _check_group(group: dict[str, Any]) -> None:
    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Invalid lr: a tensor lr must have one element")
        lr = float(lr)
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
    mean = group["prior_mean"]
    if not (mean is None or isinstance(mean, (list, tuple)) or mean in ("pretrained", "given")):
        raise ValueError(f"Invalid prior_mean: {mean!r} (must be None, 'pretrained' or a sequence of tensors)")


def _prior_means(spec: Any, params: list[Tensor], first: int) -> list[Tensor | None]:
    """The prior mean of each parameter (None for zero); ``first`` indexes a list spec."""
    if spec is None:
        return [None] * len(params)
    if isinstance(spec, str):
        if spec == "given":  # a group restored from a state dict: the means are in the state
            return [None] * len(params)
        return [p.detach().clone(memory_format=torch.preserve_format) for p in params]
    if first + len(params) > len(spec):
        raise ValueError(f"prior_mean has {len(spec)} tensors but there are at least {first + len(params)} parameters")
    means = []
    for i, p in enumerate(params, start=first):
        mean = spec[i]
        if not isinstance(mean, Tensor) or mean.shape != p.shape:
            shape = tuple(mean.shape) if isinstance(mean, Tensor) else type(mean).__name__
            raise ValueError(f"prior_mean[{i}] has shape {shape} but parameter {i} has shape {tuple(p.shape)}")
        means.append(mean.detach().to(device=p.device, dtype=p.dtype).clone(memory_format=torch.preserve_format))
    return means


def _describe(group: dict[str, Any], params: list[Tensor], index: int, group_index: int) -> str:
    names = group.get("param_names")
    position = next(i for i, p in enumerate(group["params"]) if p is params[index])
    name = f"parameter {names[position]!r}" if names else f"parameter {position}"
    return f"{name} of param group {group_index} (shape {tuple(params[index].shape)})"


def _buckets(params: list[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        buckets[(p.device, p.dtype)].append(i)
    return buckets


def sgld(
    params: list[Tensor], grads: list[Tensor], prior_means: list[Tensor], square_avgs: list[Tensor], *,
    lr: float, num_data: float, prior_std: float, temperature: float, alpha: float, eps: float,
    seed: int, step: int, offsets: list[int], foreach: bool | None = None, fused: bool | None = None,
) -> None:
    """Functional SGLD step (see the module docstring); picks the fused kernel, foreach or reference path.

    ``prior_means`` / ``square_avgs`` are empty for a zero prior mean / no preconditioner.
    """
    if fused or (fused is None and not foreach):
        for idx in _buckets(params).values():
            pick = lambda xs: [xs[i] for i in idx] if xs else None  # noqa: E731
            sgld_step_(
                pick(params), pick(grads), pick(prior_means), pick(square_avgs), lr=lr, num_data=num_data,
                prior_std=prior_std, temperature=temperature, alpha=alpha, eps=eps, seed=seed, step=step,
                offsets=pick(offsets),
            )
        return
    prior_precision = 1.0 / (num_data * prior_std**2)
    noise_scale = (2.0 * lr * temperature / num_data) ** 0.5
    impl = _multi_tensor_sgld if foreach else reference_sgld_step_
    impl(params, grads, prior_means, square_avgs, lr, prior_precision, noise_scale, alpha, eps, seed, step, offsets)


def _multi_tensor_sgld(
    params: list[Tensor], grads: list[Tensor], prior_means: list[Tensor], square_avgs: list[Tensor],
    lr: float, prior_precision: float, noise_scale: float, alpha: float, eps: float,
    seed: int, step: int, offsets: list[int],
) -> None:
    """The update with ``torch._foreach`` ops, per device and dtype, in float32 (float64 for float64)."""
    for idx in _buckets(params).values():
        ps = [params[i] for i in idx]
        low = ps[0].dtype in _LOW_PRECISION
        up = (lambda xs: [xs[i].float() for i in idx]) if low else (lambda xs: [xs[i] for i in idx])
        theta = up(params)
        diff = torch._foreach_sub(theta, up(prior_means)) if prior_means else theta
        g_tot = torch._foreach_add(up(grads), diff, alpha=prior_precision)
        if square_avgs:
            v = up(square_avgs)
            torch._foreach_mul_(v, alpha)
            torch._foreach_addcmul_(v, g_tot, g_tot, value=1.0 - alpha)
            precond = torch._foreach_sqrt(v)
            torch._foreach_add_(precond, eps)
            torch._foreach_reciprocal_(precond)
            torch._foreach_mul_(g_tot, precond)
        torch._foreach_add_(theta, g_tot, alpha=-lr)
        if noise_scale != 0.0:
            xi = [noise.normal(p.shape, seed, offsets[i], stream=step, device=p.device).to(theta[0].dtype) for i, p in zip(idx, ps)]
            if square_avgs:
                torch._foreach_sqrt_(precond)
                torch._foreach_mul_(xi, precond)
            torch._foreach_add_(theta, xi, alpha=noise_scale)
        if low:
            torch._foreach_copy_(ps, theta)
            if square_avgs:
                torch._foreach_copy_([square_avgs[i] for i in idx], v)


__all__ = ["BayesSGLD", "sgld"]
