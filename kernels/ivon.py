"""Triton kernels of IVON's three multi-tensor ops (bayeskern/ops/ivon.py has the maths), in place, ONE
launch per op for every tensor of a group through records.py's tensor table (own fields: the tensors'
addresses and the size n).  eps is the Philox normal of stream ``stream``; the gradient sums are
float32, every other tensor has the parameters' dtype.  Maths in float32, in the reference's order.
"""

import triton
import triton.language as tl

from .noise import _qblock
from .philox import normals4
from .records import SHARED_FIELDS, field, find_tile, pack, pointer
from .sgld import TRITON_DTYPES

DRAW_RECORD = tl.constexpr(4 + SHARED_FIELDS)  # param, mean, hess addresses, n; then the shared fields
COLLECT_RECORD = tl.constexpr(4 + SHARED_FIELDS)  # grad, grad_sum, grad_eps_sum addresses, n; shared fields
UPDATE_RECORD = tl.constexpr(7 + SHARED_FIELDS)  # param, momentum, hess, sums, prior mean addresses, n; shared


@triton.jit
def _load(records_ptr, index, k, j, mask, RECORD: tl.constexpr, DTYPE: tl.constexpr):
    """Tile j of the tensor at field k of record ``index``, in float32."""
    return tl.load(pointer(records_ptr, index, k, RECORD, DTYPE) + j, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store(records_ptr, index, k, j, mask, value, RECORD: tl.constexpr, DTYPE: tl.constexpr):
    tl.store(pointer(records_ptr, index, k, RECORD, DTYPE) + j, value.to(DTYPE), mask=mask)


@triton.jit
def ivon_draw_kernel(
    records_ptr,
    count,
    ess,
    delta,
    seed,
    stream_lo,
    stream_hi,
    DTYPE: tl.constexpr,
    QBLOCK: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
):
    index, q, j = find_tile(records_ptr, count, DRAW_RECORD, QBLOCK, SEARCH_STEPS)
    mask = (j >= 0) & (j < field(records_ptr, index, 3, DRAW_RECORD))
    param_ptr = pointer(records_ptr, index, 0, DRAW_RECORD, DTYPE)
    param = tl.load(param_ptr + j, mask=mask, other=0.0)
    tl.store(pointer(records_ptr, index, 1, DRAW_RECORD, DTYPE) + j, param, mask=mask)  # the mean: an exact copy
    h = _load(records_ptr, index, 2, j, mask, DRAW_RECORD, DTYPE)
    sigma = tl.math.div_rn(1.0, tl.sqrt_rn((h + delta) * ess))
    eps = normals4(seed, q, stream_lo, stream_hi)
    tl.store(param_ptr + j, (param.to(tl.float32) + sigma * eps).to(DTYPE), mask=mask)


@triton.jit
def ivon_collect_kernel(
    records_ptr,
    count,
    seed,
    stream_lo,
    stream_hi,
    DTYPE: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    QBLOCK: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
):
    index, q, j = find_tile(records_ptr, count, COLLECT_RECORD, QBLOCK, SEARCH_STEPS)
    mask = (j >= 0) & (j < field(records_ptr, index, 3, COLLECT_RECORD))
    g = _load(records_ptr, index, 0, j, mask, COLLECT_RECORD, DTYPE)
    g_eps = g * normals4(seed, q, stream_lo, stream_hi)
    g_sum = g
    if ACCUMULATE:
        g_sum = _load(records_ptr, index, 1, j, mask, COLLECT_RECORD, tl.float32) + g
        g_eps = _load(records_ptr, index, 2, j, mask, COLLECT_RECORD, tl.float32) + g_eps
    _store(records_ptr, index, 1, j, mask, g_sum, COLLECT_RECORD, tl.float32)
    _store(records_ptr, index, 2, j, mask, g_eps, COLLECT_RECORD, tl.float32)


@triton.jit
def ivon_update_kernel(
    records_ptr,
    count,
    lr,
    ess,
    delta,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    gap_weight,
    bias_correction,
    clip_radius,
    scale,
    DTYPE: tl.constexpr,
    HAS_PRIOR: tl.constexpr,
    QBLOCK: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
):
    index, _, j = find_tile(records_ptr, count, UPDATE_RECORD, QBLOCK, SEARCH_STEPS)
    mask = (j >= 0) & (j < field(records_ptr, index, 6, UPDATE_RECORD))
    m = _load(records_ptr, index, 0, j, mask, UPDATE_RECORD, DTYPE)
    h = _load(records_ptr, index, 2, j, mask, UPDATE_RECORD, DTYPE)
    g = _load(records_ptr, index, 3, j, mask, UPDATE_RECORD, tl.float32) * scale
    e = _load(records_ptr, index, 4, j, mask, UPDATE_RECORD, tl.float32)
    h_hat = e * scale * tl.sqrt_rn((h + delta) * ess)
    g_bar = _load(records_ptr, index, 1, j, mask, UPDATE_RECORD, DTYPE) * beta1 + g * one_minus_beta1
    gap = h - h_hat
    h_new = h * beta2 + h_hat * one_minus_beta2 + tl.math.div_rn(gap * gap * gap_weight, h + delta)
    offset = m
    if HAS_PRIOR:
        offset = m - _load(records_ptr, index, 5, j, mask, UPDATE_RECORD, DTYPE)
    direction = tl.math.div_rn(tl.math.div_rn(g_bar, bias_correction) + delta * offset, h_new + delta)
    direction = tl.clamp(direction, -clip_radius, clip_radius, propagate_nan=tl.PropagateNan.ALL)
    _store(records_ptr, index, 0, j, mask, m - lr * direction, UPDATE_RECORD, DTYPE)
    _store(records_ptr, index, 1, j, mask, g_bar, UPDATE_RECORD, DTYPE)
    _store(records_ptr, index, 2, j, mask, h_new, UPDATE_RECORD, DTYPE)


def _launch(kernel, tensors, fields, offsets, *args, **constexprs):
    """``kernel`` over records.py's table of ``tensors`` (own ``fields``); nothing when all are empty."""
    qblock = _qblock()
    device = tensors[0].device if tensors else None
    table, programs, search_steps = pack(fields, [t.numel() for t in tensors], offsets, qblock, device)
    if table is None:
        return
    dtype = TRITON_DTYPES[tensors[0].dtype]
    kernel[(programs,)](table, len(table), *args, DTYPE=dtype, QBLOCK=qblock, SEARCH_STEPS=search_steps, **constexprs)


def ivon_draw_(params, means, hesses, ess, delta, seed, stream, offsets):
    """``means <- params``, ``params <- m + sigma eps`` for every (contiguous) tensor."""
    fields = [[p.data_ptr(), means[i].data_ptr(), hesses[i].data_ptr(), p.numel()] for i, p in enumerate(params)]
    _launch(ivon_draw_kernel, params, fields, offsets, ess, delta, seed, stream & 0xFFFFFFFF, stream >> 32)


def ivon_collect_(grads, grad_sums, grad_eps_sums, accumulate, seed, stream, offsets):
    """``grad_sums <- [grad_sums +] g``, ``grad_eps_sums <- [grad_eps_sums +] g eps`` (float32 sums)."""
    fields = [
        [g.data_ptr(), grad_sums[i].data_ptr(), grad_eps_sums[i].data_ptr(), g.numel()] for i, g in enumerate(grads)
    ]
    args = (seed, stream & 0xFFFFFFFF, stream >> 32)
    _launch(ivon_collect_kernel, grads, fields, offsets, *args, ACCUMULATE=bool(accumulate))


def ivon_update_(
    params, momenta, hesses, grad_sums, grad_eps_sums, prior_means, lr, ess, delta, beta1, beta2, bias_correction,
    clip_radius, scale,
):  # fmt: skip
    """One IVON update of ``params``, ``momenta`` and ``hesses``; an empty ``prior_means`` means zero."""
    fields = [
        [
            p.data_ptr(),
            momenta[i].data_ptr(),
            hesses[i].data_ptr(),
            grad_sums[i].data_ptr(),
            grad_eps_sums[i].data_ptr(),
            (prior_means[i] if prior_means else p).data_ptr(),
            p.numel(),
        ]
        for i, p in enumerate(params)
    ]
    # the (1 - beta) factors in double on the host: beta2 is close to 1
    hyper = (lr, ess, delta, beta1, 1.0 - beta1, beta2, 1.0 - beta2, 0.5 * (1.0 - beta2) ** 2, bias_correction)
    _launch(
        ivon_update_kernel, params, fields, [0] * len(params), *hyper, clip_radius, scale, HAS_PRIOR=bool(prior_means)
    )
