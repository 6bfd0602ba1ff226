// The work list of the multi-tensor CPU kernels: one flat list of SIMD steps (16 Philox blocks = 64
// consecutive global indices of one tensor) over every tensor of a list, cut into fixed chunks that
// at::parallel_for spreads over threads, so many small tensors balance like one large one.  The
// chunks do not depend on the thread count, so sums taken per chunk and added in chunk order give
// the same value on any number of threads.
#pragma once

#include "cpu/simd.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace bayeskern {
namespace cpu {

// One SIMD step: Philox blocks q0 .. q0 + 15 cover the tensor's elements base + lo .. base + hi - 1
// (base may be negative; lo/hi clip the step to the tensor).
struct Step {
  size_t tensor;  // index in the caller's list
  uint64_t q0;
  int64_t base, lo, hi;
};

class StepPlan {
 public:
  static constexpr int64_t kChunkSteps = 256;  // steps per parallel chunk (16K elements)

  // Appends tensor `index` of n elements placed at Philox element `offset` (empty tensors take no steps).
  void add(size_t index, int64_t n, uint64_t offset) {
    if (n == 0) return;
    const uint64_t q_first = offset / 4;
    const uint64_t q_last = (offset + static_cast<uint64_t>(n) - 1) / 4;
    tensors_.push_back({index, n, offset, q_first, total_steps_});
    total_steps_ += static_cast<int64_t>((q_last - q_first) / kLanes + 1);
  }

  int64_t chunks() const { return (total_steps_ + kChunkSteps - 1) / kChunkSteps; }

  // Calls body(chunk, step) for every step, chunk by chunk in parallel, steps of a chunk in order.
  template <class Body>
  void run(Body body) const {
    at::parallel_for(0, chunks(), 1, [&](int64_t chunk_begin, int64_t chunk_end) {
      for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
        const int64_t begin = chunk * kChunkSteps;
        const int64_t end = std::min(total_steps_, begin + kChunkSteps);
        // the tensor holding step `begin`: the last one starting at or before it
        auto it = std::upper_bound(tensors_.begin(), tensors_.end(), begin,
                                   [](int64_t s, const Entry& e) { return s < e.first_step; }) -
                  1;
        for (int64_t flat = begin; flat < end; ++flat) {
          while (it + 1 != tensors_.end() && (it + 1)->first_step <= flat) ++it;
          const uint64_t q0 = it->q_first + static_cast<uint64_t>(flat - it->first_step) * kLanes;
          const int64_t base = static_cast<int64_t>(4 * q0) - static_cast<int64_t>(it->offset);
          body(chunk,
               Step{it->index, q0, base, std::max<int64_t>(0, -base), std::min<int64_t>(kBlockElements, it->n - base)});
        }
      }
    });
  }

 private:
  struct Entry {
    size_t index;
    int64_t n;
    uint64_t offset, q_first;
    int64_t first_step;
  };
  std::vector<Entry> tensors_;
  int64_t total_steps_ = 0;
};

// Kernels see a step's elements as float32 lanes: in place when the tensor is float32 and the step
// lies wholly inside it, else staged in a float buffer (zeros outside the tensor).
inline bool in_place(const Step& s) { return s.lo == 0 && s.hi == kBlockElements; }

template <class scalar_t>
inline void stage(const scalar_t* src, const Step& s, float* buf) {
  if (!in_place(s)) std::fill(buf, buf + kBlockElements, 0.0f);
  for (int64_t i = s.lo; i < s.hi; ++i) buf[i] = static_cast<float>(src[s.base + i]);
}

// The step's elements of src, read-only.
template <class scalar_t>
inline const float* view(const scalar_t* src, const Step& s, float* buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (in_place(s)) return src + s.base;
  }
  stage(src, s, buf);
  return buf;
}

// Where a kernel writes the step's results: dst itself or buf (store_back then copies buf to dst).
template <class scalar_t>
inline float* target(scalar_t* dst, const Step& s, float* buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (in_place(s)) return dst + s.base;
  }
  return buf;
}

// The step's elements of data, to update in place (store_back after).
template <class scalar_t>
inline float* view_mut(scalar_t* data, const Step& s, float* buf) {
  float* p = target(data, s, buf);
  if (p == buf) stage(data, s, buf);
  return p;
}

// Asks the cache for data's elements kPrefetchSteps steps past this one.  A kernel that spends most of
// a step on Philox and reads two or more input streams leaves the hardware prefetcher behind, and its
// loads wait on memory (the fused MC-dropout backward, for one).  A hint only: an address past the
// tensor's end is never dereferenced.
constexpr int64_t kPrefetchSteps = 4;
template <class scalar_t>
inline void prefetch_ahead(const scalar_t* data, const Step& s) {
  if (data == nullptr) return;
  const uintptr_t ahead = reinterpret_cast<uintptr_t>(data) +
                          static_cast<uintptr_t>((s.base + kPrefetchSteps * kBlockElements) * sizeof(scalar_t));
  for (uintptr_t line = 0; line < kBlockElements * sizeof(scalar_t); line += 64) {
    __builtin_prefetch(reinterpret_cast<const void*>(ahead + line));
  }
}

template <class scalar_t>
inline void store_back(const float* result, const Step& s, scalar_t* dst) {
  if (static_cast<const void*>(result) == static_cast<const void*>(dst + s.base)) return;
  for (int64_t i = s.lo; i < s.hi; ++i) dst[s.base + i] = static_cast<scalar_t>(result[i]);
}

}  // namespace cpu
}  // namespace bayeskern
