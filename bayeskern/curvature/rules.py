"""Closed-form per-example squared gradients, one rule per functional op.

Every rule sees one call ``y = op(x, weight, bias, ...)`` of a batch of B examples (x's first
dimension) and, in the backward pass, the output gradient ``g = dL/dy``.  With ``sum_b`` over
examples, ``sum_pos`` over the other (token / pixel) positions of one example:

* ``linear``:     ``F_W += sum_b (sum_pos g a^T)^2`` (``ops.sq_grad_accumulate``), ``F_b += sum_b (sum_pos g)^2``;
* ``conv2d``:     the same with ``a`` the unfolded input patches, chunked over examples (grouped and
  depthwise convolutions: one batched GEMM over (example, group) pairs);
* ``layer_norm`` / ``rms_norm`` / ``group_norm`` / ``batch_norm`` (running statistics):
  ``y = xhat * w + b`` so ``F_w += sum_b (sum_pos g xhat)^2``, ``F_b += sum_b (sum_pos g)^2``;
* ``embedding``:  row v of example b gets ``sum_{pos: idx = v} g``; squared, summed over b;
* ``broadcast``:  a parameter used directly and broadcast along the batch -- shape ``(1, ...)``
  (class token, position embedding), or the one operand of an elementwise op whose other operand
  is batch-first of higher rank (LayerScale's ``x * gamma``), or its one view shaped ``(1, ...)``
  (ConvNeXt's ``gamma.reshape(1, -1, 1, 1)``) -- is fed to the network expanded to
  ``(B, 1, ..., *shape)``; the gradient of the expansion is per example, ``F += sum_b g_b^2``.

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


def _linear(slots: Slots, g: Tensor, call: dict[str, Any]) -> None:
    x = call["input"]
    batch = x.shape[0]
    g = g.reshape(batch, -1, g.shape[-1])
    if slots["weight"] is not None:
        sq_grad_accumulate(slots["weight"], g, x.reshape(batch, -1, x.shape[-1]))
    add_square_sum(slots["bias"], g.sum(1))


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _pads(padding: Any, kernel: tuple[int, int], dilation: tuple[int, int]) -> list[int]:
    """``F.pad`` amounts (left, right, top, bottom) of a conv2d ``padding`` argument."""
    if padding == "valid":
        return [0, 0, 0, 0]
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return [totals[1] // 2, totals[1] - totals[1] // 2, totals[0] // 2, totals[0] - totals[0] // 2]
    ph, pw = _pair(padding)
    return [pw, pw, ph, ph]


def patches(
    x: Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: Any, dilation: tuple[int, int]
) -> Tensor:
    """The unfolded input of a conv2d, ``(B, L, C*kh*kw)`` (channel-major like the weight); strided
    views plus one copy (``F.unfold``'s CPU im2col is an order of magnitude slower)."""
    pads = _pads(padding, kernel, dilation)
    if any(pads):
        x = F.pad(x, pads)
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    windows = x.unfold(2, (kh - 1) * dh + 1, sh).unfold(3, (kw - 1) * dw + 1, sw)[..., ::dh, ::dw]
    batch, channels, rows, cols = windows.shape[:4]
    return windows.permute(0, 2, 3, 1, 4, 5).reshape(batch, rows * cols, channels * kh * kw)


def _conv2d(slots: Slots, g: Tensor, call: dict[str, Any]) -> None:
    x, weight, groups = call["input"], call["weight"], call["groups"]
    add_square_sum(slots["bias"], g.sum((2, 3)))
    fisher = slots["weight"]
    if fisher is None:
        return
    kernel, stride, dilation = tuple(weight.shape[2:]), _pair(call["stride"]), _pair(call["dilation"])
    fisher = fisher.view(groups, weight.shape[0] // groups, -1)
    g = g.flatten(2).transpose(1, 2)  # (B, L, out)
    positions = g.shape[1]
    per_example = max(positions * fisher.shape[0] * fisher.shape[2], fisher.numel() if groups > 1 else 0)
    chunk = max(1, UNFOLD_CHUNK_ELEMENTS // per_example)
    for start in range(0, x.shape[0], chunk):
        cols = patches(x[start : start + chunk], kernel, stride, call["padding"], dilation)
        if groups == 1:
            sq_grad_accumulate(fisher[0], g[start : start + chunk], cols)
        else:
            _grouped_tiles(fisher, g[start : start + chunk], cols)


def _grouped_tiles(fisher: Tensor, g: Tensor, cols: Tensor) -> None:
    """``fisher[k] += sum_b (g_bk^T a_bk)^2`` for every group k: one batched GEMM over (example, group)."""
    groups, outs, ins = fisher.shape
    batch, positions = g.shape[:2]
    g = g.reshape(batch, positions, groups, outs).permute(0, 2, 3, 1).reshape(batch * groups, outs, positions)
    cols = cols.reshape(batch, positions, groups, ins).transpose(1, 2).reshape(batch * groups, positions, ins)
    tiles = torch.bmm(g.to(fisher.dtype), cols.to(fisher.dtype)).view(batch, groups, outs, ins)
    fisher.add_(tiles.square_().sum(0))


def _affine(slots: Slots, g: Tensor, xhat: Tensor, dims: tuple[int, ...]) -> None:
    """Per-example ``sum_pos g * xhat`` (weight) and ``sum_pos g`` (bias) over the position axes ``dims``."""
    if slots["weight"] is not None:
        add_square_sum(slots["weight"], (g * xhat).sum(dims) if dims else g * xhat)
    add_square_sum(slots["bias"], g.sum(dims) if dims else g)


def _layer_norm(slots: Slots, g: Tensor, call: dict[str, Any]) -> None:
    shape = tuple(call["normalized_shape"])
    xhat = F.layer_norm(call["input"].float(), shape, eps=call["eps"])
    _affine(slots, g.float(), xhat, tuple(range(1, g.dim() - len(shape))))


def _rms_norm(slots: Slots, g: Tensor, call: dict[str, Any]) -> None:
    shape = tuple(call["normalized_shape"])
    xhat = F.rms_norm(call["input"].float(), shape, eps=call["eps"])
    _affine(slots, g.float(), xhat, tuple(range(1, g.dim() - len(shape))))


def _group_norm(slots: Slots, g: Tensor, call: dict[str, Any]) -> None:
    xhat = F.group_norm(call["input"].float(), call["num_groups"], eps=call["eps"])
    _affine(slots, g.float(), xhat, tuple(range(2, g.dim())))


def _batch_norm(slots: Slots, g: Tensor, call: dict[str, Any]) -> None:
    x = call["input"].float()
    xhat = F.batch_norm(x, call["running_mean"], call["running_var"], training=False, eps=call["eps"])
    _affine(slots, g.float(), xhat, tuple(range(2, g.dim())))


def _embedding(slots: Slots, g: Tensor, call: dict[str, Any]) -> None:
    index, weight = call["input"], call["weight"]
    rows, dim = weight.shape
    batch = index.shape[0]
    keys = (torch.arange(batch, device=index.device)[:, None] * rows + index.reshape(batch, -1)).flatten()
    unique, inverse = torch.unique(keys, return_inverse=True)
    fisher = slots["weight"]
    if fisher is None:  # the hook runs only for a call with a chosen weight
        return
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
    F.rms_norm: Rule(("input", "normalized_shape", "weight", "eps"), {"weight": None, "eps": None}, _rms_norm),
    F.group_norm: Rule(
        ("input", "num_groups", "weight", "bias", "eps"), {"weight": None, "bias": None, "eps": 1e-5}, _group_norm
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


ELEMENTWISE = {getattr(owner, name) for owner in (torch, torch.Tensor) for name in ("add", "sub", "mul", "div")} | {
    getattr(torch.Tensor, name)
    for name in (
        "add_",
        "sub_",
        "mul_",
        "div_",
        "__add__",
        "__radd__",
        "__iadd__",
        "__sub__",
        "__rsub__",
        "__isub__",
        "__mul__",
        "__rmul__",
        "__imul__",
        "__truediv__",
        "__rtruediv__",
        "__itruediv__",
    )
}


def elementwise_rank(func: Callable, args: tuple, param: Tensor, batch: int) -> int | None:
    """The rank of the batch-first operand ``param`` meets in an elementwise op ``func(*args)``, if it
    is broadcast along that operand's batch (higher rank), else None."""
    if func not in ELEMENTWISE or len(args) < 2:
        return None
    other = args[1] if args[0] is param else args[0]
    if isinstance(other, Tensor) and other.dim() > param.dim() and other.shape[0] == batch:
        return other.dim()
    return None


VIEWS = {
    torch.reshape,
    torch.unsqueeze,
    torch.Tensor.reshape,
    torch.Tensor.view,
    torch.Tensor.unsqueeze,
    torch.Tensor.view_as,
    torch.Tensor.__getitem__,
}


def is_batch_broadcast_view(func: Callable, args: tuple, param: Tensor, out: Any) -> bool:
    """Whether ``out = func(param, ...)`` is a view of ``param`` shaped ``(1, ...)``, ready to be
    broadcast along a batch (ConvNeXt's ``gamma.reshape(1, -1, 1, 1)``)."""
    is_view = func in VIEWS and bool(args) and args[0] is param
    return is_view and isinstance(out, Tensor) and out.dim() >= 2 and out.shape[0] == 1


def expand_to_batch(param: Tensor, rank: int, batch: int) -> Tensor:
    """``param`` viewed with leading ones to ``rank`` dims and expanded to ``batch`` along the first."""
    shape = (1,) * (rank - param.dim()) + tuple(param.shape)
    return param.view(shape).expand(batch, *shape[1:])
