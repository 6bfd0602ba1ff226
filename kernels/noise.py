"""Triton kernels of the noise ops (gaussian_sample, weight_dropout and their backwards).

One jitted kernel fuses Philox noise with the elementwise maths of each op (a constexpr picks it).
A program covers QBLOCK Philox blocks, i.e. a (QBLOCK, 4) tile of consecutive elements; element j of
a tensor placed at ``offset`` belongs to block (offset + j) // 4.  Inputs are contiguous; maths in
float32; the launchers own allocation and the grid.
"""

import torch
import triton
import triton.language as tl

from .philox import normals4, uniforms4

SAMPLE = tl.constexpr(0)  # out = a + softplus(b) * eps            (a = mu, b = rho)
SAMPLE_GRAD = tl.constexpr(1)  # out = a * eps * sigmoid(b)             (a = grad, b = rho)
DROPOUT = tl.constexpr(2)  # out = u >= p ? a * scale : b (or 0)   (a = w or grad, b = fill)
NORMAL = tl.constexpr(3)  # out = eps
UNIFORM = tl.constexpr(4)  # out = u


@triton.jit
def _log1p(y):
    """log(1 + y), corrected for the rounding of 1 + y (exact to float32 for tiny y, like csrc/philox.h)."""
    u = 1.0 + y
    return tl.log(u) - ((u - 1.0) - y) / u


@triton.jit
def _softplus(x):
    return tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))
    return tl.where(x > 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def fused_noise_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    n,
    seed,
    offset,
    stream_lo,
    stream_hi,
    q_first,
    p,
    scale,
    OP: tl.constexpr,
    HAS_B: tl.constexpr,
    QBLOCK: tl.constexpr,
):
    q = q_first + tl.program_id(0).to(tl.int64) * QBLOCK + tl.arange(0, QBLOCK).to(tl.int64)
    j = (q * 4 - offset)[:, None] + tl.arange(0, 4)[None, :]
    mask = (j >= 0) & (j < n)
    if OP == UNIFORM or OP == DROPOUT:  # noqa: SIM109 (Triton compiles comparisons of constexprs, not `in`)
        noise = uniforms4(seed, q, stream_lo, stream_hi)
    else:
        noise = normals4(seed, q, stream_lo, stream_hi)
    if OP == NORMAL or OP == UNIFORM:  # noqa: SIM109
        result = noise
    else:
        a = tl.load(a_ptr + j, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            b = tl.load(b_ptr + j, mask=mask, other=0.0).to(tl.float32)
        else:
            b = tl.zeros_like(a)
        if OP == SAMPLE:
            result = a + _softplus(b) * noise
        elif OP == SAMPLE_GRAD:
            result = a * noise * _sigmoid(b)
        else:
            result = tl.where(noise >= p, a * scale, b)
    tl.store(out_ptr + j, result.to(out_ptr.dtype.element_ty), mask=mask)


def _qblock() -> int:
    # the interpreter pays per program, a GPU wants many programs in flight
    return 1024 if not torch.cuda.is_available() else 256


def launch(op, out: torch.Tensor, a, b, seed: int, offset: int, stream: int, p: float = 0.0, scale: float = 1.0):
    """Fill ``out`` (contiguous) with op applied to contiguous ``a``/``b`` (either may be None)."""
    n = out.numel()
    if n == 0:
        return out
    q_first = offset // 4
    blocks = (offset + n - 1) // 4 - q_first + 1
    qblock = _qblock()
    grid = (triton.cdiv(blocks, qblock),)
    fused_noise_kernel[grid](
        a if a is not None else out,
        b if b is not None else out,
        out,
        n,
        seed,
        offset,
        stream & 0xFFFFFFFF,
        stream >> 32,
        q_first,
        float(p),
        float(scale),
        OP=op,
        HAS_B=b is not None,
        QBLOCK=qblock,
    )
    return out


def gaussian_sample(mu, rho, seed, offset, stream):
    return launch(SAMPLE, torch.empty_like(mu), mu, rho, seed, offset, stream)


def gaussian_sample_backward(grad, rho, seed, offset, stream):
    return launch(SAMPLE_GRAD, torch.empty_like(rho), grad, rho, seed, offset, stream)


def weight_dropout(w, p, seed, offset, stream, fill):
    scale = 1.0 if fill is not None else 1.0 / (1.0 - p)
    return launch(DROPOUT, torch.empty_like(w), w, fill, seed, offset, stream, p=p, scale=scale)


def weight_dropout_backward(grad, p, seed, offset, stream, scale):
    return launch(DROPOUT, torch.empty_like(grad), grad, None, seed, offset, stream, p=p, scale=scale)


def fill_normal_(out, seed, offset, stream):
    return launch(NORMAL, out, None, None, seed, offset, stream)


def fill_uniform_(out, seed, offset, stream):
    return launch(UNIFORM, out, None, None, seed, offset, stream)
