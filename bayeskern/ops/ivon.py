"""IVON's update (Shen et al. 2024, "Variational Learning is Effective for Large Deep Networks"), one
tensor at a time: the specification ``bayeskern.IVON`` runs.

The posterior over a parameter is ``N(m, sigma^2)`` elementwise, m the parameter itself, with

    sigma = 1 / sqrt(ess (h + delta)),   ess = N / T,   delta = 1 / (N sp^2)

(N training examples, temperature T, prior std sp; h the running Hessian estimate).  A step takes K
samples ``theta_k = m + sigma eps_k`` (eps_k Philox normals) and the gradients ``g_k`` of the mean
minibatch loss there; with their means ``g = mean_k g_k`` and ``e = mean_k g_k eps_k``, at step t
(from 1), in float32 maths for fp32/fp16/bf16 tensors (float64 for float64):

    g_bar <- beta1 g_bar + (1 - beta1) g
    h_hat  = e / sigma                                         (reparameterisation Hessian estimate)
    h     <- beta2 h + (1 - beta2) h_hat + (1 - beta2)^2 / 2 (h - h_hat)^2 / (h + delta)
    m     <- m - lr' clip((g_bar / (1 - beta1^t) + delta (m - theta0)) / (h + delta), -r, r)

with theta0 the prior mean (zero when None), r ``clip_radius`` and ``lr' = lr (h0 + delta)`` under
``rescale_lr`` (h0: ``hess_init``; ``ivon-opt``'s convention, so its published learning rates carry
over), else ``lr``.  The third term of the h update keeps h positive.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def posterior_std(hess: Tensor, ess: float, delta: float) -> Tensor:
    """``sigma = 1 / sqrt(ess (h + delta))`` in the compute dtype of ``hess``."""
    return (hess.to(_compute_dtype(hess)) + delta).mul(ess).rsqrt()


@torch.no_grad()
def reference_ivon_update_(
    param: Tensor,
    momentum: Tensor,
    hess: Tensor,
    grad_mean: Tensor,
    grad_eps_mean: Tensor,
    prior_mean: Tensor | None,
    *,
    lr: float,
    ess: float,
    delta: float,
    beta1: float,
    beta2: float,
    step: int,
    clip_radius: float,
) -> None:
    """One IVON update of ``param`` (m), ``momentum`` (g_bar) and ``hess`` (h) in place (module
    docstring; ``lr`` is lr', already rescaled; ``step`` is t >= 1)."""
    dtype = _compute_dtype(param)
    h = hess.to(dtype)
    h_hat = grad_eps_mean.to(dtype) * (h + delta).mul(ess).sqrt()
    g_bar = momentum.to(dtype).mul(beta1).add_(grad_mean.to(dtype), alpha=1.0 - beta1)
    h_new = h * beta2 + h_hat * (1.0 - beta2) + (h - h_hat).square() * (0.5 * (1.0 - beta2) ** 2) / (h + delta)
    m = param.to(dtype)
    offset = m if prior_mean is None else m - prior_mean.to(dtype)
    direction = (g_bar / (1.0 - beta1**step) + delta * offset) / (h_new + delta)
    if math.isfinite(clip_radius):
        direction = direction.clamp(-clip_radius, clip_radius)
    param.copy_(m - lr * direction)
    momentum.copy_(g_bar)
    hess.copy_(h_new)
