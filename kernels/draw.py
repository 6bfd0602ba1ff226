"""Triton kernels of the fused training draws (bayeskern/ops/draw.py has the maths): ONE launch for
every Bayesian tensor each way, through records.py's tensor table (own fields: the addresses of mu,
rho, prior mean, grad and the two outputs, the size n and the index of the tensor's 1 / sp^2).

The forward writes each program's partial sum of the prior term to ``partials[pid]``; the launcher
adds them (and the KL's constant part) in float64, so the value does not depend on scheduling.  A
zero prior mean has address 0 and is read as zeros.  Maths in float32.
"""

import math

import torch
import triton
import triton.language as tl

from .noise import _qblock, _sigmoid, _softplus
from .philox import log_positive, normals4, uniforms4
from .records import SHARED_FIELDS, field, find_tile, pack, pointer
from .sgld import TRITON_DTYPES

RECORD = tl.constexpr(8 + SHARED_FIELDS)  # mu, rho, m0, grad, out_a, out_b, n, prior index; shared fields
GAUSSIAN = tl.constexpr(0)  # VI: w = mu + softplus(rho) * eps, term = KL
DROPOUT = tl.constexpr(1)  # MC-dropout: w = keep ? mu * scale : fill, term = (1 - p) |mu - m0|^2 / (2 sp^2)
MIN_NORMAL = tl.constexpr(1.17549435e-38)  # s is clamped here before 1/s and log s


@triton.jit
def draw_kernel(
    records_ptr,
    inv_var_ptr,
    partial_ptr,
    grad_term_ptr,
    count,
    seed,
    stream_lo,
    stream_hi,
    p,
    scale,
    DTYPE: tl.constexpr,
    KIND: tl.constexpr,
    BACKWARD: tl.constexpr,
    FILL_PRIOR: tl.constexpr,
    QBLOCK: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
):
    index, q, j = find_tile(records_ptr, count, RECORD, QBLOCK, SEARCH_STEPS)
    mask = (j >= 0) & (j < field(records_ptr, index, 6, RECORD))
    mu_ptr = pointer(records_ptr, index, 0, RECORD, DTYPE)
    mu = tl.load(mu_ptr + j, mask=mask, other=0.0).to(tl.float32)
    m0_address = field(records_ptr, index, 2, RECORD)
    m0_ptr = tl.where(m0_address != 0, m0_address, field(records_ptr, index, 0, RECORD)).to(tl.pointer_type(DTYPE))
    m0 = tl.load(m0_ptr + j, mask=mask & (m0_address != 0), other=0.0).to(tl.float32)
    inv_var = tl.load(inv_var_ptr + field(records_ptr, index, 7, RECORD))
    d = mu - m0
    if KIND == GAUSSIAN:
        eps = normals4(seed, q, stream_lo, stream_hi)
        rho = tl.load(pointer(records_ptr, index, 1, RECORD, DTYPE) + j, mask=mask, other=0.0).to(tl.float32)
        s = _softplus(rho)
        s_safe = tl.maximum(s, MIN_NORMAL).to(tl.float32)
        if BACKWARD:
            grad_term = tl.load(grad_term_ptr)
            g = tl.load(pointer(records_ptr, index, 3, RECORD, DTYPE) + j, mask=mask, other=0.0).to(tl.float32)
            grad_rho = _sigmoid(rho) * (g * eps + grad_term * (s * inv_var - 1.0 / s_safe))
            tl.store(
                pointer(records_ptr, index, 4, RECORD, DTYPE) + j, (g + (grad_term * inv_var) * d).to(DTYPE), mask=mask
            )
            tl.store(pointer(records_ptr, index, 5, RECORD, DTYPE) + j, grad_rho.to(DTYPE), mask=mask)
        else:
            term = (s * s + d * d) * (0.5 * inv_var) - log_positive(s_safe)
            tl.store(pointer(records_ptr, index, 4, RECORD, DTYPE) + j, (mu + s * eps).to(DTYPE), mask=mask)
            tl.store(partial_ptr + tl.program_id(0), tl.sum(tl.sum(tl.where(mask, term, 0.0), axis=1), axis=0))
    else:
        keep = uniforms4(seed, q, stream_lo, stream_hi) >= p
        if BACKWARD:
            grad_term = tl.load(grad_term_ptr)
            g = tl.load(pointer(records_ptr, index, 3, RECORD, DTYPE) + j, mask=mask, other=0.0).to(tl.float32)
            grad_mu = tl.where(keep, g * scale, 0.0) + (grad_term * (1.0 - p) * inv_var) * d
            tl.store(pointer(records_ptr, index, 4, RECORD, DTYPE) + j, grad_mu.to(DTYPE), mask=mask)
        else:
            fill = m0 if FILL_PRIOR else tl.zeros_like(m0)
            term = (0.5 * (1.0 - p) * inv_var) * (d * d)
            tl.store(
                pointer(records_ptr, index, 4, RECORD, DTYPE) + j, tl.where(keep, mu * scale, fill).to(DTYPE), mask=mask
            )
            tl.store(partial_ptr + tl.program_id(0), tl.sum(tl.sum(tl.where(mask, term, 0.0), axis=1), axis=0))


