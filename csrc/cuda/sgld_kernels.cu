// CUDA kernel of the fused SGLD / pSGLD update (bayeskern/ops/sgld.py has the maths): ONE launch for
// every tensor of a parameter group, like torch's fused optimizers.  The host packs one record per
// tensor (pointers, size, Philox offset, first block in a flat index of Philox blocks) into a device
// array; a thread takes one Philox block (four consecutive elements of one tensor), grid-stride over
// the flat index, and finds its tensor by binary search.  Same scalar maths as the CPU lanes (philox.h),
// float32 compute for fp32/fp16/bf16.
#include "cuda/records.cuh"
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
#include <vector>

namespace bayeskern {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// One tensor of the group, as the kernel reads it (all fields 64-bit: the host packs an int64 array).
struct Record {
  int64_t theta, grad, mean, avg;  // addresses; mean / avg are 0 when absent
  int64_t n, offset, q_first, first_block;
};
static_assert(sizeof(Record) == 8 * sizeof(int64_t), "Record is packed as 8 int64 values");

using Hyper = SgldHyper;

template <class scalar_t>
__global__ void sgld_kernel(const Record* records, int count, uint64_t total_blocks, Hyper h) {
  const bool noise = h.noise_scale != 0.0f;
  for (uint64_t b = blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x; b < total_blocks;
       b += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
    const Record r = records[find_record(records, count, b)];
    const uint64_t q = static_cast<uint64_t>(r.q_first) + (b - static_cast<uint64_t>(r.first_block));
    float xi[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (noise) {
      uint32_t w0, w1, w2, w3;
      philox_block(static_cast<uint32_t>(q), static_cast<uint32_t>(q >> 32), h.seed, h.stream, w0, w1, w2, w3);
      normals_from_block<float, uint32_t>(w0, w1, w2, w3, xi[0], xi[1], xi[2], xi[3]);
    }
    scalar_t* theta = reinterpret_cast<scalar_t*>(r.theta);
    const scalar_t* grad = reinterpret_cast<const scalar_t*>(r.grad);
    const scalar_t* mean = reinterpret_cast<const scalar_t*>(r.mean);
    scalar_t* avg = reinterpret_cast<scalar_t*>(r.avg);
    const int64_t base = static_cast<int64_t>(4 * q) - r.offset;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t j = base + k;
      if (j < 0 || j >= r.n) continue;
      float t = static_cast<float>(theta[j]);
      const float diff = mean ? t - static_cast<float>(mean[j]) : t;
      const float g_tot = static_cast<float>(grad[j]) + h.prior_precision * diff;
      float scale = h.noise_scale;
      if (avg) {
        const float v = h.alpha * static_cast<float>(avg[j]) + (1.0f - h.alpha) * (g_tot * g_tot);
        const float precond = __frcp_rn(h.eps + __fsqrt_rn(v));
        t = t - h.lr * (precond * g_tot);
        scale = scale * __fsqrt_rn(precond);
        avg[j] = static_cast<scalar_t>(v);
      } else {
        t = t - h.lr * g_tot;
      }
      if (noise) t = t + scale * xi[k];
      theta[j] = static_cast<scalar_t>(t);
    }
  }
}

void sgld_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList prior_means, at::TensorList square_avgs,
                    double lr, double prior_precision, double noise_scale, double alpha, double eps, int64_t seed,
                    int64_t step, at::IntArrayRef offsets) {
  check_sgld_lists(params, grads, prior_means, square_avgs, offsets);
  const size_t count = params.size();
  if (count == 0) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const Hyper h = sgld_hyper(lr, prior_precision, noise_scale, alpha, eps, seed, step);
  std::vector<Record> records;
  int64_t total_blocks = 0;
  for (size_t i = 0; i < count; ++i) {
    const at::Tensor& p = params[i];
    const int64_t n = p.numel();
    if (n == 0) continue;
    check_sgld_tensors(i, params, grads, prior_means, square_avgs);
    const auto address = [](const at::Tensor& t) { return reinterpret_cast<int64_t>(t.data_ptr()); };
    const int64_t q_first = offsets[i] / 4;
    const int64_t q_last = (offsets[i] + n - 1) / 4;
    records.push_back({address(p), address(grads[i]), prior_means.empty() ? 0 : address(prior_means[i]),
                       square_avgs.empty() ? 0 : address(square_avgs[i]), n, offsets[i], q_first, total_blocks});
    total_blocks += q_last - q_first + 1;
  }
  if (total_blocks == 0) return;
  // the records travel as one small int64 tensor, copied on the current stream before the launch
  auto host = at::from_blob(records.data(), {static_cast<int64_t>(records.size()), 8}, at::kLong);
  auto device_records = host.to(params[0].device(), /*non_blocking=*/false, /*copy=*/true);
  int device = 0, sm_count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  const uint64_t max_grid = static_cast<uint64_t>(sm_count) * 32;
  const int grid = static_cast<int>(std::min<uint64_t>((total_blocks + kThreads - 1) / kThreads, max_grid));
  BK_DISPATCH_KERNEL_TYPES(params[0].scalar_type(), "sgld_step_cuda", [&] {
    sgld_kernel<scalar_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const Record*>(device_records.const_data_ptr<int64_t>()), static_cast<int>(records.size()),
        static_cast<uint64_t>(total_blocks), h);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(bayeskern_cpp, CUDA, m) { m.impl("sgld_step_", &cuda::sgld_step_cuda); }

}  // namespace bayeskern
