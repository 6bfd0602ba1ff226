// CUDA kernels of IVON's three fused ops (bayeskern/ops/ivon.py has the maths): the draw of a posterior
// sample, the collection of a sample's gradients and the update, each ONE launch for every tensor of a
// list.  As in sgld_kernels.cu the host packs one record per tensor (pointers, size, Philox offset,
// first block in a flat index of Philox blocks) into a device array; a thread takes one Philox block
// (four consecutive elements of one tensor), grid-stride over the flat index, and finds its tensor by
// binary search.  One kernel serves the three ops through a functor per op.  float32 compute for
// fp32/fp16/bf16 with rounded intrinsics (no FMA contraction), in the reference's operation order.
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
#include <initializer_list>
#include <vector>

namespace bayeskern {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr size_t kSlots = 6;  // the most lists an op passes (ivon_update_)

// One tensor of the lists, as the kernel reads it (all fields 64-bit: the host packs an int64 array).
struct Record {
  int64_t ptr[kSlots];  // tensor i of each list, in the op's order; 0 for an absent (empty) list
  int64_t n, offset, q_first, first_block;
};
constexpr int64_t kRecordWords = sizeof(Record) / sizeof(int64_t);
static_assert(sizeof(Record) == (kSlots + 4) * sizeof(int64_t), "Record is packed as int64 values");

template <class T>
__device__ __forceinline__ T* slot(const Record& r, int s) {
  return reinterpret_cast<T*>(r.ptr[s]);
}

// Slots: params, means, hesses.
struct Draw {
  static constexpr const char* kName = "ivon_draw_cuda";
  static constexpr bool kNoise = true;
  float ess, delta;
  template <class scalar_t>
  __device__ void apply(const Record& r, int64_t j, float eps) const {
    scalar_t* theta = slot<scalar_t>(r, 0);
    const scalar_t p = theta[j];
    slot<scalar_t>(r, 1)[j] = p;
    const float h = static_cast<float>(slot<const scalar_t>(r, 2)[j]);
    const float sigma = __frcp_rn(__fsqrt_rn(__fmul_rn(__fadd_rn(h, delta), ess)));
    theta[j] = static_cast<scalar_t>(__fadd_rn(static_cast<float>(p), __fmul_rn(sigma, eps)));
  }
};

// Slots: grads, grad_sums, grad_eps_sums (float32).
struct Collect {
  static constexpr const char* kName = "ivon_collect_cuda";
  static constexpr bool kNoise = true;
  bool accumulate;
  template <class scalar_t>
  __device__ void apply(const Record& r, int64_t j, float eps) const {
    const float g = static_cast<float>(slot<const scalar_t>(r, 0)[j]);
    float* sum = slot<float>(r, 1);
    float* eps_sum = slot<float>(r, 2);
    const float g_eps = __fmul_rn(g, eps);
    sum[j] = accumulate ? __fadd_rn(sum[j], g) : g;
    eps_sum[j] = accumulate ? __fadd_rn(eps_sum[j], g_eps) : g_eps;
  }
};

// Slots: params, momenta, hesses, grad_sums, grad_eps_sums (float32), prior_means (may be absent).
struct Update {
  static constexpr const char* kName = "ivon_update_cuda";
  static constexpr bool kNoise = false;
  IvonHyper hp;
  template <class scalar_t>
  __device__ void apply(const Record& r, int64_t j, float) const {
    scalar_t* theta = slot<scalar_t>(r, 0);
    scalar_t* momentum = slot<scalar_t>(r, 1);
    scalar_t* hess = slot<scalar_t>(r, 2);
    const scalar_t* prior_mean = slot<const scalar_t>(r, 5);
    const float h = static_cast<float>(hess[j]);
    const float g = __fmul_rn(slot<const float>(r, 3)[j], hp.scale);
    const float h_delta = __fadd_rn(h, hp.delta);
    const float h_hat =
        __fmul_rn(__fmul_rn(slot<const float>(r, 4)[j], hp.scale), __fsqrt_rn(__fmul_rn(h_delta, hp.ess)));
    const float g_bar =
        __fadd_rn(__fmul_rn(static_cast<float>(momentum[j]), hp.beta1), __fmul_rn(g, hp.one_minus_beta1));
    const float gap = __fsub_rn(h, h_hat);
    const float h_new = __fadd_rn(__fadd_rn(__fmul_rn(h, hp.beta2), __fmul_rn(h_hat, hp.one_minus_beta2)),
                                  __fdiv_rn(__fmul_rn(__fmul_rn(gap, gap), hp.gap_weight), h_delta));
    const float m = static_cast<float>(theta[j]);
    const float offset = prior_mean ? __fsub_rn(m, static_cast<float>(prior_mean[j])) : m;
    float direction = __fdiv_rn(__fadd_rn(__fdiv_rn(g_bar, hp.bias_correction), __fmul_rn(hp.delta, offset)),
                                __fadd_rn(h_new, hp.delta));
    // torch.clamp: a NaN direction stays NaN
    direction = direction < -hp.clip_radius ? -hp.clip_radius : direction;
    direction = direction > hp.clip_radius ? hp.clip_radius : direction;
    theta[j] = static_cast<scalar_t>(__fsub_rn(m, __fmul_rn(hp.lr, direction)));
    momentum[j] = static_cast<scalar_t>(g_bar);
    hess[j] = static_cast<scalar_t>(h_new);
  }
};

template <class scalar_t, class Op>
__global__ void ivon_kernel(const Record* records, int count, uint64_t total_blocks, uint64_t seed, uint64_t stream,
                            Op op) {
  for (uint64_t b = blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x; b < total_blocks;
       b += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
    const Record r = records[find_record(records, count, b)];
    const uint64_t q = static_cast<uint64_t>(r.q_first) + (b - static_cast<uint64_t>(r.first_block));
    float eps[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if constexpr (Op::kNoise) {
      uint32_t w0, w1, w2, w3;
      philox_block(static_cast<uint32_t>(q), static_cast<uint32_t>(q >> 32), seed, stream, w0, w1, w2, w3);
      normals_from_block<float, uint32_t>(w0, w1, w2, w3, eps[0], eps[1], eps[2], eps[3]);
    }
    const int64_t base = static_cast<int64_t>(4 * q) - r.offset;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t j = base + k;
      if (j < 0 || j >= r.n) continue;
      op.template apply<scalar_t>(r, j, eps[k]);
    }
  }
}

// `op` over every element of tensor i of `lists` (lists[0] gives sizes, dtype and device; an empty
// list is absent), element j of tensor i taking the Philox noise of index offsets[i] + j (offsets
// empty: no noise, every offset 0).  The lists are checked by the caller.
template <class Op>
void launch(std::initializer_list<at::TensorList> lists, at::IntArrayRef offsets, int64_t seed, int64_t stream,
            const Op& op) {
  const at::TensorList first = *lists.begin();
  if (first.empty()) return;
  const at::Device device = first[0].device();
  const c10::cuda::CUDAGuard guard(device);
  std::vector<Record> records;
  int64_t total_blocks = 0;
  for (size_t i = 0; i < first.size(); ++i) {
    const int64_t n = first[i].numel();
    if (n == 0) continue;
    TORCH_CHECK(first[i].device() == device, "bayeskern_cpp: ", Op::kName, " needs every tensor on one device");
    Record r{};
    size_t s = 0;
    for (at::TensorList list : lists) r.ptr[s++] = list.empty() ? 0 : reinterpret_cast<int64_t>(list[i].data_ptr());
    r.n = n;
    r.offset = offsets.empty() ? 0 : offsets[i];
    r.q_first = r.offset / 4;
    r.first_block = total_blocks;
    records.push_back(r);
    total_blocks += (r.offset + n - 1) / 4 - r.q_first + 1;
  }
  if (total_blocks == 0) return;
  // the records travel as one small int64 tensor, copied on the current stream before the launch
  auto host = at::from_blob(records.data(), {static_cast<int64_t>(records.size()), kRecordWords}, at::kLong);
  auto device_records = host.to(device, /*non_blocking=*/false, /*copy=*/true);
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device.index()));
  const uint64_t max_grid = static_cast<uint64_t>(sm_count) * 32;
  const int grid = static_cast<int>(std::min<uint64_t>((total_blocks + kThreads - 1) / kThreads, max_grid));
  BK_DISPATCH_KERNEL_TYPES(first[0].scalar_type(), Op::kName, [&] {
    ivon_kernel<scalar_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const Record*>(device_records.const_data_ptr<int64_t>()), static_cast<int>(records.size()),
        static_cast<uint64_t>(total_blocks), static_cast<uint64_t>(seed), static_cast<uint64_t>(stream), op);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void ivon_draw_cuda(at::TensorList params, at::TensorList means, at::TensorList hesses, double ess, double delta,
                    int64_t seed, int64_t stream, at::IntArrayRef offsets) {
  check_ivon_lists("ivon_draw_", params, {means, hesses}, {}, {}, offsets.size());
  launch({params, means, hesses}, offsets, seed, stream, Draw{static_cast<float>(ess), static_cast<float>(delta)});
}

void ivon_collect_cuda(at::TensorList grads, at::TensorList grad_sums, at::TensorList grad_eps_sums, bool accumulate,
                       int64_t seed, int64_t stream, at::IntArrayRef offsets) {
  check_ivon_lists("ivon_collect_", grads, {}, {grad_sums, grad_eps_sums}, {}, offsets.size());
  launch({grads, grad_sums, grad_eps_sums}, offsets, seed, stream, Collect{accumulate});
}

void ivon_update_cuda(at::TensorList params, at::TensorList momenta, at::TensorList hesses, at::TensorList grad_sums,
                      at::TensorList grad_eps_sums, at::TensorList prior_means, double lr, double ess, double delta,
                      double beta1, double beta2, double bias_correction, double clip_radius, double scale) {
  check_ivon_lists("ivon_update_", params, {momenta, hesses}, {grad_sums, grad_eps_sums}, prior_means);
  launch({params, momenta, hesses, grad_sums, grad_eps_sums, prior_means}, {}, 0, 0,
         Update{ivon_hyper(lr, ess, delta, beta1, beta2, bias_correction, clip_radius, scale)});
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(bayeskern_cpp, CUDA, m) {
  m.impl("ivon_draw_", &cuda::ivon_draw_cuda);
  m.impl("ivon_collect_", &cuda::ivon_collect_cuda);
  m.impl("ivon_update_", &cuda::ivon_update_cuda);
}

}  // namespace bayeskern
