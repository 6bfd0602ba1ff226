// Host-side pieces every kernel file shares, CPU and CUDA alike: the dtypes the kernels serve and
// the hyperparameters and argument checks of the multi-tensor SGLD and IVON ops.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <initializer_list>

namespace bayeskern {

// The kernels compute in float32; fp16/bf16 are converted on load and store.  float64 never
// reaches them (bayeskern.ops runs the reference for it).
#define BK_DISPATCH_KERNEL_TYPES(TYPE, NAME, ...)                                                       \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                                                        \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// The SGLD hyperparameters as the kernels read them (float32 maths; the stream is the step count).
struct SgldHyper {
  float lr, prior_precision, noise_scale, alpha, eps;
  uint64_t seed, stream;
};

inline SgldHyper sgld_hyper(double lr, double prior_precision, double noise_scale, double alpha, double eps,
                            int64_t seed, int64_t step) {
  return {static_cast<float>(lr),          static_cast<float>(prior_precision),
          static_cast<float>(noise_scale), static_cast<float>(alpha),
          static_cast<float>(eps),         static_cast<uint64_t>(seed),
          static_cast<uint64_t>(step)};
}

// One grad and offset per parameter; prior means and RMSprop averages absent or one per parameter.
inline void check_sgld_lists(at::TensorList params, at::TensorList grads, at::TensorList prior_means,
                             at::TensorList square_avgs, at::IntArrayRef offsets) {
  const size_t count = params.size();
  TORCH_CHECK(grads.size() == count && offsets.size() == count,
              "bayeskern_cpp: sgld_step_ needs one grad and offset per param");
  TORCH_CHECK(prior_means.empty() || prior_means.size() == count,
              "bayeskern_cpp: prior_means must be empty or match params");
  TORCH_CHECK(square_avgs.empty() || square_avgs.size() == count,
              "bayeskern_cpp: square_avgs must be empty or match params");
}

// The tensors of parameter i: contiguous, of the parameter's dtype, device and size.
inline void check_sgld_tensors(size_t i, at::TensorList params, at::TensorList grads, at::TensorList prior_means,
                               at::TensorList square_avgs) {
  const at::Tensor& p = params[i];
  const at::Tensor* group[] = {&p, &grads[i], prior_means.empty() ? nullptr : &prior_means[i],
                               square_avgs.empty() ? nullptr : &square_avgs[i]};
  for (const at::Tensor* t : group) {
    if (t == nullptr) continue;
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == p.scalar_type() && t->numel() == p.numel() &&
                    t->device() == p.device(),
                "bayeskern_cpp: sgld_step_ needs contiguous tensors of one dtype and device and matching sizes");
  }
}

// The IVON hyperparameters as the kernels read them (bayeskern/ops/ivon.py: float32 maths; the
// complements of the betas and the h update's gap weight 0.5 (1 - beta2)^2 are formed in double).
struct IvonHyper {
  float lr, ess, delta, beta1, one_minus_beta1, beta2, one_minus_beta2, gap_weight, bias_correction, clip_radius, scale;
};

inline IvonHyper ivon_hyper(double lr, double ess, double delta, double beta1, double beta2, double bias_correction,
                            double clip_radius, double scale) {
  return {static_cast<float>(lr),
          static_cast<float>(ess),
          static_cast<float>(delta),
          static_cast<float>(beta1),
          static_cast<float>(1.0 - beta1),
          static_cast<float>(beta2),
          static_cast<float>(1.0 - beta2),
          static_cast<float>(0.5 * (1.0 - beta2) * (1.0 - beta2)),
          static_cast<float>(bias_correction),
          static_cast<float>(clip_radius),
          static_cast<float>(scale)};
}

// Tensor i of every list in `same` is contiguous and laid out as first[i] (dtype, device, size); of
// every list in `sums` contiguous float32 of first[i]'s device and size.  Lists hold one tensor per
// tensor of `first` (an empty list in `optional` means absent).
inline void check_ivon_lists(const char* op, at::TensorList first, std::initializer_list<at::TensorList> same,
                             std::initializer_list<at::TensorList> sums, at::TensorList optional = {},
                             size_t offsets = static_cast<size_t>(-1)) {
  const size_t count = first.size();
  for (at::TensorList list : same) TORCH_CHECK(list.size() == count, "bayeskern_cpp: ", op, ": lists differ in length");
  for (at::TensorList list : sums) TORCH_CHECK(list.size() == count, "bayeskern_cpp: ", op, ": lists differ in length");
  TORCH_CHECK(optional.empty() || optional.size() == count, "bayeskern_cpp: ", op,
              ": prior_means must be empty or match");
  TORCH_CHECK(offsets == static_cast<size_t>(-1) || offsets == count, "bayeskern_cpp: ", op, ": one offset per tensor");
  for (size_t i = 0; i < count; ++i) {
    const at::Tensor& p = first[i];
    const auto like = [&](const at::Tensor& t, at::ScalarType dtype) {
      TORCH_CHECK(t.is_contiguous() && t.scalar_type() == dtype && t.numel() == p.numel() && t.device() == p.device(),
                  "bayeskern_cpp: ", op, " needs contiguous tensors of matching dtype, device and size");
    };
    like(p, first[0].scalar_type());
    for (at::TensorList list : same) like(list[i], p.scalar_type());
    for (at::TensorList list : sums) like(list[i], at::kFloat);
    if (!optional.empty()) like(optional[i], p.scalar_type());
  }
}

}  // namespace bayeskern
