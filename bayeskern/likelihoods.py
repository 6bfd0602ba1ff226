"""The two likelihoods every posterior and the predictive share.

* ``"classification"``: categorical on logits f, ``-log p(y | f) = -log softmax(f)_y``;
* ``"regression"``: Gaussian with std ``noise_std`` (sigma) per output,
  ``-log p(y | f) = sum_k (f_k - y_k)^2 / (2 sigma^2) + log(2 pi sigma^2) / 2``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

LIKELIHOODS = ("classification", "regression")


def gaussian_nll(mean: Tensor, target: Tensor, variance: Tensor | float) -> Tensor:
    """``-log N(target | mean, variance)`` elementwise: ``(target - mean)^2 / (2 variance) + log(2 pi variance) / 2``
    (``variance`` a tensor broadcasting against ``mean``, or one number; ValueError unless positive).  A number
    stays a Python float: the training loss neither copies it to the device nor synchronises to check it."""
    if isinstance(variance, Tensor):
        if not bool((variance > 0).all()):
            raise ValueError("variance must be positive (a predictive variance)")
        return 0.5 * ((target - mean).square() / variance + torch.log(2 * math.pi * variance))
    if not variance > 0:
        raise ValueError(f"variance must be positive (the regression likelihood's noise_std squared), got {variance!r}")
    return 0.5 * ((target - mean).square() / variance + math.log(2 * math.pi * variance))


def negative_log_likelihood(
    output: Tensor, target: Tensor, likelihood: str, noise_std: float, reduction: str = "mean"
) -> Tensor:
    """``-log p(target | output)`` per example, then averaged (``"mean"``) or summed (``"sum"``) over
    the examples (the first axis); computed in float32 or wider."""
    if output.dtype in (torch.float16, torch.bfloat16):
        output = output.float()
    if likelihood == "classification":
        return F.cross_entropy(output, target if target.is_floating_point() else target.long(), reduction=reduction)
    total = gaussian_nll(output, target.reshape(output.shape).to(output.dtype), noise_std**2).sum()
    return total / max(len(output), 1) if reduction == "mean" else total
