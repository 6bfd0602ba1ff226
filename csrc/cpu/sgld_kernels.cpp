// CPU kernel of the fused SGLD / pSGLD update (bayeskern/ops/sgld.py has the maths), in place over
// every tensor of a parameter group.  The work is one flat list of SIMD steps (16 Philox blocks = 64
// consecutive global indices of one tensor) over all tensors, split over threads by at::parallel_for,
// so many small tensors balance like one large one.  Elements are staged through float buffers so
// fp16/bf16 tensors share the float32 vector maths.
#include "cpu/philox_lanes.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace bayeskern {
namespace cpu {
namespace {

constexpr int64_t kGrainSteps = 256;  // SIMD steps per parallel chunk (16K elements)

using Hyper = SgldHyper;

// One tensor of the group: its pointers, size, Philox placement and first step in the flat list.
template <class scalar_t>
struct Slice {
  scalar_t* theta;
  const scalar_t* grad;
  const scalar_t* mean;  // null: zero prior mean
  scalar_t* avg;         // null: no preconditioner
  int64_t n;
  uint64_t offset, q_first;
  int64_t first_step;
};

// One SIMD step of the update on the staged elements (all kBlockElements lanes; the caller stores
// only the valid ones).
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
void sgld_steps(const std::vector<Slice<scalar_t>>& slices, int64_t total_steps, const Hyper& h) {
  const bool noise = h.noise_scale != 0.0f;
  at::parallel_for(0, total_steps, kGrainSteps, [&](int64_t begin, int64_t end) {
    alignas(64) float theta[kBlockElements], grad[kBlockElements], mean[kBlockElements], avg[kBlockElements],
        xi[kBlockElements];
    // the slice holding step `begin`: the last one starting at or before it
    auto it = std::upper_bound(slices.begin(), slices.end(), begin,
                               [](int64_t s, const Slice<scalar_t>& x) { return s < x.first_step; }) - 1;
    for (int64_t flat = begin; flat < end; ++flat) {
      while (it + 1 != slices.end() && (it + 1)->first_step <= flat) ++it;
      const Slice<scalar_t>& x = *it;
      const uint64_t q0 = x.q_first + static_cast<uint64_t>(flat - x.first_step) * kLanes;
      const int64_t base = static_cast<int64_t>(4 * q0) - static_cast<int64_t>(x.offset);
      const int64_t lo = std::max<int64_t>(0, -base);
      const int64_t hi = std::min<int64_t>(kBlockElements, x.n - base);
      for (int64_t i = lo; i < hi; ++i) {
        theta[i] = static_cast<float>(x.theta[base + i]);
        grad[i] = static_cast<float>(x.grad[base + i]);
      }
      if (x.mean) for (int64_t i = lo; i < hi; ++i) mean[i] = static_cast<float>(x.mean[base + i]);
      if (x.avg) for (int64_t i = lo; i < hi; ++i) avg[i] = static_cast<float>(x.avg[base + i]);
      if (noise) NormalNoise{}(h.seed, h.stream, q0, xi);
      update_lanes(h, x.mean != nullptr, x.avg != nullptr, noise, theta, grad, mean, avg, xi);
      for (int64_t i = lo; i < hi; ++i) x.theta[base + i] = static_cast<scalar_t>(theta[i]);
      if (x.avg) for (int64_t i = lo; i < hi; ++i) x.avg[base + i] = static_cast<scalar_t>(avg[i]);
    }
  });
}

void sgld_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList prior_means,
                   at::TensorList square_avgs, double lr, double prior_precision, double noise_scale, double alpha,
                   double eps, int64_t seed, int64_t step, at::IntArrayRef offsets) {
  check_sgld_lists(params, grads, prior_means, square_avgs, offsets);
  const size_t count = params.size();
  if (count == 0) return;
  const Hyper h = sgld_hyper(lr, prior_precision, noise_scale, alpha, eps, seed, step);
  BK_DISPATCH_KERNEL_TYPES(params[0].scalar_type(), "sgld_step_cpu", [&] {
    std::vector<Slice<scalar_t>> slices;
    int64_t total_steps = 0;
    for (size_t i = 0; i < count; ++i) {
      const at::Tensor& p = params[i];
      const int64_t n = p.numel();
      if (n == 0) continue;
      check_sgld_tensors(i, params, grads, prior_means, square_avgs);
      const uint64_t offset = static_cast<uint64_t>(offsets[i]);
      const uint64_t q_first = offset / 4;
      const uint64_t q_last = (offset + n - 1) / 4;
      slices.push_back({p.mutable_data_ptr<scalar_t>(), grads[i].const_data_ptr<scalar_t>(),
                        prior_means.empty() ? nullptr : prior_means[i].const_data_ptr<scalar_t>(),
                        square_avgs.empty() ? nullptr : square_avgs[i].mutable_data_ptr<scalar_t>(), n, offset,
                        q_first, total_steps});
      total_steps += static_cast<int64_t>((q_last - q_first) / kLanes + 1);
    }
    if (total_steps > 0) sgld_steps(slices, total_steps, h);
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
    TORCH_CHECK(tensors[i].is_contiguous() && tensors[i].device().is_cpu(), "bayeskern_cpp: first_nonfinite needs contiguous CPU tensors");
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
      BK_DISPATCH_KERNEL_TYPES(t.scalar_type(), "first_nonfinite_cpu", [&] {
        finite[c] = chunk_finite(t.const_data_ptr<scalar_t>() + chunk_start[c], n);
      });
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
