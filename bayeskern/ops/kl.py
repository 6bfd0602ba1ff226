"""KL divergence of a mean-field Gaussian from a Gaussian prior, fused.

``KL(N(mu, s^2) || N(m0, sp^2)) = sum_j log(sp / s_j) + (s_j^2 + (mu_j - m0_j)^2) / (2 sp^2) - 1/2``
with ``s = softplus(rho)``; gradients ``dKL/dmu = (mu - m0) / sp^2`` and
``dKL/drho = (s / sp^2 - 1 / s) * sigmoid(rho)``.

The C++ CPU kernel (``csrc/cpu/kl_kernels.cpp``) makes one pass each way for float32 tensors, a
scalar ``sp`` and ``m0`` either absent (zero) or a tensor of ``mu``'s layout (``backend.POLICY``);
everything else (other devices and dtypes, tensor ``sp``, the ``reference`` backend) runs the
differentiable reference, whose time goes mostly to ``softplus`` (not vectorised on CPU).  The
kernel flushes ``s`` below the smallest normal float32 (``rho < -87``) to it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import backend_for, kernels
from .checks import check_floating, check_same_layout


def reference_gaussian_kl(
    mu: Tensor, rho: Tensor, prior_mean: Tensor | None = None, prior_std: float | Tensor = 1.0
) -> Tensor:
    """The specification, in differentiable PyTorch (``prior_std`` may be a broadcastable tensor)."""
    s = F.softplus(rho)
    sp = torch.as_tensor(prior_std, dtype=mu.dtype, device=mu.device)
    diff = mu if prior_mean is None else mu - prior_mean
    return (torch.log(sp) - torch.log(s) + (s.square() + diff.square()) / (2 * sp.square()) - 0.5).sum()


@torch.library.custom_op("bayeskern::gaussian_kl", mutates_args=())
def _gaussian_kl(mu: Tensor, rho: Tensor, prior_mean: Tensor | None, prior_std: float) -> Tensor:
    kernel = kernels("cpp", "gaussian_kl")
    kl: Tensor = kernel.gaussian_kl(mu.contiguous(), rho.contiguous(), _contiguous(prior_mean), prior_std)
    return kl


@_gaussian_kl.register_fake
def _(mu: Tensor, rho: Tensor, prior_mean: Tensor | None, prior_std: float) -> Tensor:
    return mu.new_empty(())


@torch.library.custom_op("bayeskern::gaussian_kl_backward", mutates_args=())
def _gaussian_kl_backward(
    grad: Tensor, mu: Tensor, rho: Tensor, prior_mean: Tensor | None, prior_std: float
) -> tuple[Tensor, Tensor]:
    kernel = kernels("cpp", "gaussian_kl_backward")
    grads: tuple[Tensor, Tensor] = kernel.gaussian_kl_backward(
        grad, mu.contiguous(), rho.contiguous(), _contiguous(prior_mean), prior_std
    )
    return grads


@_gaussian_kl_backward.register_fake
def _(grad: Tensor, mu: Tensor, rho: Tensor, prior_mean: Tensor | None, prior_std: float) -> tuple[Tensor, Tensor]:
    return mu.new_empty(mu.shape), rho.new_empty(rho.shape)


def _contiguous(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    mu, rho, prior_mean, prior_std = inputs
    ctx.save_for_backward(mu, rho, prior_mean)
    ctx.prior_std = prior_std


def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None, None]:
    mu, rho, prior_mean = ctx.saved_tensors
    grad_mu, grad_rho = _gaussian_kl_backward(grad, mu, rho, prior_mean, ctx.prior_std)
    return grad_mu, grad_rho, None, None


_gaussian_kl.register_autograd(_backward, setup_context=_setup_context)


def gaussian_kl(mu: Tensor, rho: Tensor, prior_mean: Tensor | None = None, prior_std: float | Tensor = 1.0) -> Tensor:
    """``KL(N(mu, softplus(rho)^2) || N(prior_mean, prior_std^2))`` summed over elements (a 0-d tensor).

    ``prior_mean`` None means zero; ``prior_std`` is a positive float or a tensor broadcastable to
    ``mu``.  Differentiable in ``mu`` and ``rho``.
    """
    check_floating(mu, "mu")
    check_same_layout(mu, rho, "mu", "rho")
    if not isinstance(prior_std, Tensor) and not (math.isfinite(prior_std) and prior_std > 0):
        raise ValueError(f"prior_std must be positive, got {prior_std!r}")
    if backend_for("gaussian_kl", mu, prior_mean=prior_mean, prior_std=prior_std) == "cpp":
        kl: Tensor = _gaussian_kl(mu, rho, prior_mean, float(prior_std))
        return kl
    return reference_gaussian_kl(mu, rho, prior_mean, prior_std)
