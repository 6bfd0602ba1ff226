"""Closed-form per-example squared gradients, one rule per functional op.

Every rule sees one call ``y = op(x, weight, bias, ...)`` of a batch of B examples (x's first
dimension) and, in the backward pass, the output gradient ``g = dL/dy``.  With ``sum_b`` over
examples, ``sum_pos`` over the other (token / pixel) positions of one example:

* ``linear``:     ``F_W += sum_b (sum_pos g a^T)^2`` (``ops.sq_grad_accumulate``), ``F_b += sum_b (sum_pos g)^2``;
* ``conv2d``:     the same with ``a`` the unfolded input patches (per group), chunked over examples;
* ``layer_norm`` / ``batch_norm`` (running statistics): ``y = xhat * w + b`` so
  ``F_w += sum_b (sum_pos g xhat)^2``, ``F_b += sum_b (sum_pos g)^2``;
* ``embedding``:  row v of example b gets ``sum_{pos: idx = v} g``; squared, summed over b;
* ``broadcast``:  a parameter of shape ``(1, ...)`` used directly (class token, position embedding)
  is fed to the network expanded to ``(B, ...)``; the gradient of the expansion is per example,
  ``F += sum_b g_b^2``.

A rule's ``accumulate(slots, g, call)`` adds to ``slots[role]`` (the Fisher of the call's
``weight`` / ``bias``, None when that parameter is not chosen), reading the op's arguments
from ``call``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bayeskern.ops.fisher import sq_grad_accumulate

UNFOLD_CHUNK_ELEMENTS = 2**24  # at most this many unfolded-input entries exist at once
ROLES = ("weight", "bias")
Slots = dict[str, "Tensor | None"]


def add_square_sum(fisher: Tensor | None, per_example: Tensor) -> None:
    """``fisher += sum_b per_example[b]^2`` (in fisher's dtype)."""
    if fisher is not None:
        fisher.add_(per_example.to(fisher.dtype).square().sum(0).view(fisher.shape))


def sum_positions(t: Tensor, keep: int) -> Tensor:
    """Sum ``t (B, *positions, *trailing)`` over the position axes, keeping ``keep`` trailing axes."""
    dims = tuple(range(1, t.dim() - keep))
    return t.sum(dims) if dims else t


def _linear(slots: Slots, g: Tensor, call: dict[str, Any]) -> None:
    x = call["input"]
    batch = x.shape[0]
    if slots["weight"] is not None:
        sq_grad_accumulate(slots["weight"], g.reshape(batch, -1, g.shape[-1]), x.reshape(batch, -1, x.shape[-1]))
    add_square_sum(slots["bias"], sum_positions(g, 1))


def _same_padding(x: Tensor, weight: Tensor, dilation: tuple[int, int]) -> Tensor:
    pads = []
    for k, d in zip(reversed(weight.shape[2:]), reversed(dilation)):
        total = d * (k - 1)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _conv2d(slots: Slots, g: Tensor, call: dict[str, Any]) -> None:
    x, weight, groups = call["input"], call["weight"], call["groups"]
    stride, dilation, padding = _pair(call["stride"]), _pair(call["dilation"]), call["padding"]
    if isinstance(padding, str):
        x = _same_padding(x, weight, dilation) if padding == "same" else x
        padding = 0
    add_square_sum(slots["bias"], g.sum((2, 3)))
    fisher = slots["weight"]
    if fisher is None:
        return
    out_per_group = weight.shape[0] // groups
    fisher = fisher.view(groups, out_per_group, -1)
    g = g.flatten(2)  # (B, out, L)
    patch = fisher.shape[2]
    chunk = max(1, UNFOLD_CHUNK_ELEMENTS // (patch * groups * g.shape[2]))
    for start in range(0, x.shape[0], chunk):
        cols = F.unfold(x[start:start + chunk], weight.shape[2:], _pair(dilation), _pair(padding), stride)
        g_chunk = g[start:start + chunk]
        for k in range(groups):
            sq_grad_accumulate(
                fisher[k],
                g_chunk[:, k * out_per_group:(k + 1) * out_per_group].transpose(1, 2),
                cols[:, k * patch:(k + 1) * patch].transpose(1, 2),
            )


def _affine(slots: Slots, g: Tensor, xhat: Tensor, keep: int) -> None:
    if slots["weight"] is not None:
        add_square_sum(slots["weight"], sum_positions(g * xhat.to(g.dtype), keep))
    add_square_sum(slots["bias"], sum_positions(g, keep))


def _layer_norm(slots: Slots, g: Tensor, call: dict[str, Any]) -> None:
    shape = tuple(call["normalized_shape"])
    xhat = F.layer_norm(call["input"].float(), shape, eps=call["eps"])
    _affine(slots, g.float(), xhat, len(shape))


def _batch_norm(slots: Slots, g: Tensor, call: dict[str, Any]) -> None:
    x = call["input"].float()
    xhat = F.batch_norm(x, call["running_mean"], call["running_var"], training=False, eps=call["eps"])
    channels_last = g.float().movedim(1, -1)
    _affine(slots, channels_last, xhat.movedim(1, -1), 1)


def _embedding(slots: Slots, g: Tensor, call: dict[str, Any]) -> None:
    index, weight = call["input"], call["weight"]
    rows, dim = weight.shape
    batch = index.shape[0]
    keys = (torch.arange(batch, device=index.device)[:, None] * rows + index.reshape(batch, -1)).flatten()
    unique, inverse = torch.unique(keys, return_inverse=True)
    fisher = slots["weight"]
    per_example = fisher.new_zeros(unique.numel(), dim).index_add_(0, inverse, g.reshape(-1, dim).to(fisher.dtype))
    row = unique % rows
    padding = call["padding_idx"]
    if padding is not None:
        per_example[row == padding % rows] = 0
    fisher.index_add_(0, row, per_example.square())


def _batch_first(call: dict[str, Any], batch: int) -> bool:
    x = call["input"]
    return isinstance(x, Tensor) and x.dim() >= 2 and x.shape[0] == batch


@dataclass(frozen=True)
class Rule:
    """How one functional op binds its arguments and accumulates its parameters' Fisher."""

    names: tuple[str, ...]
    defaults: dict[str, Any]
    accumulate: Callable[[Slots, Tensor, dict[str, Any]], None]
    supports: Callable[[dict[str, Any], int], bool] = _batch_first

    def bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        call = dict(self.defaults)
        call.update(zip(self.names, args))
        call.update(kwargs)
        return call


def _batch_norm_supported(call: dict[str, Any], batch: int) -> bool:
    uses_running_stats = not call["training"] and call["running_mean"] is not None
    return uses_running_stats and _batch_first(call, batch)


def _embedding_supported(call: dict[str, Any], batch: int) -> bool:
    index = call["input"]
    plain = call["max_norm"] is None and not call["scale_grad_by_freq"]
    return plain and index.dim() >= 1 and index.shape[0] == batch and call["weight"].dim() == 2


RULES: dict[Callable, Rule] = {
    F.linear: Rule(("input", "weight", "bias"), {"bias": None}, _linear),
    F.conv2d: Rule(
        ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
        {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1},
        _conv2d,
        lambda call, batch: _batch_first(call, batch) and call["input"].dim() == 4,
    ),
    F.layer_norm: Rule(
        ("input", "normalized_shape", "weight", "bias", "eps"), {"weight": None, "bias": None, "eps": 1e-5}, _layer_norm
    ),
    F.batch_norm: Rule(
        ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
        {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5},
        _batch_norm,
        _batch_norm_supported,
    ),
    F.embedding: Rule(
        ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
        {"padding_idx": None, "max_norm": None, "norm_type": 2.0, "scale_grad_by_freq": False, "sparse": False},
        _embedding,
        _embedding_supported,
    ),
}


def broadcastable(param: Tensor) -> bool:
    """Whether ``param`` looks like a tensor broadcast along the batch: shape ``(1, ...)``, ndim >= 2."""
    return param.dim() >= 2 and param.shape[0] == 1
