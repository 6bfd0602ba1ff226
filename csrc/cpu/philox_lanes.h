// Philox noise in SIMD lanes for the CPU kernels, shared by noise_kernels.cpp and sgld_kernels.cpp:
// one step makes the noise of 16 consecutive Philox blocks = 64 consecutive global indices, written
// in global-index order to a float buffer.  Also the dtypes every CPU kernel serves.
#pragma once

#include "cpu/simd.h"  // the vector lane overloads must precede philox.h's templates
#include "philox.h"

#include "kernel_args.h"

namespace bayeskern {

#if defined(__AVX512F__)
// Philox 4x32-10 on 16 lanes as two halves of 8 lanes widened to 64 bits: one vpmuludq then gives
// a whole 32x32->64 product (hi = product >> 32, lo = its low word), where 32-bit lanes take two
// multiplies for the even and odd lanes' high words, a third for the low words and a blend.  The high
// words of lo are left as they are: the multiplies read only low words, the xors keep garbage in the
// high words only, and the narrowing at the end drops them.  Same words as philox.h's template.
inline void philox4x32_10(cpu::u32v& c0, cpu::u32v& c1, cpu::u32v& c2, cpu::u32v& c3, uint32_t k0, uint32_t k1) {
  cpu::u32v* words[4] = {&c0, &c1, &c2, &c3};
  __m512i x[2][4];  // [half][word]
  for (int j = 0; j < 4; ++j) {
    const __m512i w = reinterpret_cast<__m512i>(*words[j]);
    x[0][j] = _mm512_cvtepu32_epi64(_mm512_castsi512_si256(w));
    x[1][j] = _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(w, 1));
  }
  const __m512i round_a = _mm512_set1_epi64(kPhiloxRoundA);
  const __m512i round_b = _mm512_set1_epi64(kPhiloxRoundB);
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {
    const __m512i key0 = _mm512_set1_epi64(k0);
    const __m512i key1 = _mm512_set1_epi64(k1);
    for (int h = 0; h < 2; ++h) {
      const __m512i product_b = _mm512_mul_epu32(round_b, x[h][2]);
      const __m512i product_a = _mm512_mul_epu32(round_a, x[h][0]);
      x[h][0] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(product_b, 32), x[h][1], key0, 0x96);  // a ^ b ^ c
      x[h][1] = product_b;
      x[h][2] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(product_a, 32), x[h][3], key1, 0x96);
      x[h][3] = product_a;
    }
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  for (int j = 0; j < 4; ++j) {
    const __m512i w =
        _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(x[0][j])), _mm512_cvtepi64_epi32(x[1][j]), 1);
    *words[j] = reinterpret_cast<cpu::u32v>(w);
  }
}
#endif

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
    interleave(uniform_from_word<f32v, u32v>(w0), uniform_from_word<f32v, u32v>(w1), uniform_from_word<f32v, u32v>(w2),
               uniform_from_word<f32v, u32v>(w3), out);
  }
};

}  // namespace cpu
}  // namespace bayeskern
