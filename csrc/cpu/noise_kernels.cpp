// CPU kernels of the noise ops: Philox in SIMD lanes, fused with the elementwise maths, split over
// threads with at::parallel_for.  Each SIMD step covers 16 Philox blocks = 64 consecutive global
// indices; the elements of a step are staged through small float buffers so fp16/bf16 inputs share
// the float32 vector maths.
#include "cpu/philox_lanes.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>

namespace bayeskern {
namespace cpu {
namespace {

constexpr int64_t kGrainSteps = 256;  // SIMD steps per parallel chunk (16K elements)

void check_dense(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), "bayeskern_cpp: ", name, " must be contiguous");
}

// Runs out[j] = math(noise_j, in_0[j], ..., in_{K-1}[j]) over n elements placed at `offset`.
// `math` takes and returns f32v lanes; inputs may be null (read as zero).
template <int K, class scalar_t, class Noise, class Math>
void fused_elementwise(std::array<const scalar_t*, K> inputs, scalar_t* out, int64_t n, uint64_t seed, uint64_t offset,
                       uint64_t stream, Noise noise, Math math) {
  if (n == 0) return;
  const uint64_t q_first = offset / 4;
  const uint64_t q_last = (offset + n - 1) / 4;
  const int64_t steps = static_cast<int64_t>((q_last - q_first) / kLanes + 1);
  at::parallel_for(0, steps, kGrainSteps, [&](int64_t step_begin, int64_t step_end) {
    alignas(64) float noise_buf[kBlockElements];
    alignas(64) float in_buf[K > 0 ? K : 1][kBlockElements];
    alignas(64) float out_buf[kBlockElements];
    std::fill(&in_buf[0][0], &in_buf[0][0] + sizeof(in_buf) / sizeof(float), 0.0f);  // absent inputs read 0
    for (int64_t step = step_begin; step < step_end; ++step) {
      const uint64_t q0 = q_first + static_cast<uint64_t>(step) * kLanes;
      const int64_t base = static_cast<int64_t>(4 * q0) - static_cast<int64_t>(offset);
      const int64_t lo = std::max<int64_t>(0, -base);
      const int64_t hi = std::min<int64_t>(kBlockElements, n - base);
      if (lo > 0 || hi < kBlockElements) {
        for (int k = 0; k < K; ++k) std::fill(in_buf[k], in_buf[k] + kBlockElements, 0.0f);
      }
      for (int k = 0; k < K; ++k) {
        if (inputs[k] == nullptr) continue;
        const scalar_t* src = inputs[k] + base;
        for (int64_t i = lo; i < hi; ++i) in_buf[k][i] = static_cast<float>(src[i]);
      }
      noise(seed, stream, q0, noise_buf);
      for (int v = 0; v < kBlockElements; v += kLanes) {
        std::array<f32v, K> lanes;
        for (int k = 0; k < K; ++k) lanes[k] = load(in_buf[k] + v);
        store(out_buf + v, math(load(noise_buf + v), lanes));
      }
      scalar_t* dst = out + base;
      for (int64_t i = lo; i < hi; ++i) dst[i] = static_cast<scalar_t>(out_buf[i]);
    }
  });
}

at::Tensor gaussian_sample_cpu(const at::Tensor& mu, const at::Tensor& rho, int64_t seed, int64_t offset,
                               int64_t stream) {
  check_dense(mu, "mu");
  check_dense(rho, "rho");
  auto out = at::empty_like(mu);
  BK_DISPATCH_KERNEL_TYPES(mu.scalar_type(), "gaussian_sample_cpu", [&] {
    fused_elementwise<2, scalar_t>(
        {mu.const_data_ptr<scalar_t>(), rho.const_data_ptr<scalar_t>()}, out.mutable_data_ptr<scalar_t>(), mu.numel(),
        seed, offset, stream, NormalNoise{},
        [](f32v eps, const std::array<f32v, 2>& x) { return x[0] + softplus<f32v, u32v>(x[1]) * eps; });
  });
  return out;
}

at::Tensor gaussian_sample_backward_cpu(const at::Tensor& grad, const at::Tensor& rho, int64_t seed, int64_t offset,
                                        int64_t stream) {
  check_dense(grad, "grad");
  check_dense(rho, "rho");
  auto grad_rho = at::empty_like(rho);
  BK_DISPATCH_KERNEL_TYPES(rho.scalar_type(), "gaussian_sample_backward_cpu", [&] {
    fused_elementwise<2, scalar_t>(
        {grad.const_data_ptr<scalar_t>(), rho.const_data_ptr<scalar_t>()}, grad_rho.mutable_data_ptr<scalar_t>(),
        rho.numel(), seed, offset, stream, NormalNoise{},
        [](f32v eps, const std::array<f32v, 2>& x) { return x[0] * eps * sigmoid<f32v, u32v>(x[1]); });
  });
  return grad_rho;
}

at::Tensor weight_dropout_cpu(const at::Tensor& w, double p, int64_t seed, int64_t offset, int64_t stream,
                              const std::optional<at::Tensor>& fill) {
  check_dense(w, "w");
  if (fill.has_value()) check_dense(*fill, "fill");
  auto out = at::empty_like(w);
  const float p32 = static_cast<float>(p);
  const float scale = fill.has_value() ? 1.0f : 1.0f / (1.0f - p32);
  BK_DISPATCH_KERNEL_TYPES(w.scalar_type(), "weight_dropout_cpu", [&] {
    const scalar_t* fill_ptr = fill.has_value() ? fill->const_data_ptr<scalar_t>() : nullptr;
    fused_elementwise<2, scalar_t>(
        {w.const_data_ptr<scalar_t>(), fill_ptr}, out.mutable_data_ptr<scalar_t>(), w.numel(), seed, offset, stream,
        UniformNoise{},
        [p32, scale](f32v u, const std::array<f32v, 2>& x) { return select(u >= p32, x[0] * scale, x[1]); });
  });
  return out;
}

at::Tensor weight_dropout_backward_cpu(const at::Tensor& grad, double p, int64_t seed, int64_t offset, int64_t stream,
                                       double scale) {
  check_dense(grad, "grad");
  auto grad_w = at::empty_like(grad);
  const float p32 = static_cast<float>(p);
  const float scale32 = static_cast<float>(scale);
  BK_DISPATCH_KERNEL_TYPES(grad.scalar_type(), "weight_dropout_backward_cpu", [&] {
    fused_elementwise<1, scalar_t>(
        {grad.const_data_ptr<scalar_t>()}, grad_w.mutable_data_ptr<scalar_t>(), grad.numel(), seed, offset, stream,
        UniformNoise{},
        [p32, scale32](f32v u, const std::array<f32v, 1>& x) { return select(u >= p32, x[0] * scale32, f32v{}); });
  });
  return grad_w;
}

at::Tensor& fill_normal_cpu(at::Tensor& out, int64_t seed, int64_t offset, int64_t stream) {
  check_dense(out, "out");
  TORCH_CHECK(out.scalar_type() == at::kFloat, "bayeskern_cpp: fill_normal_ needs a float32 tensor");
  fused_elementwise<0, float>({}, out.mutable_data_ptr<float>(), out.numel(), seed, offset, stream, NormalNoise{},
                              [](f32v eps, const std::array<f32v, 0>&) { return eps; });
  return out;
}

at::Tensor& fill_uniform_cpu(at::Tensor& out, int64_t seed, int64_t offset, int64_t stream) {
  check_dense(out, "out");
  TORCH_CHECK(out.scalar_type() == at::kFloat, "bayeskern_cpp: fill_uniform_ needs a float32 tensor");
  fused_elementwise<0, float>({}, out.mutable_data_ptr<float>(), out.numel(), seed, offset, stream, UniformNoise{},
                              [](f32v u, const std::array<f32v, 0>&) { return u; });
  return out;
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(bayeskern_cpp, CPU, m) {
  m.impl("gaussian_sample", &cpu::gaussian_sample_cpu);
  m.impl("gaussian_sample_backward", &cpu::gaussian_sample_backward_cpu);
  m.impl("weight_dropout", &cpu::weight_dropout_cpu);
  m.impl("weight_dropout_backward", &cpu::weight_dropout_backward_cpu);
  m.impl("fill_normal_", &cpu::fill_normal_cpu);
  m.impl("fill_uniform_", &cpu::fill_uniform_cpu);
}

}  // namespace bayeskern
