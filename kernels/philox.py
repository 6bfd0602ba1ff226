"""Philox noise inside Triton kernels, laid out as bayeskern/ops/philox.py specifies.

Triton's own ``tl.philox`` supplies Philox 4x32-10 keyed by a 64-bit seed; these functions add
bayeskern's counter layout (block q -> counter (q_lo, q_hi, stream_lo, stream_hi)) and its
uniform and Box-Muller transforms, written with the same float32 polynomials and exact argument
reduction as the C++/CUDA kernels (csrc/philox.h).
"""

import triton
import triton.language as tl

TWO_POW_M24 = tl.constexpr(5.9604644775390625e-08)


@triton.jit
def philox_words(seed, q, stream_lo, stream_hi):
    """The four 32-bit words of Philox block ``q`` (int64 tensor) of stream (stream_lo, stream_hi)."""
    q_lo = q.to(tl.uint32)
    q_hi = (q >> 32).to(tl.uint32)
    s_lo = (q_lo * 0 + stream_lo).to(tl.uint32)
    s_hi = (q_lo * 0 + stream_hi).to(tl.uint32)
    return tl.philox(seed, q_lo, q_hi, s_lo, s_hi)


@triton.jit
def uniform_from_word(w):
    return (w >> 8).to(tl.float32) * TWO_POW_M24


@triton.jit
def log_positive(x):
    """Natural log of positive normal floats (Cephes logf)."""
    bits = x.to(tl.uint32, bitcast=True)
    e = (bits >> 23).to(tl.float32) - 126.0
    m = ((bits & 0x007FFFFF) | 0x3F000000).to(tl.float32, bitcast=True)
    below = m < 0.70710678118654752
    e = tl.where(below, e - 1.0, e)
    m = tl.where(below, m + m - 1.0, m - 1.0)
    z = m * m
    y = 7.0376836292e-2
    y = y * m - 1.1514610310e-1
    y = y * m + 1.1676998740e-1
    y = y * m - 1.2420140846e-1
    y = y * m + 1.4249322787e-1
    y = y * m - 1.6668057665e-1
    y = y * m + 2.0000714765e-1
    y = y * m - 2.4999993993e-1
    y = y * m + 3.3333331174e-1
    y = y * m * z
    y = y + e * -2.12194440e-4
    y = y - 0.5 * z
    return m + y + e * 0.693359375


@triton.jit
def sincos_turns(u):
    """cos and sin of 2*pi*u, u = k * 2**-24 in [0, 1), with exact octant reduction."""
    y = u * 8.0
    j = tl.floor((y + 1.0) * 0.5) * 2.0
    x = (y - j) * 0.78539816339744831
    z = x * x
    s = -1.9515295891e-4
    s = s * z + 8.3321608736e-3
    s = s * z - 1.6666654611e-1
    s = s * z * x + x
    c = 2.443315711809948e-5
    c = c * z - 1.388731625493765e-3
    c = c * z + 4.166664568298827e-2
    c = c * z * z - 0.5 * z + 1.0
    quadrant = (j.to(tl.int32) >> 1) & 3
    odd = (quadrant & 1) != 0
    cs = tl.where(odd, s, c)
    sn = tl.where(odd, c, s)
    cos_out = tl.where((quadrant == 1) | (quadrant == 2), -cs, cs)
    sin_out = tl.where(quadrant >= 2, -sn, sn)
    return cos_out, sin_out


@triton.jit
def normals4(seed, q, stream_lo, stream_hi):
    """Four standard normals per Philox block, as a (len(q), 4) tile in global-index order."""
    w0, w1, w2, w3 = philox_words(seed, q, stream_lo, stream_hi)
    ra = tl.sqrt_rn(-2.0 * log_positive(((w0 >> 8) + 1).to(tl.float32) * TWO_POW_M24))
    rb = tl.sqrt_rn(-2.0 * log_positive(((w2 >> 8) + 1).to(tl.float32) * TWO_POW_M24))
    ca, sa = sincos_turns(uniform_from_word(w1))
    cb, sb = sincos_turns(uniform_from_word(w3))
    return lanes4(ra * ca, ra * sa, rb * cb, rb * sb)


@triton.jit
def uniforms4(seed, q, stream_lo, stream_hi):
    """Four uniforms per Philox block, as a (len(q), 4) tile in global-index order."""
    w0, w1, w2, w3 = philox_words(seed, q, stream_lo, stream_hi)
    return lanes4(uniform_from_word(w0), uniform_from_word(w1), uniform_from_word(w2), uniform_from_word(w3))


@triton.jit
def lanes4(a, b, c, d):
    lane = tl.arange(0, 4)[None, :]
    return tl.where(lane == 0, a[:, None], tl.where(lane == 1, b[:, None], tl.where(lane == 2, c[:, None], d[:, None])))
