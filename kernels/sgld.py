"""Triton kernel of the SGLD / pSGLD update (bayeskern/ops/sgld.py has the maths), in place, ONE
launch for every tensor of a group (like torch's fused optimizers).

The launcher packs one record per tensor into an int64 table: the addresses of theta, grad, prior
mean and square average, the size n, the Philox offset, the first Philox block q_first and the first
program.  A program covers QBLOCK Philox blocks of one tensor, a (QBLOCK, 4) tile of consecutive
elements (element j of a tensor placed at ``offset`` belongs to block (offset + j) // 4 of stream
``step``), and finds its record by binary search over the first programs.  Maths in float32.
"""
import torch
import triton
import triton.language as tl

from .noise import _qblock
from .philox import normals4

RECORD = tl.constexpr(8)  # int64 fields per tensor: theta, grad, mean, avg addresses; n, offset, q_first, first_program
_TRITON_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _field(records_ptr, index, k):
    return tl.load(records_ptr + index * RECORD + k)


@triton.jit
def sgld_kernel(
    records_ptr, count, seed, stream_lo, stream_hi, lr, prior_precision, noise_scale, alpha, eps,
    DTYPE: tl.constexpr, HAS_MEAN: tl.constexpr, PRECONDITION: tl.constexpr, NOISE: tl.constexpr,
    QBLOCK: tl.constexpr, SEARCH_STEPS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    lo = pid * 0  # the last record whose first program is <= pid
    hi = lo + count - 1
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi + 1) // 2
        right = _field(records_ptr, mid, 7) <= pid
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid - 1)
    theta_ptr = _field(records_ptr, lo, 0).to(tl.pointer_type(DTYPE))
    grad_ptr = _field(records_ptr, lo, 1).to(tl.pointer_type(DTYPE))
    n = _field(records_ptr, lo, 4)
    offset = _field(records_ptr, lo, 5)
    q = _field(records_ptr, lo, 6) + (pid - _field(records_ptr, lo, 7)) * QBLOCK + tl.arange(0, QBLOCK).to(tl.int64)
    j = (q * 4 - offset)[:, None] + tl.arange(0, 4)[None, :]
    mask = (j >= 0) & (j < n)
    theta = tl.load(theta_ptr + j, mask=mask, other=0.0).to(tl.float32)
    grad = tl.load(grad_ptr + j, mask=mask, other=0.0).to(tl.float32)
    diff = theta
    if HAS_MEAN:
        mean_ptr = _field(records_ptr, lo, 2).to(tl.pointer_type(DTYPE))
        diff = theta - tl.load(mean_ptr + j, mask=mask, other=0.0).to(tl.float32)
    g_tot = grad + prior_precision * diff
    if PRECONDITION:
        avg_ptr = _field(records_ptr, lo, 3).to(tl.pointer_type(DTYPE))
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


def sgld_step_(params, grads, prior_means, square_avgs, lr, prior_precision, noise_scale, alpha, eps, seed, step, offsets):
    """Update every (contiguous) tensor of ``params`` in place; empty lists mean no prior mean / preconditioner."""
    qblock = _qblock()
    records, programs = [], 0
    for i, theta in enumerate(params):
        n = theta.numel()
        if n == 0:
            continue
        offset = offsets[i]
        q_first = offset // 4
        mean = prior_means[i] if prior_means else theta
        avg = square_avgs[i] if square_avgs else theta
        records.append([theta.data_ptr(), grads[i].data_ptr(), mean.data_ptr(), avg.data_ptr(), n, offset, q_first, programs])
        programs += triton.cdiv((offset + n - 1) // 4 - q_first + 1, qblock)
    if not records:
        return
    table = torch.tensor(records, dtype=torch.int64).to(params[0].device)
    sgld_kernel[(programs,)](
        table, len(records), seed, step & 0xFFFFFFFF, step >> 32, lr, prior_precision, noise_scale, alpha, eps,
        DTYPE=_TRITON_DTYPES[params[0].dtype], HAS_MEAN=bool(prior_means), PRECONDITION=bool(square_avgs),
        NOISE=noise_scale != 0.0, QBLOCK=qblock, SEARCH_STEPS=max(1, (len(records) - 1).bit_length()),
    )
