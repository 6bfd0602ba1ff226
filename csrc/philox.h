// Counter-based noise shared by the CPU (SIMD) and CUDA kernels.
//
// The specification is bayeskern/ops/philox.py: Philox 4x32-10 keyed by the 64-bit seed, counter
// (q_lo, q_hi, stream_lo, stream_hi) for block q = (offset + j) / 4, element j reads word
// (offset + j) % 4.  uniform u = (w >> 8) * 2^-24; normals pair the words (w0, w1), (w2, w3) through
// Box-Muller with u1 = ((w0 >> 8) + 1) * 2^-24 and angle 2*pi*u2.
//
// Every function is a template over a lane type: a scalar (float / uint32_t, host and device) or a
// GCC vector of floats / uint32 (csrc/cpu/simd.h), so the CPU SIMD kernels and the CUDA kernels run
// the same arithmetic.  The lane helpers (as_float, as_uint, to_float, select, floor_lanes,
// to_uint, sqrt_lanes, mulhilo) are overloaded for each lane type.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define BK_HD __host__ __device__ __forceinline__
#else
#define BK_HD inline __attribute__((always_inline))
#endif

namespace bayeskern {

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr float kTwoPowM24 = 5.9604644775390625e-08f;  // 2^-24

// ---- scalar lane helpers (host and device) ----
BK_HD float as_float(uint32_t x) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(x);
#else
  float f;
  __builtin_memcpy(&f, &x, 4);
  return f;
#endif
}
BK_HD uint32_t as_uint(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  __builtin_memcpy(&u, &x, 4);
  return u;
#endif
}
BK_HD float to_float(uint32_t x) { return static_cast<float>(x); }
BK_HD uint32_t to_uint(float x) { return static_cast<uint32_t>(x); }
BK_HD float select(bool m, float a, float b) { return m ? a : b; }
BK_HD uint32_t select(bool m, uint32_t a, uint32_t b) { return m ? a : b; }
BK_HD float floor_lanes(float x) {
#if defined(__CUDA_ARCH__)
  return floorf(x);
#else
  return __builtin_floorf(x);
#endif
}
BK_HD float sqrt_lanes(float x) {
#if defined(__CUDA_ARCH__)
  return sqrtf(x);
#else
  return __builtin_sqrtf(x);
#endif
}
BK_HD void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// ---- Philox 4x32-10 ----
template <class U>
BK_HD void philox4x32_10(U& c0, U& c1, U& c2, U& c3, uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    U hi_b, lo_b, hi_a, lo_a;
    mulhilo(kPhiloxRoundB, c2, hi_b, lo_b);
    mulhilo(kPhiloxRoundA, c0, hi_a, lo_a);
    c0 = hi_b ^ c1 ^ k0;
    c1 = lo_b;
    c2 = hi_a ^ c3 ^ k1;
    c3 = lo_a;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
}

// ---- transforms ----
template <class F, class U>
BK_HD F uniform_from_word(U w) {
  return to_float(w >> 8) * kTwoPowM24;
}

// Natural log of a positive normal float (Cephes logf, ~1 ulp).
template <class F, class U>
BK_HD F log_positive(F x) {
  const U bits = as_uint(x);
  F e = to_float(bits >> 23) - 126.0f;
  F m = as_float((bits & 0x007fffffu) | 0x3f000000u);  // mantissa in [0.5, 1)
  const auto below = m < 0.70710678118654752f;
  e = select(below, e - 1.0f, e);
  m = select(below, m + m - 1.0f, m - 1.0f);
  const F z = m * m;
  F y = F{} + 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y = y + e * -2.12194440e-4f;
  y = y - 0.5f * z;
  return m + y + e * 0.693359375f;
}

// exp(x) for x <= 0 (Cephes expf); flushes to 0 below -87.
template <class F, class U>
BK_HD F exp_nonpositive(F x) {
  const auto underflow = x < -87.0f;
  x = select(underflow, F{} - 87.0f, x);
  const F n = floor_lanes(x * 1.44269504088896341f + 0.5f);
  F r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const F z = r * r;
  F y = F{} + 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
  const U scale = to_uint(n + 127.0f) << 23;
  return select(underflow, F{}, y * as_float(scale));
}

