// Philox noise in SIMD lanes for the CPU kernels, shared by noise_kernels.cpp and sgld_kernels.cpp:
// one step makes the noise of 16 consecutive Philox blocks = 64 consecutive global indices, written
// in global-index order to a float buffer.  Also the dtypes every CPU kernel serves.
#pragma once

#include "cpu/simd.h"  // the vector lane overloads must precede philox.h's templates
#include "philox.h"

#include "kernel_args.h"

namespace bayeskern {
namespace cpu {

// The four Philox words of blocks q0 .. q0 + 15 (lane i holds block q0 + i).
inline void philox_step(uint64_t seed, uint64_t stream, uint64_t q0, u32v& w0, u32v& w1, u32v& w2, u32v& w3) {
  const u32v iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const uint32_t lo0 = static_cast<uint32_t>(q0);
  const u32v q_lo = iota + lo0;
  const u32v carry = reinterpret_cast<u32v>(q_lo < lo0);  // all-ones where the low word wrapped
  const u32v q_hi = (u32v{} + static_cast<uint32_t>(q0 >> 32)) - carry;
  philox_block(q_lo, q_hi, seed, stream, w0, w1, w2, w3);
}

// Writes four lane vectors (lane i of vector k is block i, word k) in global-index order.
inline void interleave(const f32v& a, const f32v& b, const f32v& c, const f32v& d, float* out) {
  for (int i = 0; i < kLanes; ++i) {
    out[4 * i + 0] = a[i];
    out[4 * i + 1] = b[i];
    out[4 * i + 2] = c[i];
    out[4 * i + 3] = d[i];
  }
}

struct NormalNoise {
  void operator()(uint64_t seed, uint64_t stream, uint64_t q0, float* out) const {
    u32v w0, w1, w2, w3;
    philox_step(seed, stream, q0, w0, w1, w2, w3);
    f32v n0, n1, n2, n3;
    normals_from_block<f32v, u32v>(w0, w1, w2, w3, n0, n1, n2, n3);
    interleave(n0, n1, n2, n3, out);
  }
};

struct UniformNoise {
  void operator()(uint64_t seed, uint64_t stream, uint64_t q0, float* out) const {
    u32v w0, w1, w2, w3;
    philox_step(seed, stream, q0, w0, w1, w2, w3);
    interleave(uniform_from_word<f32v, u32v>(w0), uniform_from_word<f32v, u32v>(w1),
               uniform_from_word<f32v, u32v>(w2), uniform_from_word<f32v, u32v>(w3), out);
  }
};

}  // namespace cpu
}  // namespace bayeskern
