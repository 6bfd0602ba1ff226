// Element maths of the Gaussian KL between N(mu, s^2), s = softplus(rho), and the prior N(m0, sp^2),
// shared by the KL kernels (kl_kernels.cpp) and the fused VI draw (sample_kl_kernels.cpp):
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

}  // namespace cpu
}  // namespace bayeskern
