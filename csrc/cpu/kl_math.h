// Element maths of the Gaussian KL between N(mu, s^2), s = softplus(rho), and the prior N(m0, sp^2),
// shared by the KL kernels (kl_kernels.cpp) and the fused VI draw (draw_kernels.cpp):
//   KL_j = log(sp / s_j) + (s_j^2 + (mu_j - m0_j)^2) / (2 sp^2) - 1/2
//   dKL/dmu = (mu - m0) / sp^2,   dKL/drho = (s / sp^2 - 1 / s) * sigmoid(rho)
// Templated over SIMD lanes (F = f32v) and scalars (F = float), like philox.h.
#pragma once

#include "cpu/philox_lanes.h"

namespace bayeskern {
namespace cpu {

constexpr float kMinNormal = 1.17549435e-38f;  // s is clamped here before 1/s and log s

// softplus(x) and sigmoid(x) from one exp(-|x|).
template <class F, class U>
inline void softplus_sigmoid(F x, F& softplus_x, F& sigmoid_x) {
  const auto positive = x > 0.0f;
  const F e = exp_nonpositive<F, U>(select(positive, -x, x));
  softplus_x = select(positive, x, F{}) + log1p_unit<F, U>(e);
  const F inv = 1.0f / (e + 1.0f);
  sigmoid_x = select(positive, inv, e * inv);
}

template <class F>
inline F clamp_normal(F s) {
  return select(s > kMinNormal, s, F{} + kMinNormal);
}

// KL_j without its constant part log(sp) - 1/2, from s and d = mu - m0.
template <class F, class U>
inline F kl_term(F s, F d, float inv_two_var) {
  return (s * s + d * d) * inv_two_var - log_positive<F, U>(clamp_normal(s));
}

// dKL/drho / sigmoid(rho).
template <class F>
inline F kl_rho_factor(F s, float inv_var) {
  return s * inv_var - 1.0f / clamp_normal(s);
}

// Below kSeriesRho, e = exp(rho) <= 0.0183 and the transcendental parts become short series in e
// (truncation errors below 1e-9 relative, under float32 rounding), far cheaper than the general
// path -- posterior stds start small (VI's init_std 1e-3 is rho = -6.9) and mostly stay so:
//   softplus(rho) = e (1 + q),  q = -e/2 + e^2/3 - e^3/4 + e^4/5
//   log softplus(rho) = rho + log1p(q),  log1p(q) = q - q^2/2 + q^3/3 - q^4/4     (|q| < 0.0092)
//   sigmoid(rho) = e (1 - e + e^2 - e^3 + e^4 - e^5)
constexpr float kSeriesRho = -4.0f;

// True when every lane of a comparison mask is set: one mask test (testing lanes one by one compiles
// to 16 extracts and branches per vector).
inline bool all_true(i32v mask) {
#if defined(__AVX512F__)
  const __m512i m = reinterpret_cast<__m512i>(mask);
  return _mm512_test_epi32_mask(m, m) == 0xFFFF;
#else
  int32_t all = -1;
  for (int i = 0; i < kLanes; ++i) all &= mask[i];
  return all != 0;
#endif
}

// True when every lane of x is below bound (the series then serve the whole SIMD vector).
inline bool all_below(f32v x, float bound) { return all_true(x < bound); }

// q of the series above, from e = exp(rho).
inline f32v softplus_q(f32v e) { return e * (-0.5f + e * (1.0f / 3.0f + e * (-0.25f + e * 0.2f))); }

// softplus(rho) from e = exp(rho) by the series.
inline f32v softplus_series(f32v e) { return e + e * softplus_q(e); }

inline f32v log1p_series(f32v q) { return q * (1.0f + q * (-0.5f + q * (1.0f / 3.0f + q * -0.25f))); }

inline f32v sigmoid_series(f32v e) { return e * (1.0f + e * (-1.0f + e * (1.0f + e * (-1.0f + e * (1.0f - e))))); }

}  // namespace cpu
}  // namespace bayeskern
