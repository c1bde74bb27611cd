// Shared by the int8-activation matmuls (cpu_q8dot.cc: weights row by row; cpu_q8panel.cc:
// weights in 16-row panels): quantizing activations per 32, the integer dots of unsigned weight
// bytes with signed activation bytes, and multiply-adds fused where the build has FMA.
#pragma once

#include <cmath>

#include "cpu_fields.h"

namespace vllm_jax {

typedef int8_t i8x32 __attribute__((vector_size(32)));

// acc lane i + the dot of bytes 4i..4i+3 of w (unsigned, <= kMax) and x (signed, -127..127)
template <int kMax>
inline i32x8 dot(i32x8 acc, u8x32 w, i8x32 x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return (i32x8)_mm256_dpbusd_epi32((__m256i)acc, (__m256i)w, (__m256i)x);
#elif defined(__AVXVNNI__)
  return (i32x8)_mm256_dpbusd_avx_epi32((__m256i)acc, (__m256i)w, (__m256i)x);
#elif defined(__AVX2__)
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (2 * kMax * 127 <= 32767) {  // vpmaddubsw's int16 pair sums cannot saturate
    return acc + (i32x8)_mm256_madd_epi16(_mm256_maddubs_epi16((__m256i)w, (__m256i)x), ones);
  } else {  // bytes up to 255: u = 2 * (u >> 1) + (u & 1), each part's pair sums fit int16
    const u8x32 half = w >> 1, odd = w & 1;
    const __m256i a = _mm256_madd_epi16(_mm256_maddubs_epi16((__m256i)half, (__m256i)x),
                                        _mm256_set1_epi16(2));
    const __m256i b = _mm256_madd_epi16(_mm256_maddubs_epi16((__m256i)odd, (__m256i)x), ones);
    return acc + (i32x8)a + (i32x8)b;
  }
#else
  for (int i = 0; i < 8; ++i)
    for (int k = 0; k < 4; ++k) acc[i] += int32_t(w[4 * i + k]) * int32_t(x[4 * i + k]);
  return acc;
#endif
}

// 32 floats -> q, and returns d; s[0], s[1]: the integer sums of q over each 16
inline float quantize_block(const float* x, int8_t* q, int32_t* s) {
  float amax = 0.f;
  for (int i = 0; i < 32; i += 8) {
    const f8 v = load<f8>(x + i);
    for (int k = 0; k < 8; ++k) amax = std::max(amax, std::fabs(v[k]));
  }
  const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
#if defined(__AVX2__)
  __m256i r[4];
  for (int g = 0; g < 4; ++g)  // round to nearest even, as np.rint
    r[g] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8 * g), _mm256_set1_ps(id)));
  s[0] = int32_t(hsum(to_f8((i32x8)r[0] + (i32x8)r[1])));
  s[1] = int32_t(hsum(to_f8((i32x8)r[2] + (i32x8)r[3])));
  const __m256i w =
      _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3]));
  // the packs interleave 128-bit lanes: dwords 0 4 1 5 2 6 3 7 -> 0..7
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                      _mm256_permutevar8x32_epi32(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
#else
  s[0] = s[1] = 0;
  for (int i = 0; i < 32; ++i) {
    q[i] = int8_t(std::nearbyint(x[i] * id));
    s[i / 16] += q[i];
  }
#endif
  return d;
}

inline float madd(float a, float b, float c) {  // a * b + c
#if defined(__FMA__)
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}
inline f8 madd(f8 a, f8 b, f8 c) {
#if defined(__FMA__)
  return (f8)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}
#if defined(VLLM_JAX_AVX512)
inline f32x16 madd(f32x16 a, f32x16 b, f32x16 c) {
  return (f32x16)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
}
#endif

}  // namespace vllm_jax
