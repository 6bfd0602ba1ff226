"""Sum over examples of squared per-example weight gradients of a linear map.

A linear map ``y_bt = W a_bt`` applied at positions t = 1..T of example b (the tokens of a
sequence, the output pixels of a convolution after unfold) gets the per-example weight gradient
``G_b = sum_t g_bt a_bt^T`` from the output gradients ``g_bt = dL/dy_bt``.  ``sq_grad_accumulate``
adds ``sum_b G_b * G_b`` (elementwise square) to ``fisher``:

* ``T = 1`` (inputs ``(B, out)`` / ``(B, in)``): ``G_b = g_b a_b^T`` has rank one, so
  ``sum_b G_b^2 = (g^2)^T (a^2)`` -- one GEMM on the squared operands, exact;
* ``T > 1``: the sum over positions comes before the square (the token-wise shortcut
  ``sum_t (g_bt^2)(a_bt^2)^T`` is wrong), so each example's tile ``G_b`` is formed and squared.
  Triton (``kernels/fisher.py``) loops over examples inside an (out, in) tile program and squares
  in registers.  The reference (also the ``cpp`` backend: MKL's GEMMs beat a hand-written one on
  CPU) forms one example's tile at a time with a GEMM and adds its square while it is still in
  cache (``addcmul_``); tiles smaller than ``LOOP_MIN_TILE`` go through ``torch.bmm`` over chunks
  of examples instead, so no more than ``CHUNK_ELEMENTS`` of ``B x out x in`` exists at once.  For
  few positions (``T <= PAIR_MAX_POSITIONS``) it expands the square over pairs of positions,
  ``G_b^2 = sum_t (g_bt^2)(a_bt^2)^T + 2 sum_{t<s} (g_bt * g_bs)(a_bt * a_bs)^T``,
  one GEMM with ``B T (T+1) / 2`` rows and no ``out x in`` tile per example (cheaper when the tiles
  would cost more memory traffic than the extra multiply-adds).

Inputs of any floating dtype and any strides; the accumulation is float32 (float64 for float64).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backend import backend_for, kernels

CHUNK_ELEMENTS = 2**22  # the reference materialises at most this many per-example gradient entries
PAIR_MAX_POSITIONS = 8
LOOP_MIN_TILE = 2**14  # out x in from which a per-example loop beats a batched product (cache)


def _as_sequence(t: Tensor) -> Tensor:
    return t.unsqueeze(1) if t.dim() == 2 else t


def _position_pairs(g: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """Rows ``c (g_t * g_s)`` and ``a_t * a_s`` for t <= s, c = 1 on the diagonal and 2 off it."""
    first, second = torch.triu_indices(g.shape[1], g.shape[1], device=g.device)
    weight = torch.where(first == second, 1.0, 2.0).to(g.dtype)[None, :, None]
    return (g[:, first] * g[:, second] * weight).flatten(0, 1), (a[:, first] * a[:, second]).flatten(0, 1)


def _rank_one(fisher: Tensor, g: Tensor, a: Tensor) -> Tensor:
    return fisher.addmm_(g.to(fisher.dtype).square().t(), a.to(fisher.dtype).square())


def _pair_expansion(fisher: Tensor, g: Tensor, a: Tensor) -> Tensor:
    positions = g.shape[1]
    chunk = max(1, CHUNK_ELEMENTS // (positions * (positions + 1) // 2 * (g.shape[2] + a.shape[2])))
    for start in range(0, g.shape[0], chunk):
        rows_g, rows_a = _position_pairs(
            g[start : start + chunk].to(fisher.dtype), a[start : start + chunk].to(fisher.dtype)
        )
        fisher.addmm_(rows_g.t(), rows_a)
    return fisher


def _per_example_tiles(fisher: Tensor, g: Tensor, a: Tensor) -> Tensor:
    dtype = fisher.dtype
    if fisher.numel() >= LOOP_MIN_TILE:
        tile = torch.empty_like(fisher)
        for b in range(g.shape[0]):
            torch.mm(g[b].to(dtype).t(), a[b].to(dtype), out=tile)
            fisher.addcmul_(tile, tile)
        return fisher
    chunk = max(1, CHUNK_ELEMENTS // max(1, fisher.numel()))
    for start in range(0, g.shape[0], chunk):
        tiles = torch.bmm(g[start : start + chunk].to(dtype).transpose(1, 2), a[start : start + chunk].to(dtype))
        fisher.add_(tiles.square_().sum(0))
    return fisher


def reference_sq_grad_accumulate(fisher: Tensor, g: Tensor, a: Tensor) -> Tensor:
    """``fisher += sum_b (g_b^T a_b)^2`` for ``g (B, T, out)``, ``a (B, T, in)`` (see the module docstring)."""
    g, a = _as_sequence(g), _as_sequence(a)
    if g.shape[1] == 1:
        return _rank_one(fisher, g[:, 0], a[:, 0])
    if g.shape[1] <= PAIR_MAX_POSITIONS:
        return _pair_expansion(fisher, g, a)
    return _per_example_tiles(fisher, g, a)


@torch.library.custom_op("bayeskern::sq_grad_accumulate", mutates_args=("fisher",))
def _sq_grad_accumulate(fisher: Tensor, g: Tensor, a: Tensor) -> None:
    backend = backend_for("sq_grad_accumulate", g)
    if backend == "reference":
        reference_sq_grad_accumulate(fisher, g, a)
    else:
        kernels(backend, "sq_grad_accumulate").sq_grad_accumulate(fisher, _as_sequence(g), _as_sequence(a))


@_sq_grad_accumulate.register_fake
def _(fisher: Tensor, g: Tensor, a: Tensor) -> None:
    return None


def sq_grad_accumulate(fisher: Tensor, g: Tensor, a: Tensor) -> Tensor:
    """Add ``sum_b (sum_t g_bt a_bt^T)^2`` to ``fisher`` in place and return it.

    ``g``: output gradients ``(B, out)`` or ``(B, T, out)``; ``a``: inputs ``(B, in)`` or
    ``(B, T, in)`` (same B and T); ``fisher``: a contiguous float32/float64 ``(out, in)`` tensor on
    their device.  Any strides are accepted (e.g. an unfolded convolution input, transposed).
    """
    if not isinstance(fisher, Tensor) or fisher.dtype not in (torch.float32, torch.float64):
        raise ValueError("fisher must be a float32 or float64 tensor")
    if not fisher.is_contiguous():
        raise ValueError("fisher must be contiguous")
    for name, t, features in (("g", g, "out"), ("a", a, "in")):
        if not isinstance(t, Tensor) or not t.dtype.is_floating_point or t.dim() not in (2, 3):
            raise ValueError(f"{name} must be a floating-point tensor of shape (B, {features}) or (B, T, {features})")
        if t.device != fisher.device:
            raise ValueError(f"{name} is on {t.device} but fisher is on {fisher.device}")
    if g.dim() != a.dim() or g.shape[0] != a.shape[0] or (g.dim() == 3 and g.shape[1] != a.shape[1]):
        raise ValueError(f"g {tuple(g.shape)} and a {tuple(a.shape)} must agree in batch (and position) size")
    if fisher.shape != (g.shape[-1], a.shape[-1]):
        raise ValueError(f"fisher has shape {tuple(fisher.shape)}, expected {(g.shape[-1], a.shape[-1])}")
    _sq_grad_accumulate(fisher, g, a)
    return fisher
