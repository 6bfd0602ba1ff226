"""Triton kernel of the SGLD / pSGLD update (bayeskern/ops/sgld.py has the maths), in place, ONE
launch for every tensor of a group (like torch's fused optimizers; the tensor table is records.py's,
with the addresses of theta, grad, prior mean and square average and the size n as own fields).  The
noise is stream ``step``.  Maths in float32.
"""

import torch
import triton
import triton.language as tl

from .noise import _qblock
from .philox import normals4
from .records import SHARED_FIELDS, field, find_tile, pack, pointer

RECORD = tl.constexpr(5 + SHARED_FIELDS)  # theta, grad, mean, avg addresses, n; then the shared fields
TRITON_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def sgld_kernel(
    records_ptr,
    count,
    seed,
    stream_lo,
    stream_hi,
    lr,
    prior_precision,
    noise_scale,
    alpha,
    eps,
    DTYPE: tl.constexpr,
    HAS_MEAN: tl.constexpr,
    PRECONDITION: tl.constexpr,
    NOISE: tl.constexpr,
    QBLOCK: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
):
    lo, q, j = find_tile(records_ptr, count, RECORD, QBLOCK, SEARCH_STEPS)
    theta_ptr = pointer(records_ptr, lo, 0, RECORD, DTYPE)
    grad_ptr = pointer(records_ptr, lo, 1, RECORD, DTYPE)
    n = field(records_ptr, lo, 4, RECORD)
    mask = (j >= 0) & (j < n)
    theta = tl.load(theta_ptr + j, mask=mask, other=0.0).to(tl.float32)
    grad = tl.load(grad_ptr + j, mask=mask, other=0.0).to(tl.float32)
    diff = theta
    if HAS_MEAN:
        mean_ptr = pointer(records_ptr, lo, 2, RECORD, DTYPE)
        diff = theta - tl.load(mean_ptr + j, mask=mask, other=0.0).to(tl.float32)
    g_tot = grad + prior_precision * diff
    if PRECONDITION:
        avg_ptr = pointer(records_ptr, lo, 3, RECORD, DTYPE)
        v = alpha * tl.load(avg_ptr + j, mask=mask, other=0.0).to(tl.float32) + (1.0 - alpha) * (g_tot * g_tot)
        precond = tl.math.div_rn(1.0, eps + tl.sqrt_rn(v))
        theta = theta - lr * (precond * g_tot)
        tl.store(avg_ptr + j, v.to(DTYPE), mask=mask)
    else:
        theta = theta - lr * g_tot
    if NOISE:
        xi = normals4(seed, q, stream_lo, stream_hi)
        if PRECONDITION:
            theta = theta + (noise_scale * tl.sqrt_rn(precond)) * xi
        else:
            theta = theta + noise_scale * xi
    tl.store(theta_ptr + j, theta.to(DTYPE), mask=mask)


def sgld_step_(
    params, grads, prior_means, square_avgs, lr, prior_precision, noise_scale, alpha, eps, seed, step, offsets
):
    """Update every (contiguous) tensor of ``params`` in place; empty lists mean no prior mean / preconditioner."""
    qblock = _qblock()
    fields = [
        [
            theta.data_ptr(),
            grads[i].data_ptr(),
            (prior_means[i] if prior_means else theta).data_ptr(),
            (square_avgs[i] if square_avgs else theta).data_ptr(),
            theta.numel(),
        ]
        for i, theta in enumerate(params)
    ]
    table, programs, search_steps = pack(fields, [t.numel() for t in params], offsets, qblock, params[0].device)
    if table is None:
        return
    sgld_kernel[(programs,)](
        table,
        len(table),
        seed,
        step & 0xFFFFFFFF,
        step >> 32,
        lr,
        prior_precision,
        noise_scale,
        alpha,
        eps,
        DTYPE=TRITON_DTYPES[params[0].dtype],
        HAS_MEAN=bool(prior_means),
        PRECONDITION=bool(square_avgs),
        NOISE=noise_scale != 0.0,
        QBLOCK=qblock,
        SEARCH_STEPS=search_steps,
    )
