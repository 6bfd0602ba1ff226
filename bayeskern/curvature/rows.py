"""Jacobian rows of a layer's weight as sums of outer products, and the layers that have them.

For ``y_t = W a_t (+ b)`` at positions t (tokens of a sequence, output pixels of a convolution, whose
inputs are its patches; one position for a plain batch), the derivative of a scalar s of the
outputs with respect to W is ``sum_t g_t a_t^T`` with ``g_t = d s / d y_t``: an (outputs, inputs)
matrix that never needs forming to be used.  ``OuterRows`` holds many such rows (one per example
and network output) as the g's and the a's; its quadratic forms ``sum_ij (L^T row R)_ij^2 w_ij``
(the linearised predictive's ``j^T Sigma j`` for a diagonal Sigma, or a Kronecker one in its
eigenbases L, R) cost ``out * in`` per row for one position instead of a Jacobian's autodiff pass,
and form a row only for several positions, a bounded number at a time.

``has_outer_form`` says which layers these are: ``nn.Linear`` (peft's LoRA ``A`` and ``B``
included) and ``nn.Conv2d`` without groups, string padding or a padding mode other than zeros.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DENSE_BYTES = 16 << 20  # rows of several positions are formed at most this many bytes at a time


def has_outer_form(module: nn.Module) -> bool:
    """Whether ``module``'s weight gradient is ``sum_t g_t a_t^T`` over ``inputs_by_position``."""
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and not isinstance(module.padding, str) and module.padding_mode == "zeros"
    return isinstance(module, nn.Linear)


def inputs_by_position(module: nn.Module, a: Tensor) -> Tensor:
    """A layer's inputs as ``(examples, positions, features)`` (a convolution's ``F.unfold`` patches,
    columns in the order of ``weight.flatten(1)``)."""
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(a, module.kernel_size, module.dilation, cast(Any, module.padding), module.stride)
        return patches.transpose(1, 2)
    return a.reshape(a.shape[0], -1, a.shape[-1])


def grads_by_position(module: nn.Module, g: Tensor) -> Tensor:
    """A layer's output gradients as ``(examples, positions, channels)``."""
    if isinstance(module, nn.Conv2d):
        return g.flatten(2).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])


def _times(rows: Tensor, matrix: Tensor) -> Tensor:
    """``rows @ matrix`` over the last axis as one matrix product (a strided batch would run as many)."""
    product = rows.reshape(-1, rows.shape[-1]) @ matrix.to(rows.dtype)
    return product.reshape(*rows.shape[:-1], matrix.shape[-1])


@dataclass(frozen=True)
class OuterRows:
    """Rows ``row[k] = sum_t grads[k, t] outer inputs[k, t]`` of a weight flattened to (outputs, inputs).

    ``grads`` is ``(*lead, positions, outputs)`` and ``inputs`` ``(*lead', positions, inputs)`` with
    ``lead'`` broadcasting to ``lead`` (one example's inputs serve all its network outputs).
    """

    grads: Tensor
    inputs: Tensor

    @property
    def lead(self) -> torch.Size:
        """The rows' leading shape."""
        return torch.Size(torch.broadcast_shapes(self.grads.shape[:-2], self.inputs.shape[:-2]))

    def rotated(self, left: Tensor, right: Tensor) -> OuterRows:
        """The rows ``L^T row R`` (``left``: (outputs, outputs), ``right``: (inputs, inputs))."""
        return OuterRows(_times(self.grads, left), _times(self.inputs, right))

    def dense(self) -> Tensor:
        """The rows formed: ``(*lead, outputs, inputs)``."""
        return self.grads.transpose(-1, -2) @ self.inputs

    def weighted_square_sum(self, weights: Tensor) -> Tensor:
        """``sum_ij row_ij^2 weights_ij`` per row, ``(*lead,)``; ``weights`` is (outputs, inputs)."""
        w = weights.to(self.grads.dtype)
        if self.grads.shape[-2] == 1 and self.inputs.shape[-2] == 1:  # one position: (g^2)^T w (a^2)
            return (_times(self.grads[..., 0, :].square(), w) * self.inputs[..., 0, :].square()).sum(-1)
        grads = self.grads.expand(*self.lead, *self.grads.shape[-2:]).flatten(0, -3)
        inputs = self.inputs.expand(*self.lead, *self.inputs.shape[-2:]).flatten(0, -3)
        per_row = w.numel() * w.element_size()
        step = max(1, DENSE_BYTES // per_row)
        flat = w.flatten()
        sums = [  # each chunk formed, squared in place and contracted with the weights: two passes over it
            (g.transpose(-1, -2) @ a).square_().flatten(1) @ flat
            for g, a in zip(grads.split(step), inputs.split(step), strict=True)
        ]
        return torch.cat(sums).reshape(self.lead)

    def dot(self, matrix: Tensor) -> Tensor:
        """``sum_ij row_ij matrix_ij = sum_t g_t^T M a_t`` per row, ``(*lead,)``; ``matrix`` is (outputs, inputs)."""
        projected = _times(self.inputs, matrix.T)  # (*lead', positions, outputs)
        return (self.grads * projected).sum((-2, -1))


def rotated_rows(rows: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """``L^T row R`` for formed rows ``(*lead, outputs, inputs)``, as two matrix products over all rows."""
    rows = _times(rows, right)
    return _times(rows.transpose(-1, -2), left).transpose(-1, -2)


JacobianRows = Mapping[str, Tensor | OuterRows]  # per Bayesian name: dense rows (*lead, *shape) or OuterRows