def _launch(
    kind,
    mus,
    rhos,
    prior_means,
    prior_stds,
    seed,
    offsets,
    stream,
    outs_a,
    outs_b=None,
    grads=None,
    grad_term=None,
    p=0.0,
    fill_prior=False,
):
    """One launch over every tensor; returns the per-program partial sums of the prior term (forward)."""
    qblock = _qblock()
    backward = grads is not None
    rhos, grads, outs_b = rhos or mus, grads or mus, outs_b or outs_a  # unread stand-ins keep the table dense
    fields = [
        [
            mu.data_ptr(),
            rhos[i].data_ptr(),
            0 if prior_means[i] is None else prior_means[i].data_ptr(),
            grads[i].data_ptr(),
            outs_a[i].data_ptr(),
            outs_b[i].data_ptr(),
            mu.numel(),
            i,
        ]
        for i, mu in enumerate(mus)
    ]
    device = mus[0].device
    table, programs, search_steps = pack(fields, [mu.numel() for mu in mus], offsets, qblock, device)
    partials = torch.zeros(programs, dtype=torch.float32, device=device)
    if table is None:
        return partials
    inv_var = torch.tensor([1.0 / sp**2 for sp in prior_stds], dtype=torch.float32, device=device)
    scale = 1.0 if kind == DROPOUT and fill_prior else 1.0 / (1.0 - p)
    # the prior term's gradient stays on the device (read by the kernel: no host synchronisation)
    grad_term = inv_var if grad_term is None else grad_term.to(device=device, dtype=torch.float32).reshape(1)
    draw_kernel[(programs,)](
        table,
        inv_var,
        partials,
        grad_term,
        len(table),
        seed,
        stream & 0xFFFFFFFF,
        stream >> 32,
        float(p),
        float(scale),
        DTYPE=TRITON_DTYPES[mus[0].dtype],
        KIND=kind,
        BACKWARD=backward,
        FILL_PRIOR=fill_prior,
        QBLOCK=qblock,
        SEARCH_STEPS=search_steps,
    )
    return partials


def _term(partials: torch.Tensor, constant: float) -> torch.Tensor:
    return (partials.double().sum() + constant).float()


def gaussian_sample_kl(mus, rhos, prior_means, prior_stds, seed, offsets, stream):
    samples = [torch.empty_like(mu) for mu in mus]
    partials = _launch(GAUSSIAN, mus, rhos, prior_means, prior_stds, seed, offsets, stream, samples)
    constant = sum(mu.numel() * (math.log(sp) - 0.5) for mu, sp in zip(mus, prior_stds))
    return samples, _term(partials, constant)


def gaussian_sample_kl_backward(grads, grad_kl, mus, rhos, prior_means, prior_stds, seed, offsets, stream):
    grad_mus = [torch.empty_like(mu) for mu in mus]
    grad_rhos = [torch.empty_like(rho) for rho in rhos]
    _launch(
        GAUSSIAN,
        mus,
        rhos,
        prior_means,
        prior_stds,
        seed,
        offsets,
        stream,
        grad_mus,
        grad_rhos,
        grads,
        grad_term=grad_kl,
    )
    return grad_mus, grad_rhos


def weight_dropout_l2(mus, p, fill_prior, prior_means, prior_stds, seed, offsets, stream):
    samples = [torch.empty_like(mu) for mu in mus]
    partials = _launch(
        DROPOUT, mus, None, prior_means, prior_stds, seed, offsets, stream, samples, p=p, fill_prior=fill_prior
    )
    return samples, _term(partials, 0.0)


def weight_dropout_l2_backward(grads, grad_l2, mus, p, fill_prior, prior_means, prior_stds, seed, offsets, stream):
    grad_mus = [torch.empty_like(mu) for mu in mus]
    _launch(
        DROPOUT,
        mus,
        None,
        prior_means,
        prior_stds,
        seed,
        offsets,
        stream,
        grad_mus,
        grads=grads,
        grad_term=grad_l2,
        p=p,
        fill_prior=fill_prior,
    )
    return grad_mus
