// CPU kernel of the fused SGLD / pSGLD update (bayeskern/ops/sgld.py has the maths), in place over
// every tensor of a parameter group, as one flat list of SIMD steps over all tensors (tensor_steps.h).
// fp16/bf16 tensors are staged through float buffers to share the float32 vector maths.
#include "cpu/philox_lanes.h"
#include "cpu/tensor_steps.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace bayeskern {
namespace cpu {
namespace {

using Hyper = SgldHyper;

// One tensor of the group.
template <class scalar_t>
struct Slice {
  scalar_t* theta;
  const scalar_t* grad;
  const scalar_t* mean;  // null: zero prior mean
  scalar_t* avg;         // null: no preconditioner
};

// One SIMD step of the update on float32 lanes (all kBlockElements of them; the caller keeps only
// the valid ones).
void update_lanes(const Hyper& h, bool has_mean, bool precondition, bool noise, float* theta, const float* grad,
                  const float* mean, float* avg, const float* xi) {
  for (int v = 0; v < kBlockElements; v += kLanes) {
    f32v t = load(theta + v);
    const f32v diff = has_mean ? t - load(mean + v) : t;
    const f32v g_tot = load(grad + v) + h.prior_precision * diff;
    f32v scale = f32v{} + h.noise_scale;
    if (precondition) {
      const f32v s = h.alpha * load(avg + v) + (1.0f - h.alpha) * (g_tot * g_tot);
      const f32v precond = 1.0f / (h.eps + sqrt_lanes(s));
      t = t - h.lr * (precond * g_tot);
      scale = scale * sqrt_lanes(precond);
      store(avg + v, s);
    } else {
      t = t - h.lr * g_tot;
    }
    if (noise) t = t + scale * load(xi + v);
    store(theta + v, t);
  }
}

template <class scalar_t>
void sgld_steps(const std::vector<Slice<scalar_t>>& slices, const StepPlan& plan, const Hyper& h) {
  const bool noise = h.noise_scale != 0.0f;
  plan.run([&](int64_t, const Step& s) {
    alignas(64) float theta_buf[kBlockElements], grad_buf[kBlockElements], mean_buf[kBlockElements],
        avg_buf[kBlockElements], xi[kBlockElements];
    const Slice<scalar_t>& x = slices[s.tensor];
    float* theta = view_mut(x.theta, s, theta_buf);
    float* avg = x.avg ? view_mut(x.avg, s, avg_buf) : nullptr;
    const float* mean = x.mean ? view(x.mean, s, mean_buf) : nullptr;
    if (noise) NormalNoise{}(h.seed, h.stream, s.q0, xi);
    update_lanes(h, mean != nullptr, avg != nullptr, noise, theta, view(x.grad, s, grad_buf), mean, avg, xi);
    store_back(theta, s, x.theta);
    if (avg) store_back(avg, s, x.avg);
  });
}

void sgld_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList prior_means, at::TensorList square_avgs,
                   double lr, double prior_precision, double noise_scale, double alpha, double eps, int64_t seed,
                   int64_t step, at::IntArrayRef offsets) {
  check_sgld_lists(params, grads, prior_means, square_avgs, offsets);
  const size_t count = params.size();
  if (count == 0) return;
  const Hyper h = sgld_hyper(lr, prior_precision, noise_scale, alpha, eps, seed, step);
  BK_DISPATCH_KERNEL_TYPES(params[0].scalar_type(), "sgld_step_cpu", [&] {
    std::vector<Slice<scalar_t>> slices;
    StepPlan plan;
    for (size_t i = 0; i < count; ++i) {
      const at::Tensor& p = params[i];
      if (p.numel() > 0) check_sgld_tensors(i, params, grads, prior_means, square_avgs);
      slices.push_back({p.mutable_data_ptr<scalar_t>(), grads[i].const_data_ptr<scalar_t>(),
                        prior_means.empty() ? nullptr : prior_means[i].const_data_ptr<scalar_t>(),
                        square_avgs.empty() ? nullptr : square_avgs[i].mutable_data_ptr<scalar_t>()});
      plan.add(i, p.numel(), static_cast<uint64_t>(offsets[i]));
    }
    sgld_steps(slices, plan, h);
  });
}

// Index of the first tensor holding a NaN or infinity, or -1: one parallel pass over all elements
// (chunks of kCheckChunk elements of one tensor), so the check before an update costs one read.
constexpr int64_t kCheckChunk = 1 << 16;

template <class scalar_t>
bool chunk_finite(const scalar_t* x, int64_t n) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = as_uint(static_cast<float>(x[i]));
    bad |= static_cast<uint32_t>((bits & 0x7f800000u) == 0x7f800000u);  // exponent all ones: inf or NaN
  }
  return bad == 0;
}

int64_t first_nonfinite_cpu(at::TensorList tensors) {
  std::vector<int64_t> chunk_tensor, chunk_start;
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(tensors[i].is_contiguous() && tensors[i].device().is_cpu(),
                "bayeskern_cpp: first_nonfinite needs contiguous CPU tensors");
    for (int64_t start = 0; start < tensors[i].numel(); start += kCheckChunk) {
      chunk_tensor.push_back(static_cast<int64_t>(i));
      chunk_start.push_back(start);
    }
  }
  const int64_t chunks = static_cast<int64_t>(chunk_tensor.size());
  std::vector<uint8_t> finite(chunks, 1);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const at::Tensor& t = tensors[chunk_tensor[c]];
      const int64_t n = std::min(kCheckChunk, t.numel() - chunk_start[c]);
      BK_DISPATCH_KERNEL_TYPES(t.scalar_type(), "first_nonfinite_cpu",
                               [&] { finite[c] = chunk_finite(t.const_data_ptr<scalar_t>() + chunk_start[c], n); });
    }
  });
  const auto bad = std::find(finite.begin(), finite.end(), 0);
  return bad == finite.end() ? -1 : chunk_tensor[bad - finite.begin()];
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(bayeskern_cpp, CPU, m) {
  m.impl("sgld_step_", &cpu::sgld_step_cpu);
  m.impl("first_nonfinite", &cpu::first_nonfinite_cpu);
}

}  // namespace bayeskern
