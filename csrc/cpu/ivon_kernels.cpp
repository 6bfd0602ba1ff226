// CPU kernels of IVON's three fused ops (bayeskern/ops/ivon.py has the maths): the draw of a posterior
// sample, the collection of a sample's gradients and the update, each in place over every tensor of a
// list as one flat list of SIMD steps (tensor_steps.h).  fp16/bf16 tensors are staged through float
// buffers; the gradient sums are float32.
#include "cpu/philox_lanes.h"
#include "cpu/tensor_steps.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

namespace bayeskern {
namespace cpu {
namespace {

inline f32v clamp_lanes(f32v x, float radius) {
  x = select(x < -radius, f32v{} - radius, x);
  return select(x > radius, f32v{} + radius, x);
}

// Tensor i's data pointers of kind scalar_t (dtype of the list) and float (the gradient sums).
template <class T>
std::vector<T*> pointers(at::TensorList list) {
  std::vector<T*> out;
  for (const at::Tensor& t : list) out.push_back(t.numel() ? static_cast<T*>(t.data_ptr()) : nullptr);
  return out;
}

StepPlan plan_of(at::TensorList first, at::IntArrayRef offsets) {
  StepPlan plan;
  for (size_t i = 0; i < first.size(); ++i) {
    plan.add(i, first[i].numel(), offsets.empty() ? 0 : static_cast<uint64_t>(offsets[i]));
  }
  return plan;
}

void ivon_draw_cpu(at::TensorList params, at::TensorList means, at::TensorList hesses, double ess, double delta,
                   int64_t seed, int64_t stream, at::IntArrayRef offsets) {
  check_ivon_lists("ivon_draw_", params, {means, hesses}, {}, {}, offsets.size());
  if (params.empty()) return;
  const float ess_f = static_cast<float>(ess), delta_f = static_cast<float>(delta);
  const StepPlan plan = plan_of(params, offsets);
  BK_DISPATCH_KERNEL_TYPES(params[0].scalar_type(), "ivon_draw_cpu", [&] {
    const auto theta = pointers<scalar_t>(params), mean = pointers<scalar_t>(means), hess = pointers<scalar_t>(hesses);
    plan.run([&](int64_t, const Step& s) {
      alignas(64) float theta_buf[kBlockElements], hess_buf[kBlockElements], eps[kBlockElements];
      for (int64_t i = s.lo; i < s.hi; ++i) mean[s.tensor][s.base + i] = theta[s.tensor][s.base + i];
      NormalNoise{}(static_cast<uint64_t>(seed), static_cast<uint64_t>(stream), s.q0, eps);
      float* t = view_mut(theta[s.tensor], s, theta_buf);
      const float* h = view(hess[s.tensor], s, hess_buf);
      for (int v = 0; v < kBlockElements; v += kLanes) {
        const f32v sigma = 1.0f / sqrt_lanes((load(h + v) + delta_f) * ess_f);
        store(t + v, load(t + v) + sigma * load(eps + v));
      }
      store_back(t, s, theta[s.tensor]);
    });
  });
}

void ivon_collect_cpu(at::TensorList grads, at::TensorList grad_sums, at::TensorList grad_eps_sums, bool accumulate,
                      int64_t seed, int64_t stream, at::IntArrayRef offsets) {
  check_ivon_lists("ivon_collect_", grads, {}, {grad_sums, grad_eps_sums}, {}, offsets.size());
  if (grads.empty()) return;
  const StepPlan plan = plan_of(grads, offsets);
  const auto sum = pointers<float>(grad_sums), eps_sum = pointers<float>(grad_eps_sums);
  BK_DISPATCH_KERNEL_TYPES(grads[0].scalar_type(), "ivon_collect_cpu", [&] {
    const auto grad = pointers<scalar_t>(grads);
    plan.run([&](int64_t, const Step& s) {
      alignas(64) float grad_buf[kBlockElements], sum_buf[kBlockElements], eps_sum_buf[kBlockElements],
          eps[kBlockElements];
      NormalNoise{}(static_cast<uint64_t>(seed), static_cast<uint64_t>(stream), s.q0, eps);
      const float* g = view(grad[s.tensor], s, grad_buf);
      float* a = accumulate ? view_mut(sum[s.tensor], s, sum_buf) : target(sum[s.tensor], s, sum_buf);
      float* b = accumulate ? view_mut(eps_sum[s.tensor], s, eps_sum_buf) : target(eps_sum[s.tensor], s, eps_sum_buf);
      for (int v = 0; v < kBlockElements; v += kLanes) {
        const f32v gv = load(g + v);
        store(a + v, accumulate ? load(a + v) + gv : gv);
        store(b + v, accumulate ? load(b + v) + gv * load(eps + v) : gv * load(eps + v));
      }
      store_back(a, s, sum[s.tensor]);
      store_back(b, s, eps_sum[s.tensor]);
    });
  });
}

void ivon_update_cpu(at::TensorList params, at::TensorList momenta, at::TensorList hesses, at::TensorList grad_sums,
                     at::TensorList grad_eps_sums, at::TensorList prior_means, double lr, double ess, double delta,
                     double beta1, double beta2, double bias_correction, double clip_radius, double scale) {
  check_ivon_lists("ivon_update_", params, {momenta, hesses}, {grad_sums, grad_eps_sums}, prior_means);
  if (params.empty()) return;
  const IvonHyper hp = ivon_hyper(lr, ess, delta, beta1, beta2, bias_correction, clip_radius, scale);
  const StepPlan plan = plan_of(params, {});
  const auto sum = pointers<float>(grad_sums), eps_sum = pointers<float>(grad_eps_sums);
  BK_DISPATCH_KERNEL_TYPES(params[0].scalar_type(), "ivon_update_cpu", [&] {
    const auto theta = pointers<scalar_t>(params), momentum = pointers<scalar_t>(momenta),
               hess = pointers<scalar_t>(hesses), mean = pointers<scalar_t>(prior_means);
    plan.run([&](int64_t, const Step& s) {
      alignas(64) float theta_buf[kBlockElements], momentum_buf[kBlockElements], hess_buf[kBlockElements],
          sum_buf[kBlockElements], eps_sum_buf[kBlockElements], mean_buf[kBlockElements];
      const size_t i = s.tensor;
      float* m = view_mut(theta[i], s, theta_buf);
      float* mom = view_mut(momentum[i], s, momentum_buf);
      float* h = view_mut(hess[i], s, hess_buf);
      const float* g = view(sum[i], s, sum_buf);
      const float* e = view(eps_sum[i], s, eps_sum_buf);
      const float* theta0 = mean.empty() ? nullptr : view(mean[i], s, mean_buf);
      for (int v = 0; v < kBlockElements; v += kLanes) {
        const f32v hv = load(h + v), mv = load(m + v);
        const f32v h_delta = hv + hp.delta;
        const f32v h_hat = load(e + v) * hp.scale * sqrt_lanes(h_delta * hp.ess);
        const f32v g_bar = load(mom + v) * hp.beta1 + (load(g + v) * hp.scale) * hp.one_minus_beta1;
        const f32v gap = hv - h_hat;
        const f32v h_new = hv * hp.beta2 + h_hat * hp.one_minus_beta2 + gap * gap * hp.gap_weight / h_delta;
        const f32v offset = theta0 ? mv - load(theta0 + v) : mv;
        const f32v direction = (g_bar / hp.bias_correction + hp.delta * offset) / (h_new + hp.delta);
        store(m + v, mv - hp.lr * clamp_lanes(direction, hp.clip_radius));
        store(mom + v, g_bar);
        store(h + v, h_new);
      }
      store_back(m, s, theta[i]);
      store_back(mom, s, momentum[i]);
      store_back(h, s, hess[i]);
    });
  });
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(bayeskern_cpp, CPU, m) {
  m.impl("ivon_draw_", &cpu::ivon_draw_cpu);
  m.impl("ivon_collect_", &cpu::ivon_collect_cpu);
  m.impl("ivon_update_", &cpu::ivon_update_cpu);
}

}  // namespace bayeskern
