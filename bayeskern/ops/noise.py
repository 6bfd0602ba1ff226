"""Plain Philox noise tensors on the fastest backend: the same numbers as ``philox.normal`` / ``philox.uniform``.

Used where noise is needed on its own rather than fused into an op (the foreach SGLD update, the
moment-matched sample bank, posterior samples for prediction).  Values are float32, keyed by (seed,
offset + element index, stream).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from . import philox
from .backend import dispatch
from .checks import check_floating, check_index, check_same_layout


@torch.library.custom_op("bayeskern::normal", mutates_args=())
def _normal(shape: Sequence[int], seed: Tensor, offset: int, stream: int, device: torch.device) -> Tensor:
    key = int(seed)
    out = torch.empty(shape, dtype=torch.float32, device=device)
    return dispatch(
        "fill_normal_",
        out,
        (out, key, offset, stream),
        lambda: philox.normal(key, offset, out.numel(), stream, device=device).view(out.shape),
    )


@_normal.register_fake
def _(shape: Sequence[int], seed: Tensor, offset: int, stream: int, device: torch.device) -> Tensor:
    return torch.empty(shape, dtype=torch.float32, device=device)


def normal(
    shape: Sequence[int], seed: int | Tensor, offset: int = 0, *, stream: int = 0, device: torch.device | str = "cpu"
) -> Tensor:
    """Standard normal float32 noise of ``shape``: element j is the Philox normal of (seed, offset + j, stream)."""
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must be non-negative, got {shape}")
    check_index(offset, "offset")
    check_index(stream, "stream")
    philox.check_key(0, offset + math.prod(shape), 0)
    out: Tensor = _normal(shape, philox.seed_tensor(seed), offset, stream, torch.device(device))
    return out


def gaussian(mean: Tensor, std: Tensor, seed: int | Tensor, offset: int = 0, *, stream: int = 0) -> Tensor:
    """``mean + std * eps`` (eps = ``normal(mean.shape, seed, offset, stream=stream)``), not differentiable.

    A posterior sample for prediction: with ``std`` computed once for all samples, it is the same
    draw as ``gaussian_sample(mean, rho, ...)`` with ``std = softplus(rho)`` (up to rounding) without
    its softplus per weight, which on CPU weighs as much as the noise.
    """
    check_floating(mean, "mean")
    check_same_layout(mean, std, "mean", "std")
    eps = normal(mean.shape, seed, offset, stream=stream, device=mean.device)
    return eps.to(mean.dtype).mul_(std).add_(mean)
