"""Parameter-level dropout: each weight is kept with probability ``1 - p``.

``keep_j = u_j >= p`` with ``u_j`` the Philox uniform of (seed, offset + j, stream) (``philox.py``),
so the backward pass regenerates the mask instead of storing it.  Without ``fill`` kept weights are
scaled, ``out = keep * w / (1 - p)``; with ``fill`` (e.g. the prior mean) dropped weights take it,
``out = keep * w + (1 - keep) * fill``.  Gradients: ``grad_w = g * keep * scale``,
``grad_fill = g - grad_w`` (scale = 1 with fill).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import philox
from .backend import dispatch
from .checks import check_floating, check_index, check_same_layout


def _scale(p: float, has_fill: bool) -> float:
    return 1.0 if has_fill else 1.0 / (1.0 - p)


def _keep_mask(seed: int, offset: int, stream: int, like: Tensor, p: float) -> Tensor:
    u = philox.uniform(seed, offset, like.numel(), stream, device=like.device).view(like.shape)
    return u >= torch.tensor(p, dtype=torch.float32)


def reference_weight_dropout(
    w: Tensor, p: float, seed: int, offset: int = 0, fill: Tensor | None = None, stream: int = 0
) -> Tensor:
    """The specification, in differentiable PyTorch."""
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    keep = _keep_mask(seed, offset, stream, w, p)
    dropped = torch.zeros((), dtype=dtype, device=w.device) if fill is None else fill.to(dtype)
    out = torch.where(keep, w.to(dtype) * _scale(p, fill is not None), dropped)
    return out.to(w.dtype).contiguous()


def reference_weight_dropout_backward(
    grad: Tensor, p: float, seed: int, offset: int, stream: int, scale: float
) -> Tensor:
    dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
    keep = _keep_mask(seed, offset, stream, grad, p)
    return torch.where(keep, grad.to(dtype) * scale, 0.0).to(grad.dtype).contiguous()


@torch.library.custom_op("bayeskern::weight_dropout", mutates_args=())
def _weight_dropout(w: Tensor, p: float, seed: Tensor, offset: int, stream: int, fill: Tensor | None) -> Tensor:
    key = int(seed)
    philox.check_key(key, offset, stream)
    return dispatch(
        "weight_dropout",
        w,
        (w, p, key, offset, stream, fill),
        lambda: reference_weight_dropout(w, p, key, offset, fill, stream),
    )


@_weight_dropout.register_fake
def _(w: Tensor, p: float, seed: Tensor, offset: int, stream: int, fill: Tensor | None) -> Tensor:
    return w.new_empty(w.shape)


@torch.library.custom_op("bayeskern::weight_dropout_backward", mutates_args=())
def _weight_dropout_backward(grad: Tensor, p: float, seed: Tensor, offset: int, stream: int, scale: float) -> Tensor:
    key = int(seed)
    return dispatch(
        "weight_dropout_backward",
        grad,
        (grad, p, key, offset, stream, scale),
        lambda: reference_weight_dropout_backward(grad, p, key, offset, stream, scale),
    )


@_weight_dropout_backward.register_fake
def _(grad: Tensor, p: float, seed: Tensor, offset: int, stream: int, scale: float) -> Tensor:
    return grad.new_empty(grad.shape)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    _, p, seed, offset, stream, fill = inputs
    ctx.save_for_backward(seed)
    ctx.p, ctx.offset, ctx.stream, ctx.has_fill = p, offset, stream, fill is not None


def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None, None, Tensor | None]:
    (seed,) = ctx.saved_tensors
    scale = _scale(ctx.p, ctx.has_fill)
    grad_w = _weight_dropout_backward(grad, ctx.p, seed, ctx.offset, ctx.stream, scale)
    grad_fill = grad - grad_w if ctx.has_fill and ctx.needs_input_grad[5] else None
    return (grad_w if ctx.needs_input_grad[0] else None), None, None, None, None, grad_fill


_weight_dropout.register_autograd(_backward, setup_context=_setup_context)


def check_probability(p: float) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"p must be a probability in [0, 1), got {p!r}")


def weight_dropout(
    w: Tensor, p: float, seed: int | Tensor, offset: int = 0, fill: Tensor | None = None, *, stream: int = 0
) -> Tensor:
    """Drop each element of ``w`` with probability ``p`` (Philox keyed by seed, offset + index, stream).

    Kept elements are scaled by ``1 / (1 - p)`` when ``fill`` is None; otherwise dropped elements
    take ``fill`` (same shape as ``w``) and kept ones are unscaled.  The mask is regenerated in
    backward, never stored.  Returns a contiguous tensor of ``w``'s dtype.
    """
    check_floating(w, "w")
    check_probability(p)
    if fill is not None:
        check_same_layout(w, fill, "w", "fill")
    check_index(offset, "offset")
    check_index(stream, "stream")
    out: Tensor = _weight_dropout(w, float(p), philox.seed_tensor(seed), offset, stream, fill)
    return out
