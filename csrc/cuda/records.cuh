// The record lookup of the multi-tensor CUDA kernels: the host packs one record per tensor, each with
// the index of its first Philox block in a flat index over all tensors (`first_block`); a thread finds
// the tensor of its block by binary search.
#pragma once

#include <cstdint>

namespace bayeskern {
namespace cuda {

// The last record whose first_block <= block.
template <class Record>
__device__ int find_record(const Record* records, int count, uint64_t block) {
  int lo = 0, hi = count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (static_cast<uint64_t>(records[mid].first_block) <= block) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

}  // namespace cuda
}  // namespace bayeskern
