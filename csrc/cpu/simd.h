// SIMD lanes for the CPU kernels: GCC/Clang vector extensions of kLanes floats / uint32, which the
// compiler lowers to AVX-512, AVX2 or SSE depending on the target (-march=native at JIT time), plus
// the lane helpers philox.h expects.  The same templates in philox.h run on scalars in CUDA.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

namespace bayeskern {
namespace cpu {

constexpr int kLanes = 16;                  // Philox blocks per SIMD step
constexpr int kBlockElements = 4 * kLanes;  // elements per SIMD step

typedef float f32v __attribute__((vector_size(4 * kLanes)));
typedef uint32_t u32v __attribute__((vector_size(4 * kLanes)));
typedef int32_t i32v __attribute__((vector_size(4 * kLanes)));
typedef uint64_t u64v __attribute__((vector_size(8 * kLanes)));

inline f32v load(const float* p) {
  f32v v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store(float* p, f32v v) { std::memcpy(p, &v, sizeof(v)); }

}  // namespace cpu

inline cpu::f32v as_float(cpu::u32v x) { return reinterpret_cast<cpu::f32v>(x); }
inline cpu::u32v as_uint(cpu::f32v x) { return reinterpret_cast<cpu::u32v>(x); }
inline cpu::f32v to_float(cpu::u32v x) { return __builtin_convertvector(x, cpu::f32v); }
inline cpu::u32v to_uint(cpu::f32v x) { return __builtin_convertvector(x, cpu::u32v); }
inline cpu::f32v select(cpu::i32v m, cpu::f32v a, cpu::f32v b) { return m ? a : b; }
inline cpu::u32v select(cpu::i32v m, cpu::u32v a, cpu::u32v b) { return m ? a : b; }

inline cpu::f32v floor_lanes(cpu::f32v x) {
  // truncate, then step down where truncation rounded a negative value up
  const cpu::f32v t = __builtin_convertvector(__builtin_convertvector(x, cpu::i32v), cpu::f32v);
  return select(t > x, t - 1.0f, t);
}

inline cpu::f32v sqrt_lanes(cpu::f32v x) {
#if defined(__AVX512F__)
  return reinterpret_cast<cpu::f32v>(_mm512_sqrt_ps(reinterpret_cast<__m512>(x)));
#else
  cpu::f32v r;
  for (int i = 0; i < cpu::kLanes; ++i) r[i] = __builtin_sqrtf(x[i]);
  return r;
#endif
}

// Without AVX-512 (philox_lanes.h's philox4x32_10 serves AVX-512 builds without it).
inline void mulhilo(uint32_t a, cpu::u32v b, cpu::u32v& hi, cpu::u32v& lo) {
  const cpu::u64v p = __builtin_convertvector(b, cpu::u64v) * static_cast<uint64_t>(a);
  hi = __builtin_convertvector(p >> 32, cpu::u32v);
  lo = __builtin_convertvector(p, cpu::u32v);
}

#if defined(__AVX512F__)
// Philox's ten rounds on 16 lanes with 64-bit products (defined in philox_lanes.h, after philox.h's
// constants); declared here so that philox.h's templates call it for u32v lanes.
inline void philox4x32_10(cpu::u32v& c0, cpu::u32v& c1, cpu::u32v& c2, cpu::u32v& c3, uint32_t k0, uint32_t k1);
#endif

}  // namespace bayeskern
