"""Stochastic-gradient Langevin dynamics: the update, and its three implementations side by side.

For each element of a parameter theta with gradient g (of the mean minibatch loss) and prior mean
theta0 (zero when ``prior_means`` is empty), in float32 for fp32/fp16/bf16 tensors (float64 for
float64), with lam = 1 / (N sp^2) and s = sqrt(2 lr T / N) (N training examples, prior std sp,
temperature T):

    g_tot = g + lam * (theta - theta0)
    SGLD:   theta <- (theta - lr * g_tot) + s * xi
    pSGLD:  v <- alpha * v + (1 - alpha) * g_tot^2,   G = 1 / (eps + sqrt(v))        (square_avgs given)
            theta <- (theta - lr * (G * g_tot)) + (s * sqrt(G)) * xi

xi is the Philox normal of (seed, offsets[i] + element index, stream = step) (``philox.py``; lay
tensors out with ``philox.tensor_offsets``), so a run resumed from a checkpoint draws exactly the
noise of the uninterrupted run.  The pSGLD form is Li et al. (2016) without the Gamma (divergence
of G) correction term.  When s = 0 (temperature 0) no noise is drawn: the update is gradient descent
on the MAP objective.

The implementations, all of this update (``sgld(...)`` picks one, as ``BayesSGLD``'s
``foreach`` / ``fused`` flags ask):

* ``reference_sgld_step_`` -- the specification, one tensor at a time in plain PyTorch;
* ``_multi_tensor_sgld``  -- ``torch._foreach`` ops per (device, dtype) bucket, the noise from
  ``noise.normal`` (the fastest backend's Philox);
* ``sgld_step_``          -- the fused kernel over a whole bucket (Triton, or the C++ CPU / CUDA
  kernels; the backend policy of ``backend.py`` chooses).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import TypeVar

import torch
from torch import Tensor

from . import noise, philox
from .backend import backend_for, kernels
from .checks import check_index, check_same_layout


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _drift_and_noise_scales(lr: float, num_data: float, prior_std: float, temperature: float) -> tuple[float, float]:
    """``lam = 1 / (N sp^2)`` and ``s = sqrt(2 lr T / N)`` of the module docstring."""
    return 1.0 / (num_data * prior_std**2), math.sqrt(2.0 * lr * temperature / num_data)


def reference_sgld_step_(
    params: list[Tensor],
    grads: list[Tensor],
    prior_means: list[Tensor],
    square_avgs: list[Tensor],
    lr: float,
    prior_precision: float,
    noise_scale: float,
    alpha: float,
    eps: float,
    seed: int,
    step: int,
    offsets: list[int],
) -> None:
    """The specification: one tensor at a time, in plain PyTorch (``prior_precision`` = lam, ``noise_scale`` = s)."""
    for i, theta in enumerate(params):
        dtype = _compute_dtype(theta)
        t = theta.to(dtype)
        diff = t - prior_means[i].to(dtype) if prior_means else t
        g_tot = grads[i].to(dtype) + prior_precision * diff
        if square_avgs:
            v = alpha * square_avgs[i].to(dtype) + (1.0 - alpha) * (g_tot * g_tot)
            precond = 1.0 / (eps + torch.sqrt(v))
            t = t - lr * (precond * g_tot)
            square_avgs[i].copy_(v)
        else:
            t = t - lr * g_tot
        if noise_scale != 0.0:
            xi = philox.normal(seed, offsets[i], theta.numel(), step, device=theta.device).view(theta.shape).to(dtype)
            scale = noise_scale * torch.sqrt(precond) if square_avgs else noise_scale
            t = t + scale * xi
        theta.copy_(t)


@torch.library.custom_op("bayeskern::sgld_step_", mutates_args=("params", "square_avgs"))
def _sgld_step_(
    params: list[Tensor],
    grads: list[Tensor],
    prior_means: list[Tensor],
    square_avgs: list[Tensor],
    lr: float,
    prior_precision: float,
    noise_scale: float,
    alpha: float,
    eps: float,
    seed: Tensor,
    step: int,
    offsets: list[int],
) -> None:
    key = int(seed)
    hyper = (lr, prior_precision, noise_scale, alpha, eps)
    backend = backend_for("sgld_step_", params[0])
    if backend == "reference":
        reference_sgld_step_(params, grads, prior_means, square_avgs, *hyper, key, step, offsets)
        return
    # the kernels expect dense tensors; strided parameters are updated through a copy
    work = [p.contiguous() for p in params]
    work_avgs = [v.contiguous() for v in square_avgs]
    kernels(backend, "sgld_step_").sgld_step_(
        work,
        [g.contiguous() for g in grads],
        [m.contiguous() for m in prior_means],
        work_avgs,
        *hyper,
        key,
        step,
        offsets,
    )
    for dst, src in zip([*params, *square_avgs], [*work, *work_avgs]):
        if dst.data_ptr() != src.data_ptr():
            dst.copy_(src)


@_sgld_step_.register_fake
def _(
    params: list[Tensor],
    grads: list[Tensor],
    prior_means: list[Tensor],
    square_avgs: list[Tensor],
    lr: float,
    prior_precision: float,
    noise_scale: float,
    alpha: float,
    eps: float,
    seed: Tensor,
    step: int,
    offsets: list[int],
) -> None:
    return None


def _check_lists(
    params: list[Tensor],
    grads: list[Tensor],
    prior_means: list[Tensor],
    square_avgs: list[Tensor],
    offsets: list[int],
) -> None:
    if not params:
        return
    first = params[0]
    if not first.dtype.is_floating_point:
        raise ValueError(f"params must be floating-point tensors, got {first.dtype}")
    for name, values in (
        ("grads", grads),
        ("offsets", offsets),
        ("prior_means", prior_means),
        ("square_avgs", square_avgs),
    ):
        if name in ("prior_means", "square_avgs") and not values:
            continue
        if len(values) != len(params):
            raise ValueError(f"{name} has {len(values)} entries but params has {len(params)}")
    for i, theta in enumerate(params):
        if theta.dtype != first.dtype or theta.device != first.device:
            raise ValueError(
                f"params[{i}] is {theta.dtype} on {theta.device} but params[0] is {first.dtype} on {first.device}"
            )
        check_same_layout(theta, grads[i], f"params[{i}]", f"grads[{i}]")
        if prior_means:
            check_same_layout(theta, prior_means[i], f"params[{i}]", f"prior_means[{i}]")
        if square_avgs:
            check_same_layout(theta, square_avgs[i], f"params[{i}]", f"square_avgs[{i}]")
        check_index(offsets[i], f"offsets[{i}]")
        philox.check_key(0, offsets[i] + theta.numel(), 0)


def first_nonfinite(tensors: Sequence[Tensor]) -> int | None:
    """Index of the first tensor holding a NaN or an infinity, or None when all are finite.

    On CPU with the C++ backend: one parallel pass over every element.  Elsewhere: each tensor's
    minimum and maximum (both propagate NaN) and one device synchronisation.
    """
    tensors = list(tensors)
    if not tensors:
        return None
    if backend_for("first_nonfinite", tensors[0], tensors=tensors) == "cpp":
        index = kernels("cpp", "first_nonfinite").first_nonfinite(tensors)
        return None if index < 0 else index
    device = tensors[0].device
    bounds = torch.stack(
        [
            torch.stack(torch.aminmax(t)).to(device, torch.float64)
            if t.numel()
            else torch.zeros(2, dtype=torch.float64, device=device)
            for t in tensors
        ]
    )
    finite = bounds.isfinite().all(1)
    return None if bool(finite.all()) else int((~finite).nonzero()[0])


def check_hyperparameters(
    lr: float, num_data: float, prior_std: float, temperature: float, alpha: float, eps: float
) -> None:
    """Raise ValueError naming the first invalid SGLD hyperparameter."""
    rules = (
        ("lr", lr, lr >= 0, ">= 0"),
        ("num_data", num_data, num_data > 0, "> 0"),
        ("prior_std", prior_std, prior_std > 0, "> 0"),
        ("temperature", temperature, temperature >= 0, ">= 0"),
        ("alpha", alpha, 0 <= alpha < 1, "in [0, 1)"),
        ("eps", eps, eps >= 0, ">= 0"),
    )
    for name, value, ok, what in rules:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok:
            raise ValueError(f"Invalid {name}: {value!r} (must be a finite number {what})")


def sgld_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    prior_means: Sequence[Tensor] | None = None,
    square_avgs: Sequence[Tensor] | None = None,
    *,
    lr: float,
    num_data: float,
    prior_std: float = 1.0,
    temperature: float = 1.0,
    alpha: float = 0.99,
    eps: float = 1e-8,
    seed: int | Tensor,
    step: int,
    offsets: Sequence[int],
) -> None:
    """One SGLD (or, with ``square_avgs``, pSGLD) update of every tensor in ``params``, in place.

    All tensors share one dtype and device; ``grads``, ``prior_means`` (None: zero prior mean) and
    ``square_avgs`` (None: no preconditioner; updated in place) match ``params`` one to one.
    ``offsets[i]`` places tensor i in the Philox counter space (give tensors disjoint ranges, as
    ``philox.tensor_offsets`` does) and ``step`` is the noise stream.  See the module docstring for
    the exact update.
    """
    params, grads, offsets = list(params), list(grads), [int(o) for o in offsets]
    prior_means, square_avgs = list(prior_means or []), list(square_avgs or [])
    check_hyperparameters(lr, num_data, prior_std, temperature, alpha, eps)
    check_index(step, "step")
    _check_lists(params, grads, prior_means, square_avgs, offsets)
    if not params:
        return
    prior_precision, noise_scale = _drift_and_noise_scales(lr, num_data, prior_std, temperature)
    with torch.no_grad():
        _sgld_step_(
            params,
            grads,
            prior_means,
            square_avgs,
            float(lr),
            prior_precision,
            noise_scale,
            float(alpha),
            float(eps),
            philox.seed_tensor(seed),
            step,
            offsets,
        )


# -- the functional step and the foreach implementation ---------------------------------------------
_LOW_PRECISION = (torch.float16, torch.bfloat16)


_T = TypeVar("_T")


def _take(xs: Sequence[_T], idx: list[int]) -> list[_T]:
    """The entries of ``xs`` at ``idx`` (one (device, dtype) bucket)."""
    return [xs[i] for i in idx]


def _buckets(params: list[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        buckets[(p.device, p.dtype)].append(i)
    return buckets


def sgld(
    params: list[Tensor],
    grads: list[Tensor],
    prior_means: list[Tensor],
    square_avgs: list[Tensor],
    *,
    lr: float,
    num_data: float,
    prior_std: float,
    temperature: float,
    alpha: float,
    eps: float,
    seed: int,
    step: int,
    offsets: list[int],
    foreach: bool | None = None,
    fused: bool | None = None,
) -> None:
    """Functional SGLD step (see the module docstring); picks the fused kernel, foreach or reference path.

    The fused kernel unless ``foreach`` (or ``fused=False``) asks otherwise; ``foreach=False,
    fused=False`` runs the reference.  Tensors may mix devices and dtypes (each (device, dtype)
    bucket is one update).  ``prior_means`` / ``square_avgs`` are empty for a zero prior mean / no
    preconditioner.
    """
    if fused or (fused is None and not foreach):
        for idx in _buckets(params).values():
            sgld_step_(
                _take(params, idx),
                _take(grads, idx),
                _take(prior_means, idx) if prior_means else None,
                _take(square_avgs, idx) if square_avgs else None,
                lr=lr,
                num_data=num_data,
                prior_std=prior_std,
                temperature=temperature,
                alpha=alpha,
                eps=eps,
                seed=seed,
                step=step,
                offsets=_take(offsets, idx),
            )
        return
    prior_precision, noise_scale = _drift_and_noise_scales(lr, num_data, prior_std, temperature)
    impl = _multi_tensor_sgld if foreach else reference_sgld_step_
    impl(params, grads, prior_means, square_avgs, lr, prior_precision, noise_scale, alpha, eps, seed, step, offsets)


def _multi_tensor_sgld(
    params: list[Tensor],
    grads: list[Tensor],
    prior_means: list[Tensor],
    square_avgs: list[Tensor],
    lr: float,
    prior_precision: float,
    noise_scale: float,
    alpha: float,
    eps: float,
    seed: int,
    step: int,
    offsets: list[int],
) -> None:
    """The update with ``torch._foreach`` ops, per device and dtype, in float32 (float64 for float64)."""
    for idx in _buckets(params).values():
        ps = [params[i] for i in idx]
        low = ps[0].dtype in _LOW_PRECISION
        up = (lambda xs: [xs[i].float() for i in idx]) if low else (lambda xs: [xs[i] for i in idx])  # noqa: B023
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
            xi = [
                noise.normal(p.shape, seed, offsets[i], stream=step, device=p.device).to(theta[0].dtype)
                for i, p in zip(idx, ps)
            ]
            if square_avgs:
                torch._foreach_sqrt_(precond)
                torch._foreach_mul_(xi, precond)
            torch._foreach_add_(theta, xi, alpha=noise_scale)
        if low:
            torch._foreach_copy_(ps, theta)
            if square_avgs:
                torch._foreach_copy_([square_avgs[i] for i in idx], v)
