// CPU kernels of the fused training draws (bayeskern/ops/draw.py has the maths): every Bayesian
// tensor drawn together with its prior term, in one pass over all tensors (tensor_steps.h), and one
// pass back that folds the prior term's gradient into the draw's, with the noise regenerated from
// Philox -- or, for float32 VI, recovered from the drawn weights where that is exact enough (below).
//   gaussian_sample_kl (VI):       w = mu + s * eps,  term = KL(N(mu, s^2) || N(m0, sp^2))
//   weight_dropout_l2 (MC-dropout): w = keep ? mu * scale : fill,  term = (1 - p) |mu - m0|^2 / (2 sp^2)
// fp16/bf16 tensors are staged through float buffers to share the float32 vector maths; the prior
// term is summed in float lanes per fixed chunk of the plan, then in double.
#include "cpu/block_pool.h"
#include "cpu/kl_math.h"
#include "cpu/tensor_steps.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace bayeskern {
namespace cpu {
namespace {

alignas(64) constexpr float kZeros[kBlockElements] = {};  // absent inputs (rho, zero prior means) read here

// One tensor: its pointers and prior scale.
template <class scalar_t>
struct Slice {
  const scalar_t* mu;
  const scalar_t* rho;   // VI only
  const scalar_t* m0;    // null: zero prior mean
  const scalar_t* grad;  // backward only
  const scalar_t* w;     // backward of float32 VI: the drawn weights (null: regenerate the noise)
  scalar_t* out_a;       // forward: w; backward: grad_mu
  scalar_t* out_b;       // backward of VI: grad_rho
  float inv_var;         // 1 / sp^2
};

struct Buffers {
  alignas(64) float mu[kBlockElements];
  alignas(64) float rho[kBlockElements];
  alignas(64) float m0[kBlockElements];
  alignas(64) float grad[kBlockElements];
  alignas(64) float w[kBlockElements];
  alignas(64) float noise[kBlockElements];
  alignas(64) float a[kBlockElements];
  alignas(64) float b[kBlockElements];
};

// The prior-term lanes of one step with the lanes outside the tensor zeroed.
inline f32v mask_outside(f32v x, const Step& s, int v) {
  if (in_place(s)) return x;
  alignas(64) float lanes[kLanes];
  store(lanes, x);
  for (int i = 0; i < kLanes; ++i) {
    if (v + i < s.lo || v + i >= s.hi) lanes[i] = 0.0f;
  }
  return load(lanes);
}

// One backward step's inputs as float32 lanes (w null where the draw has no samples to read).  A
// draw's backward(step, noise, regenerate, grad_mu, grad_rho) writes the step's gradients;
// regenerate() fills noise with the step's Philox noise.
struct BackwardStep {
  const float *grad, *mu, *rho, *m0, *w;
  float inv_var, gk;  // 1 / sp^2, the prior term's upstream gradient
};

// VI: the reparameterised Gaussian draw and its KL (kl_math.h; the series path where every lane of
// rho is below kSeriesRho).
struct GaussianDraw {
  using Noise = NormalNoise;
  static double constant(int64_t n, double prior_std) { return static_cast<double>(n) * (std::log(prior_std) - 0.5); }
  void forward(f32v eps, f32v mu, f32v rho, f32v m0, float inv_var, f32v& w, f32v& term) const {
    const f32v d = mu - m0;
    if (all_below(rho, kSeriesRho)) {
      const f32v e = exp_nonpositive<f32v, u32v>(rho);
      const f32v q = softplus_q(e);
      const f32v sp = e + e * q;
      w = mu + sp * eps;
      term = (sp * sp + d * d) * (0.5f * inv_var) - (rho + log1p_series(q));
      return;
    }
    const f32v sp = softplus<f32v, u32v>(rho);
    w = mu + sp * eps;
    term = kl_term<f32v, u32v>(sp, d, 0.5f * inv_var);
  }
  // The backward takes eps = (w - mu) / s from the drawn weights w where it has them (float32) and
  // every lane of the step has |w| <= 256 s, in place of Philox + Box-Muller (most of its arithmetic
  // on CPU): as w = fl(mu + fl(s * eps)), that eps differs from the regenerated one by at most about
  // 2^-24 (|w| / s + 3 |eps|) <= 2^-16 + 2^-22 |eps|.  Elsewhere it regenerates the noise.
  static constexpr float kSampleNoiseRatio = 256.0f;
  template <class Regenerate>
  void backward(const BackwardStep& in, float* noise, Regenerate regenerate, float* grad_mu, float* grad_rho) const {
    if (in.w == nullptr || !noise_from_sample(in, noise)) regenerate();
    for (int v = 0; v < kBlockElements; v += kLanes) {
      f32v sp, sig;
      std_and_sigmoid(load(in.rho + v), sp, sig);
      const f32v g = load(in.grad + v), mu = load(in.mu + v);
      store(grad_mu + v, g + (in.gk * in.inv_var) * (mu - load(in.m0 + v)));
      store(grad_rho + v, sig * (g * load(noise + v) + in.gk * kl_rho_factor(sp, in.inv_var)));
    }
  }
  // eps = (w - mu) / s into noise; false (noise incomplete) unless every lane has |w| <= 256 s.
  static bool noise_from_sample(const BackwardStep& in, float* noise) {
    for (int v = 0; v < kBlockElements; v += kLanes) {
      const f32v sp = std_only(load(in.rho + v));
      const f32v w = load(in.w + v);
      if (!all_true(as_float(as_uint(w) & 0x7fffffffu) <= sp * kSampleNoiseRatio)) return false;  // NaN too
      store(noise + v, (w - load(in.mu + v)) / sp);
    }
    return true;
  }
  static f32v std_only(f32v rho) {
    if (all_below(rho, kSeriesRho)) return softplus_series(exp_nonpositive<f32v, u32v>(rho));
    return softplus<f32v, u32v>(rho);
  }
  static void std_and_sigmoid(f32v rho, f32v& sp, f32v& sig) {
    if (all_below(rho, kSeriesRho)) {
      const f32v e = exp_nonpositive<f32v, u32v>(rho);
      sp = softplus_series(e);
      sig = sigmoid_series(e);
    } else {
      softplus_sigmoid<f32v, u32v>(rho, sp, sig);
    }
  }
};

// MC-dropout: keep = u >= p; kept weights scaled, dropped ones take the prior mean (fill) or zero.
struct DropoutDraw {
  using Noise = UniformNoise;
  float p, scale;
  bool fill_prior;
  static double constant(int64_t, double) { return 0.0; }
  void forward(f32v u, f32v mu, f32v, f32v m0, float inv_var, f32v& w, f32v& term) const {
    w = select(u >= p, mu * scale, fill_prior ? m0 : f32v{});
    const f32v d = mu - m0;
    term = (0.5f * (1.0f - p) * inv_var) * (d * d);
  }
  template <class Regenerate>
  void backward(const BackwardStep& in, const float* u, Regenerate regenerate, float* grad_mu, float*) const {
    regenerate();
    for (int v = 0; v < kBlockElements; v += kLanes) {
      const f32v prior = (in.gk * (1.0f - p) * in.inv_var) * (load(in.mu + v) - load(in.m0 + v));
      store(grad_mu + v, select(load(u + v) >= p, load(in.grad + v) * scale, f32v{}) + prior);
    }
  }
};

void check_lists(at::TensorList mus, at::TensorList rhos, const c10::List<std::optional<at::Tensor>>& prior_means,
                 at::ArrayRef<double> prior_stds, at::IntArrayRef offsets) {
  const size_t n = mus.size();
  TORCH_CHECK(
      (rhos.empty() || rhos.size() == n) && prior_means.size() == n && prior_stds.size() == n && offsets.size() == n,
      "bayeskern_cpp: a fused draw needs one prior mean, prior std and offset (and rho) per mu");
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(mus[i].is_contiguous() && mus[i].scalar_type() == mus[0].scalar_type(),
                "bayeskern_cpp: a fused draw needs contiguous mus of one dtype (tensor ", i, ")");
    TORCH_CHECK(rhos.empty() || (rhos[i].is_contiguous() && rhos[i].numel() == mus[i].numel() &&
                                 rhos[i].scalar_type() == mus[0].scalar_type()),
                "bayeskern_cpp: a fused draw needs a contiguous rho of mu's size and dtype (tensor ", i, ")");
    const std::optional<at::Tensor> m0 = prior_means[i];
    TORCH_CHECK(!m0.has_value() ||
                    (m0->is_contiguous() && m0->numel() == mus[i].numel() && m0->scalar_type() == mus[0].scalar_type()),
                "bayeskern_cpp: a fused draw needs a contiguous prior mean of mu's size and dtype (tensor ", i, ")");
  }
}

// The slices and plan of a call (out_a/out_b/grad filled by the caller).
template <class scalar_t>
std::vector<Slice<scalar_t>> make_slices(at::TensorList mus, at::TensorList rhos,
                                         const c10::List<std::optional<at::Tensor>>& prior_means,
                                         at::ArrayRef<double> prior_stds, at::IntArrayRef offsets, StepPlan& plan) {
  std::vector<Slice<scalar_t>> slices;
  for (size_t i = 0; i < mus.size(); ++i) {
    const std::optional<at::Tensor> m0 = prior_means[i];
    slices.push_back({mus[i].const_data_ptr<scalar_t>(), rhos.empty() ? nullptr : rhos[i].const_data_ptr<scalar_t>(),
                      m0.has_value() ? m0->const_data_ptr<scalar_t>() : nullptr, nullptr, nullptr, nullptr, nullptr,
                      static_cast<float>(1.0 / (prior_stds[i] * prior_stds[i]))});
    plan.add(i, mus[i].numel(), static_cast<uint64_t>(offsets[i]));
  }
  return slices;
}

template <class Draw>
std::tuple<std::vector<at::Tensor>, at::Tensor> draw_forward(const Draw& draw, at::TensorList mus, at::TensorList rhos,
                                                             const c10::List<std::optional<at::Tensor>>& prior_means,
                                                             at::ArrayRef<double> prior_stds, int64_t seed,
                                                             at::IntArrayRef offsets, int64_t stream) {
  check_lists(mus, rhos, prior_means, prior_stds, offsets);
  std::vector<at::Tensor> samples;
  double term = 0.0;
  for (size_t i = 0; i < mus.size(); ++i) {
    samples.push_back(pooled_empty_like(mus[i]));
    term += Draw::constant(mus[i].numel(), prior_stds[i]);
  }
  if (!mus.empty()) {
    BK_DISPATCH_KERNEL_TYPES(mus[0].scalar_type(), "draw_forward_cpu", [&] {
      StepPlan plan;
      auto slices = make_slices<scalar_t>(mus, rhos, prior_means, prior_stds, offsets, plan);
      for (size_t i = 0; i < mus.size(); ++i) slices[i].out_a = samples[i].mutable_data_ptr<scalar_t>();
      std::vector<f32v> partial(plan.chunks(), f32v{});  // per chunk, so the sum ignores the thread count
      plan.run([&](int64_t chunk, const Step& s) {
        Buffers buf;
        const Slice<scalar_t>& x = slices[s.tensor];
        const float* mu = view(x.mu, s, buf.mu);
        const float* rho = x.rho ? view(x.rho, s, buf.rho) : kZeros;
        const float* m0 = x.m0 ? view(x.m0, s, buf.m0) : kZeros;
        float* w = target(x.out_a, s, buf.a);
        typename Draw::Noise{}(seed, stream, s.q0, buf.noise);
        f32v acc{};
        for (int v = 0; v < kBlockElements; v += kLanes) {
          f32v w_lanes, term_lanes;
          draw.forward(load(buf.noise + v), load(mu + v), load(rho + v), load(m0 + v), x.inv_var, w_lanes, term_lanes);
          store(w + v, w_lanes);
          acc += mask_outside(term_lanes, s, v);
        }
        partial[chunk] += acc;
        store_back(w, s, x.out_a);
      });
      for (const f32v& p : partial) {
        for (int i = 0; i < kLanes; ++i) term += p[i];
      }
    });
  }
  const auto options = mus.empty() ? at::TensorOptions(at::kFloat) : mus[0].options().dtype(at::kFloat);
  return {samples, at::scalar_tensor(term, options)};
}

template <class Draw>
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> draw_backward(
    const Draw& draw, at::TensorList grads, const at::Tensor& grad_term, at::TensorList mus, at::TensorList rhos,
    at::TensorList samples, const c10::List<std::optional<at::Tensor>>& prior_means, at::ArrayRef<double> prior_stds,
    int64_t seed, at::IntArrayRef offsets, int64_t stream) {
  check_lists(mus, rhos, prior_means, prior_stds, offsets);
  TORCH_CHECK(grads.size() == mus.size(), "bayeskern_cpp: a fused draw's backward needs one grad per mu");
  TORCH_CHECK(samples.empty() || samples.size() == mus.size(),
              "bayeskern_cpp: a fused draw's backward needs no samples or one per mu");
  for (size_t i = 0; i < samples.size(); ++i) {
    TORCH_CHECK(samples[i].is_contiguous() && samples[i].numel() == mus[i].numel() &&
                    samples[i].scalar_type() == mus[i].scalar_type(),
                "bayeskern_cpp: a fused draw's backward needs contiguous samples of mu's size and dtype");
  }
  const float gk = grad_term.item<float>();
  std::vector<at::Tensor> grad_mus, grad_rhos;
  for (size_t i = 0; i < mus.size(); ++i) {
    TORCH_CHECK(grads[i].is_contiguous() && grads[i].numel() == mus[i].numel() &&
                    grads[i].scalar_type() == mus[i].scalar_type(),
                "bayeskern_cpp: a fused draw's backward needs a contiguous grad of mu's size and dtype");
    grad_mus.push_back(pooled_empty_like(mus[i]));
    if (!rhos.empty()) grad_rhos.push_back(pooled_empty_like(rhos[i]));
  }
  if (mus.empty()) return {grad_mus, grad_rhos};
  BK_DISPATCH_KERNEL_TYPES(mus[0].scalar_type(), "draw_backward_cpu", [&] {
    StepPlan plan;
    auto slices = make_slices<scalar_t>(mus, rhos, prior_means, prior_stds, offsets, plan);
    for (size_t i = 0; i < mus.size(); ++i) {
      slices[i].grad = grads[i].const_data_ptr<scalar_t>();
      slices[i].out_a = grad_mus[i].mutable_data_ptr<scalar_t>();
      slices[i].out_b = rhos.empty() ? nullptr : grad_rhos[i].mutable_data_ptr<scalar_t>();
      // in half precision the rounding of w (2^-11 or 2^-8 of |w|) makes (w - mu) / s too coarse
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (!samples.empty()) slices[i].w = samples[i].const_data_ptr<scalar_t>();
      }
    }
    plan.run([&](int64_t, const Step& s) {
      Buffers buf;
      const Slice<scalar_t>& x = slices[s.tensor];
      const float* mu = view(x.mu, s, buf.mu);
      const float* rho = x.rho ? view(x.rho, s, buf.rho) : kZeros;
      const float* m0 = x.m0 ? view(x.m0, s, buf.m0) : kZeros;
      const float* grad = view(x.grad, s, buf.grad);
      const float* w = x.w ? view(x.w, s, buf.w) : nullptr;
      float* grad_mu = target(x.out_a, s, buf.a);
      float* grad_rho = x.out_b ? target(x.out_b, s, buf.b) : buf.b;
      prefetch_ahead(x.grad, s);  // the upstream gradient adds an input stream the forward lacks
      prefetch_ahead(x.mu, s);
      prefetch_ahead(x.rho, s);
      prefetch_ahead(x.m0, s);
      prefetch_ahead(x.w, s);
      const auto regenerate = [&] { typename Draw::Noise{}(seed, stream, s.q0, buf.noise); };
      draw.backward(BackwardStep{grad, mu, rho, m0, w, x.inv_var, gk}, buf.noise, regenerate, grad_mu, grad_rho);
      store_back(grad_mu, s, x.out_a);
      if (x.out_b) store_back(grad_rho, s, x.out_b);
    });
  });
  return {grad_mus, grad_rhos};
}

