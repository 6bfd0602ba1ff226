"""Reparameterised Gaussian weight sampling: ``w = mu + softplus(rho) * eps``.

``eps`` is the Philox normal of (seed, offset + element index, stream) (see ``philox.py``), so the
backward pass regenerates it instead of saving a parameter-sized tensor:
``grad_mu = g``, ``grad_rho = g * eps * sigmoid(rho)``.  Maths in float32 for fp32/fp16/bf16 inputs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import philox
from .backend import dispatch
from .checks import check_floating, check_index, check_same_layout


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def reference_gaussian_sample(mu: Tensor, rho: Tensor, seed: int, offset: int = 0, stream: int = 0) -> Tensor:
    """The specification, in differentiable PyTorch."""
    dtype = _compute_dtype(mu)
    eps = philox.normal(seed, offset, mu.numel(), stream, device=mu.device).view(mu.shape).to(dtype)
    return (mu.to(dtype) + F.softplus(rho.to(dtype)) * eps).to(mu.dtype).contiguous()


def reference_gaussian_sample_backward(
    grad: Tensor, rho: Tensor, seed: int, offset: int = 0, stream: int = 0
) -> Tensor:
    """``grad_rho = grad * eps * sigmoid(rho)`` with eps regenerated."""
    dtype = _compute_dtype(rho)
    eps = philox.normal(seed, offset, rho.numel(), stream, device=rho.device).view(rho.shape).to(dtype)
    return (grad.to(dtype) * eps * torch.sigmoid(rho.to(dtype))).to(rho.dtype).contiguous()


@torch.library.custom_op("bayeskern::gaussian_sample", mutates_args=())
def _gaussian_sample(mu: Tensor, rho: Tensor, seed: Tensor, offset: int, stream: int) -> Tensor:
    key = int(seed)
    philox.check_key(key, offset, stream)
    return dispatch(
        "gaussian_sample",
        mu,
        (mu, rho, key, offset, stream),
        lambda: reference_gaussian_sample(mu, rho, key, offset, stream),
    )


@_gaussian_sample.register_fake
def _(mu: Tensor, rho: Tensor, seed: Tensor, offset: int, stream: int) -> Tensor:
    return mu.new_empty(mu.shape)


@torch.library.custom_op("bayeskern::gaussian_sample_backward", mutates_args=())
def _gaussian_sample_backward(grad: Tensor, rho: Tensor, seed: Tensor, offset: int, stream: int) -> Tensor:
    key = int(seed)
    return dispatch(
        "gaussian_sample_backward",
        rho,
        (grad, rho, key, offset, stream),
        lambda: reference_gaussian_sample_backward(grad, rho, key, offset, stream),
    )


@_gaussian_sample_backward.register_fake
def _(grad: Tensor, rho: Tensor, seed: Tensor, offset: int, stream: int) -> Tensor:
    return rho.new_empty(rho.shape)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    _, rho, seed, offset, stream = inputs
    ctx.save_for_backward(rho, seed)
    ctx.offset, ctx.stream = offset, stream


def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None]:
    rho, seed = ctx.saved_tensors
    grad_rho = _gaussian_sample_backward(grad, rho, seed, ctx.offset, ctx.stream) if ctx.needs_input_grad[1] else None
    grad_mu = grad if ctx.needs_input_grad[0] else None
    return grad_mu, grad_rho, None, None, None


_gaussian_sample.register_autograd(_backward, setup_context=_setup_context)


def gaussian_sample(mu: Tensor, rho: Tensor, seed: int | Tensor, offset: int = 0, *, stream: int = 0) -> Tensor:
    """Draw ``w = mu + softplus(rho) * eps``, eps ~ N(0, 1) keyed by (seed, offset + index, stream).

    Differentiable in ``mu`` and ``rho``; the backward regenerates eps (nothing parameter-sized is
    saved besides ``rho`` itself).  ``seed`` may be an int or a 0-d integer tensor (use a tensor under
    ``torch.compile`` to avoid recompiling per seed).  Returns a contiguous tensor of ``mu``'s dtype.
    """
    check_floating(mu, "mu")
    check_same_layout(mu, rho, "mu", "rho")
    check_index(offset, "offset")
    check_index(stream, "stream")
    out: Tensor = _gaussian_sample(mu, rho, philox.seed_tensor(seed), offset, stream)
    return out
