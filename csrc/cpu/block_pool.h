// Reused memory for the large tensors the fused draws return every training step (the drawn
// weights, the gradients of mu and rho).  glibc hands big freed blocks back to the kernel and the
// next step faults every page in again, zeroing each on first touch; these tensors have the same
// sizes every step, so their freed blocks are kept, by exact byte size, and handed out again.  The
// pool keeps at most BAYESKERN_CPU_POOL_MB MiB of freed blocks (default 1024; 0 turns it off),
// until release_cached_blocks() (bayeskern.ops.release_cached_memory) hands them back to the system.
#pragma once

#include <ATen/ATen.h>

namespace bayeskern {
namespace cpu {

// An uninitialised contiguous tensor shaped like t, its memory from the pool.
at::Tensor pooled_empty_like(const at::Tensor& t);

// Frees every cached block; returns the bytes freed.
int64_t release_cached_blocks();

}  // namespace cpu
}  // namespace bayeskern
