"""Triton kernel of the SGLD / pSGLD update (bayeskern/ops/sgld.py has the maths), in place.

A program covers QBLOCK Philox blocks of one tensor, a (QBLOCK, 4) tile of consecutive elements;
element j of a tensor placed at ``offset`` belongs to block (offset + j) // 4 of stream ``step``.
The launcher runs one grid per tensor of the group; maths in float32.
"""
import triton
import triton.language as tl

from .noise import _qblock
from .philox import normals4


@triton.jit
def sgld_kernel(
    theta_ptr, grad_ptr, mean_ptr, avg_ptr, n, seed, offset, stream_lo, stream_hi, q_first,
    lr, prior_precision, noise_scale, alpha, eps,
    HAS_MEAN: tl.constexpr, PRECONDITION: tl.constexpr, NOISE: tl.constexpr, QBLOCK: tl.constexpr,
):
    q = q_first + tl.program_id(0).to(tl.int64) * QBLOCK + tl.arange(0, QBLOCK).to(tl.int64)
    j = (q * 4 - offset)[:, None] + tl.arange(0, 4)[None, :]
    mask = (j >= 0) & (j < n)
    theta = tl.load(theta_ptr + j, mask=mask, other=0.0).to(tl.float32)
    grad = tl.load(grad_ptr + j, mask=mask, other=0.0).to(tl.float32)
    diff = theta
    if HAS_MEAN:
        diff = theta - tl.load(mean_ptr + j, mask=mask, other=0.0).to(tl.float32)
    g_tot = grad + prior_precision * diff
    if PRECONDITION:
        v = alpha * tl.load(avg_ptr + j, mask=mask, other=0.0).to(tl.float32) + (1.0 - alpha) * (g_tot * g_tot)
        precond = tl.math.div_rn(1.0, eps + tl.sqrt_rn(v))
        theta = theta - lr * (precond * g_tot)
        tl.store(avg_ptr + j, v.to(avg_ptr.dtype.element_ty), mask=mask)
    else:
        theta = theta - lr * g_tot
    if NOISE:
        xi = normals4(seed, q, stream_lo, stream_hi)
        if PRECONDITION:
            theta = theta + (noise_scale * tl.sqrt_rn(precond)) * xi
        else:
            theta = theta + noise_scale * xi
    tl.store(theta_ptr + j, theta.to(theta_ptr.dtype.element_ty), mask=mask)


def sgld_step_(params, grads, prior_means, square_avgs, lr, prior_precision, noise_scale, alpha, eps, seed, step, offsets):
    """Update every (contiguous) tensor of ``params`` in place; empty lists mean no prior mean / preconditioner."""
    qblock = _qblock()
    for i, theta in enumerate(params):
        n = theta.numel()
        if n == 0:
            continue
        offset = offsets[i]
        q_first = offset // 4
        blocks = (offset + n - 1) // 4 - q_first + 1
        sgld_kernel[(triton.cdiv(blocks, qblock),)](
            theta, grads[i], prior_means[i] if prior_means else theta, square_avgs[i] if square_avgs else theta,
            n, seed, offset, step & 0xFFFFFFFF, step >> 32, q_first,
            lr, prior_precision, noise_scale, alpha, eps,
            HAS_MEAN=bool(prior_means), PRECONDITION=bool(square_avgs), NOISE=noise_scale != 0.0, QBLOCK=qblock,
        )