std::tuple<std::vector<at::Tensor>, at::Tensor> gaussian_sample_kl_cpu(
    at::TensorList mus, at::TensorList rhos, const c10::List<std::optional<at::Tensor>>& prior_means,
    at::ArrayRef<double> prior_stds, int64_t seed, at::IntArrayRef offsets, int64_t stream) {
  TORCH_CHECK(rhos.size() == mus.size(), "bayeskern_cpp: gaussian_sample_kl needs one rho per mu");
  return draw_forward(GaussianDraw{}, mus, rhos, prior_means, prior_stds, seed, offsets, stream);
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> gaussian_sample_kl_backward_cpu(
    at::TensorList grads, const at::Tensor& grad_kl, at::TensorList mus, at::TensorList rhos, at::TensorList samples,
    const c10::List<std::optional<at::Tensor>>& prior_means, at::ArrayRef<double> prior_stds, int64_t seed,
    at::IntArrayRef offsets, int64_t stream) {
  TORCH_CHECK(rhos.size() == mus.size(), "bayeskern_cpp: gaussian_sample_kl_backward needs one rho per mu");
  return draw_backward(GaussianDraw{}, grads, grad_kl, mus, rhos, samples, prior_means, prior_stds, seed, offsets,
                       stream);
}

DropoutDraw dropout_draw(double p, bool fill_prior) {
  const float p32 = static_cast<float>(p);
  return {p32, fill_prior ? 1.0f : 1.0f / (1.0f - p32), fill_prior};
}

std::tuple<std::vector<at::Tensor>, at::Tensor> weight_dropout_l2_cpu(
    at::TensorList mus, double p, bool fill_prior, const c10::List<std::optional<at::Tensor>>& prior_means,
    at::ArrayRef<double> prior_stds, int64_t seed, at::IntArrayRef offsets, int64_t stream) {
  return draw_forward(dropout_draw(p, fill_prior), mus, {}, prior_means, prior_stds, seed, offsets, stream);
}

std::vector<at::Tensor> weight_dropout_l2_backward_cpu(at::TensorList grads, const at::Tensor& grad_l2,
                                                       at::TensorList mus, double p, bool fill_prior,
                                                       const c10::List<std::optional<at::Tensor>>& prior_means,
                                                       at::ArrayRef<double> prior_stds, int64_t seed,
                                                       at::IntArrayRef offsets, int64_t stream) {
  return std::get<0>(draw_backward(dropout_draw(p, fill_prior), grads, grad_l2, mus, {}, {}, prior_means, prior_stds,
                                   seed, offsets, stream));
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(bayeskern_cpp, CPU, m) {
  m.impl("gaussian_sample_kl", &cpu::gaussian_sample_kl_cpu);
  m.impl("gaussian_sample_kl_backward", &cpu::gaussian_sample_kl_backward_cpu);
  m.impl("weight_dropout_l2", &cpu::weight_dropout_l2_cpu);
  m.impl("weight_dropout_l2_backward", &cpu::weight_dropout_l2_backward_cpu);
}

}  // namespace bayeskern