// log(1 + y) for y in [0, 1].
template <class F, class U>
BK_HD F log1p_unit(F y) {
  const F u = y + 1.0f;
  const F correction = ((u - 1.0f) - y) / u;
  return log_positive<F, U>(u) - correction;
}

// softplus(x) = max(x, 0) + log1p(exp(-|x|)), safe for any |x|.
template <class F, class U>
BK_HD F softplus(F x) {
  const auto positive = x > 0.0f;
  const F neg_abs = select(positive, -x, x);
  return select(positive, x, F{}) + log1p_unit<F, U>(exp_nonpositive<F, U>(neg_abs));
}

// sigmoid(x) from exp(-|x|), safe for any |x|.
template <class F, class U>
BK_HD F sigmoid(F x) {
  const auto positive = x > 0.0f;
  const F e = exp_nonpositive<F, U>(select(positive, -x, x));
  const F inv = 1.0f / (e + 1.0f);
  return select(positive, inv, e * inv);
}

// cos and sin of 2*pi*u for u = k * 2^-24 in [0, 1), with exact octant reduction.
template <class F, class U>
BK_HD void sincos_turns(F u, F& cos_out, F& sin_out) {
  const F y = u * 8.0f;                               // exact
  const F j = floor_lanes((y + 1.0f) * 0.5f) * 2.0f;  // nearest even octant: 0, 2, 4, 6, 8
  const F x = (y - j) * 0.78539816339744831f;         // y - j exact; x in [-pi/4, pi/4]
  const F z = x * x;
  F s = F{} + -1.9515295891e-4f;
  s = s * z + 8.3321608736e-3f;
  s = s * z - 1.6666654611e-1f;
  s = s * z * x + x;
  F c = F{} + 2.443315711809948e-5f;
  c = c * z - 1.388731625493765e-3f;
  c = c * z + 4.166664568298827e-2f;
  c = c * z * z - 0.5f * z + 1.0f;
  const U quadrant = (to_uint(j) >> 1) & 3u;
  const auto odd = (quadrant & 1u) != 0u;
  const F cs = select(odd, s, c);
  const F sn = select(odd, c, s);
  const auto cos_negative = (quadrant == 1u) | (quadrant == 2u);
  const auto sin_negative = quadrant >= 2u;
  cos_out = select(cos_negative, -cs, cs);
  sin_out = select(sin_negative, -sn, sn);
}

// Four standard normals from one Philox block.
template <class F, class U>
BK_HD void normals_from_block(U w0, U w1, U w2, U w3, F& n0, F& n1, F& n2, F& n3) {
  const F u1a = to_float((w0 >> 8) + 1u) * kTwoPowM24;
  const F u1b = to_float((w2 >> 8) + 1u) * kTwoPowM24;
  const F ra = sqrt_lanes(-2.0f * log_positive<F, U>(u1a));
  const F rb = sqrt_lanes(-2.0f * log_positive<F, U>(u1b));
  F ca, sa, cb, sb;
  sincos_turns<F, U>(uniform_from_word<F, U>(w1), ca, sa);
  sincos_turns<F, U>(uniform_from_word<F, U>(w3), cb, sb);
  n0 = ra * ca;
  n1 = ra * sa;
  n2 = rb * cb;
  n3 = rb * sb;
}

// The Philox block for counter block q of a stream.
template <class U>
BK_HD void philox_block(U q_lo, U q_hi, uint64_t seed, uint64_t stream, U& w0, U& w1, U& w2, U& w3) {
  w0 = q_lo;
  w1 = q_hi;
  w2 = U{} + static_cast<uint32_t>(stream);
  w3 = U{} + static_cast<uint32_t>(stream >> 32);
  philox4x32_10(w0, w1, w2, w3, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

}  // namespace bayeskern
