// CUDA kernels of the noise ops: one thread per Philox block (four consecutive elements), grid-stride,
// the same scalar maths as the CPU lanes (philox.h), float32 compute for fp32/fp16/bf16.
#include "kernel_args.h"
#include "philox.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>

namespace bayeskern {
namespace cuda {
namespace {

constexpr int kThreads = 256;

struct NormalNoise {
  __device__ void operator()(uint32_t w0, uint32_t w1, uint32_t w2, uint32_t w3, float* out) const {
    normals_from_block<float, uint32_t>(w0, w1, w2, w3, out[0], out[1], out[2], out[3]);
  }
};

struct UniformNoise {
  __device__ void operator()(uint32_t w0, uint32_t w1, uint32_t w2, uint32_t w3, float* out) const {
    out[0] = uniform_from_word<float, uint32_t>(w0);
    out[1] = uniform_from_word<float, uint32_t>(w1);
    out[2] = uniform_from_word<float, uint32_t>(w2);
    out[3] = uniform_from_word<float, uint32_t>(w3);
  }
};

// out[j] = math(noise_j, a[j], b[j]) for n elements placed at `offset`; a and b may be null.
template <class scalar_t, class Noise, class Math>
__global__ void fused_elementwise_kernel(const scalar_t* a, const scalar_t* b, scalar_t* out, int64_t n, uint64_t seed,
                                         uint64_t offset, uint64_t stream, uint64_t q_first, uint64_t blocks,
                                         Noise noise, Math math) {
  for (uint64_t t = blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x; t < blocks;
       t += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
    const uint64_t q = q_first + t;
    uint32_t w0, w1, w2, w3;
    philox_block(static_cast<uint32_t>(q), static_cast<uint32_t>(q >> 32), seed, stream, w0, w1, w2, w3);
    float values[4];
    noise(w0, w1, w2, w3, values);
    const int64_t base = static_cast<int64_t>(4 * q) - static_cast<int64_t>(offset);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t j = base + k;
      if (j < 0 || j >= n) continue;
      const float x = a ? static_cast<float>(a[j]) : 0.0f;
      const float y = b ? static_cast<float>(b[j]) : 0.0f;
      out[j] = static_cast<scalar_t>(math(values[k], x, y));
    }
  }
}

template <class scalar_t, class Noise, class Math>
void launch(const scalar_t* a, const scalar_t* b, scalar_t* out, int64_t n, int64_t seed, int64_t offset,
            int64_t stream, Noise noise, Math math) {
  if (n == 0) return;
  const uint64_t q_first = static_cast<uint64_t>(offset) / 4;
  const uint64_t blocks = (static_cast<uint64_t>(offset + n - 1) / 4) - q_first + 1;
  int device = 0, sm_count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  const uint64_t max_grid = static_cast<uint64_t>(sm_count) * 32;
  const int grid = static_cast<int>(std::min<uint64_t>((blocks + kThreads - 1) / kThreads, max_grid));
  fused_elementwise_kernel<<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(a, b, out, n, seed, offset, stream,
                                                                                     q_first, blocks, noise, math);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

struct SampleMath {
  __device__ float operator()(float eps, float mu, float rho) const {
    return mu + softplus<float, uint32_t>(rho) * eps;
  }
};
struct SampleGradMath {
  __device__ float operator()(float eps, float grad, float rho) const {
    return grad * eps * sigmoid<float, uint32_t>(rho);
  }
};
struct DropoutMath {
  float p, scale;
  __device__ float operator()(float u, float w, float fill) const { return u >= p ? w * scale : fill; }
};
struct IdentityMath {
  __device__ float operator()(float noise, float, float) const { return noise; }
};

at::Tensor gaussian_sample_cuda(const at::Tensor& mu, const at::Tensor& rho, int64_t seed, int64_t offset,
                                int64_t stream) {
  const c10::cuda::CUDAGuard guard(mu.device());
  auto out = at::empty_like(mu);
  BK_DISPATCH_KERNEL_TYPES(mu.scalar_type(), "gaussian_sample_cuda", [&] {
    launch(mu.const_data_ptr<scalar_t>(), rho.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), mu.numel(),
           seed, offset, stream, NormalNoise{}, SampleMath{});
  });
  return out;
}

at::Tensor gaussian_sample_backward_cuda(const at::Tensor& grad, const at::Tensor& rho, int64_t seed, int64_t offset,
                                         int64_t stream) {
  const c10::cuda::CUDAGuard guard(rho.device());
  auto grad_rho = at::empty_like(rho);
  BK_DISPATCH_KERNEL_TYPES(rho.scalar_type(), "gaussian_sample_backward_cuda", [&] {
    launch(grad.const_data_ptr<scalar_t>(), rho.const_data_ptr<scalar_t>(), grad_rho.mutable_data_ptr<scalar_t>(),
           rho.numel(), seed, offset, stream, NormalNoise{}, SampleGradMath{});
  });
  return grad_rho;
}

at::Tensor weight_dropout_cuda(const at::Tensor& w, double p, int64_t seed, int64_t offset, int64_t stream,
                               const std::optional<at::Tensor>& fill) {
  const c10::cuda::CUDAGuard guard(w.device());
  auto out = at::empty_like(w);
  const float p32 = static_cast<float>(p);
  const DropoutMath math{p32, fill.has_value() ? 1.0f : 1.0f / (1.0f - p32)};
  BK_DISPATCH_KERNEL_TYPES(w.scalar_type(), "weight_dropout_cuda", [&] {
    const scalar_t* fill_ptr = fill.has_value() ? fill->const_data_ptr<scalar_t>() : nullptr;
    launch(w.const_data_ptr<scalar_t>(), fill_ptr, out.mutable_data_ptr<scalar_t>(), w.numel(), seed, offset, stream,
           UniformNoise{}, math);
  });
  return out;
}

at::Tensor weight_dropout_backward_cuda(const at::Tensor& grad, double p, int64_t seed, int64_t offset, int64_t stream,
                                        double scale) {
  const c10::cuda::CUDAGuard guard(grad.device());
  auto grad_w = at::empty_like(grad);
  const DropoutMath math{static_cast<float>(p), static_cast<float>(scale)};
  BK_DISPATCH_KERNEL_TYPES(grad.scalar_type(), "weight_dropout_backward_cuda", [&] {
    launch(grad.const_data_ptr<scalar_t>(), static_cast<const scalar_t*>(nullptr), grad_w.mutable_data_ptr<scalar_t>(),
           grad.numel(), seed, offset, stream, UniformNoise{}, math);
  });
  return grad_w;
}

at::Tensor& fill_normal_cuda(at::Tensor& out, int64_t seed, int64_t offset, int64_t stream) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous(), "fill_normal_ needs a contiguous float32 tensor");
  const c10::cuda::CUDAGuard guard(out.device());
  launch(static_cast<const float*>(nullptr), static_cast<const float*>(nullptr), out.mutable_data_ptr<float>(),
         out.numel(), seed, offset, stream, NormalNoise{}, IdentityMath{});
  return out;
}

at::Tensor& fill_uniform_cuda(at::Tensor& out, int64_t seed, int64_t offset, int64_t stream) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous(),
              "fill_uniform_ needs a contiguous float32 tensor");
  const c10::cuda::CUDAGuard guard(out.device());
  launch(static_cast<const float*>(nullptr), static_cast<const float*>(nullptr), out.mutable_data_ptr<float>(),
         out.numel(), seed, offset, stream, UniformNoise{}, IdentityMath{});
  return out;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(bayeskern_cpp, CUDA, m) {
  m.impl("gaussian_sample", &cuda::gaussian_sample_cuda);
  m.impl("gaussian_sample_backward", &cuda::gaussian_sample_backward_cuda);
  m.impl("weight_dropout", &cuda::weight_dropout_cuda);
  m.impl("weight_dropout_backward", &cuda::weight_dropout_backward_cuda);
  m.impl("fill_normal_", &cuda::fill_normal_cuda);
  m.impl("fill_uniform_", &cuda::fill_uniform_cuda);
}

}  // namespace bayeskern
