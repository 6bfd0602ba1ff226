// Host-side pieces every kernel file shares, CPU and CUDA alike: the dtypes the kernels serve and
// the argument checks of the multi-tensor SGLD update.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

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

}  // namespace bayeskern
