// CPU kernels of the Gaussian KL between a mean-field posterior N(mu, s^2), s = softplus(rho), and
// the prior N(m0, sp^2) (bayeskern/ops/kl.py holds the specification, kl_math.h the element maths).
// One pass over (mu, rho, m0) each way, SIMD lanes from csrc/cpu/simd.h, softplus and sigmoid from
// one shared exp.  Partial sums are taken over fixed chunks and added in order, so the value does
// not depend on the number of threads.  float32 only (bayeskern.ops.kl runs the reference otherwise).
#include "cpu/kl_math.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace bayeskern {
namespace cpu {
namespace {

constexpr int64_t kChunk = 16384;  // elements per partial sum

template <class F, class U>
inline F kl_value(F mu, F rho, F m0, float inv_two_var) {
  F s, sig;
  softplus_sigmoid<F, U>(rho, s, sig);
  return kl_term<F, U>(s, mu - m0, inv_two_var);
}

template <class F, class U>
inline void kl_grads(F mu, F rho, F m0, float g, float inv_var, F& grad_mu, F& grad_rho) {
  F s, sig;
  softplus_sigmoid<F, U>(rho, s, sig);
  grad_mu = (mu - m0) * (g * inv_var);
  grad_rho = kl_rho_factor(s, inv_var) * sig * g;
}

// Runs body(begin, end) over fixed chunks of n elements in parallel.
template <class Body>
void for_chunks(int64_t n, Body body) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  at::parallel_for(0, chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) body(c, c * kChunk, std::min(n, (c + 1) * kChunk));
  });
}

void check_inputs(const at::Tensor& mu, const at::Tensor& rho, const std::optional<at::Tensor>& prior_mean) {
  TORCH_CHECK(mu.scalar_type() == at::kFloat && rho.scalar_type() == at::kFloat,
              "bayeskern_cpp: gaussian_kl needs float32 mu and rho");
  TORCH_CHECK(mu.is_contiguous() && rho.is_contiguous() && mu.numel() == rho.numel(),
              "bayeskern_cpp: gaussian_kl needs contiguous mu and rho of one size");
  if (prior_mean.has_value()) {
    TORCH_CHECK(
        prior_mean->scalar_type() == at::kFloat && prior_mean->is_contiguous() && prior_mean->numel() == mu.numel(),
        "bayeskern_cpp: gaussian_kl needs a contiguous float32 prior_mean of mu's size");
  }
}

at::Tensor gaussian_kl_cpu(const at::Tensor& mu, const at::Tensor& rho, const std::optional<at::Tensor>& prior_mean,
                           double prior_std) {
  check_inputs(mu, rho, prior_mean);
  const int64_t n = mu.numel();
  const float* mu_p = mu.const_data_ptr<float>();
  const float* rho_p = rho.const_data_ptr<float>();
  const float* m0_p = prior_mean.has_value() ? prior_mean->const_data_ptr<float>() : nullptr;
  const float inv_two_var = static_cast<float>(0.5 / (prior_std * prior_std));
  std::vector<double> partial((n + kChunk - 1) / kChunk, 0.0);
  for_chunks(n, [&](int64_t c, int64_t begin, int64_t end) {
    f32v acc{};
    int64_t i = begin;
    for (; i + kLanes <= end; i += kLanes) {
      const f32v m0 = m0_p ? load(m0_p + i) : f32v{};
      acc += kl_value<f32v, u32v>(load(mu_p + i), load(rho_p + i), m0, inv_two_var);
    }
    double sum = 0.0;
    for (int k = 0; k < kLanes; ++k) sum += acc[k];
    for (; i < end; ++i) sum += kl_value<float, uint32_t>(mu_p[i], rho_p[i], m0_p ? m0_p[i] : 0.0f, inv_two_var);
    partial[c] = sum;
  });
  double total = static_cast<double>(n) * (std::log(prior_std) - 0.5);
  for (double p : partial) total += p;
  return at::scalar_tensor(total, mu.options());
}

std::tuple<at::Tensor, at::Tensor> gaussian_kl_backward_cpu(const at::Tensor& grad, const at::Tensor& mu,
                                                            const at::Tensor& rho,
                                                            const std::optional<at::Tensor>& prior_mean,
                                                            double prior_std) {
  check_inputs(mu, rho, prior_mean);
  const float g = grad.item<float>();
  const float inv_var = static_cast<float>(1.0 / (prior_std * prior_std));
  auto grad_mu = at::empty_like(mu);
  auto grad_rho = at::empty_like(rho);
  const float* mu_p = mu.const_data_ptr<float>();
  const float* rho_p = rho.const_data_ptr<float>();
  const float* m0_p = prior_mean.has_value() ? prior_mean->const_data_ptr<float>() : nullptr;
  float* gmu_p = grad_mu.mutable_data_ptr<float>();
  float* grho_p = grad_rho.mutable_data_ptr<float>();
  for_chunks(mu.numel(), [&](int64_t, int64_t begin, int64_t end) {
    int64_t i = begin;
    for (; i + kLanes <= end; i += kLanes) {
      f32v gm, gr;
      kl_grads<f32v, u32v>(load(mu_p + i), load(rho_p + i), m0_p ? load(m0_p + i) : f32v{}, g, inv_var, gm, gr);
      store(gmu_p + i, gm);
      store(grho_p + i, gr);
    }
    for (; i < end; ++i) {
      kl_grads<float, uint32_t>(mu_p[i], rho_p[i], m0_p ? m0_p[i] : 0.0f, g, inv_var, gmu_p[i], grho_p[i]);
    }
  });
  return {grad_mu, grad_rho};
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(bayeskern_cpp, CPU, m) {
  m.impl("gaussian_kl", &cpu::gaussian_kl_cpu);
  m.impl("gaussian_kl_backward", &cpu::gaussian_kl_backward_cpu);
}

}  // namespace bayeskern
