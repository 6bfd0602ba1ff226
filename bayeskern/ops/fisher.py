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
  in registers; the reference (also the ``cpp`` backend: a batched GEMM from MKL beats a hand-written
  one on CPU) runs ``torch.bmm`` over chunks of examples, so no more than ``CHUNK_ELEMENTS``
  of ``B x out x in`` exists at once.

Inputs of any floating dtype and any strides; the accumulation is float32 (float64 for float64).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .backend import resolve

CHUNK_ELEMENTS = 2**22  # the reference materialises at most this many per-example gradient entries


def _as_sequence(t: Tensor) -> Tensor:
    return t.unsqueeze(1) if t.dim() == 2 else t


def reference_sq_grad_accumulate(fisher: Tensor, g: Tensor, a: Tensor) -> Tensor:
    """``fisher += sum_b (g_b^T a_b)^2`` for ``g (B, T, out)``, ``a (B, T, in)``, chunked over b."""
    g, a = _as_sequence(g), _as_sequence(a)
    dtype = fisher.dtype
    if g.shape[1] == 1:
        return fisher.addmm_(g[:, 0].to(dtype).square().t(), a[:, 0].to(dtype).square())
    chunk = max(1, CHUNK_ELEMENTS // max(1, fisher.numel()))
    for start in range(0, g.shape[0], chunk):
        tiles = torch.bmm(g[start:start + chunk].to(dtype).transpose(1, 2), a[start:start + chunk].to(dtype))
        fisher.add_(tiles.square_().sum(0))
    return fisher


@torch.library.custom_op("bayeskern::sq_grad_accumulate", mutates_args=("fisher",))
def _sq_grad_accumulate(fisher: Tensor, g: Tensor, a: Tensor) -> None:
    backend = "reference" if g.dim() == 2 or g.shape[1] == 1 else resolve(g)
    if backend == "triton":
        from bayeskern.kernels import fisher as triton_fisher

        triton_fisher.sq_grad_accumulate(fisher, _as_sequence(g), _as_sequence(a))
    else:
        reference_sq_grad_accumulate(fisher, g, a)


@_sq_grad_accumulate.register_fake
def _(fisher, g, a):
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
