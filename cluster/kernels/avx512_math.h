// Vector math the AVX-512 kernels share (float32, 16 lanes): exponentials for online softmax and a
// register transpose. Include where the build targets AVX-512 (F, BW, DQ), after <immintrin.h>.
#pragma once
#include <immintrin.h>

#include <cstdint>

// 2^x for x <= 0: 2^n * 2^f with f in [-0.5, 0.5], 2^f by a degree-6 polynomial (relative error
// ~1e-7, below bfloat16's resolution). Very negative arguments (a masked score's -1e30) give 0.
static inline __m512 exp2_nonpositive(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(x, n), _mm512_set1_ps(0.69314718055994531f));
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// 2^x for x <= 0 to a relative 2.7e-6 (a near-minimax degree-4 polynomial on [-0.5, 0.5]): what
// probabilities rounded to bfloat16 next (a relative 2^-9) need, in 7 instructions where
// exp2_nonpositive takes 11. A masked score's -1e30 still gives 0.
static inline __m512 exp2_nonpositive_bf16(__m512 x) {
  const __m512 f = _mm512_reduce_ps(x, 0);  // x - round(x), in [-0.5, 0.5]
  const __m512 n = _mm512_sub_ps(x, f);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.009570068679749966f), f, _mm512_set1_ps(0.055917806923389435f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.240247443318367f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931218504905701f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.9999992847442627f));
  return _mm512_scalef_ps(p, n);
}

// Transposes a 16 x 16 matrix of 32-bit elements held as 16 row vectors, in place: four butterfly
// levels, each swapping one bit of the row index with the same bit of the column index (16
// two-source permutes a level).
static inline void transpose16x16(__m512i (&r)[16]) {
  alignas(64) static const int32_t kIndex[4][2][16] = {
#define LLM_LO(b, c) (((c) & (b)) ? (16 | ((c) - (b))) : (c))
#define LLM_HI(b, c) (((c) & (b)) ? (16 | (c)) : ((c) + (b)))
#define LLM_ROW(F, b) {F(b, 0), F(b, 1), F(b, 2), F(b, 3), F(b, 4), F(b, 5), F(b, 6), F(b, 7), F(b, 8), F(b, 9), \
                       F(b, 10), F(b, 11), F(b, 12), F(b, 13), F(b, 14), F(b, 15)}
      {LLM_ROW(LLM_LO, 8), LLM_ROW(LLM_HI, 8)}, {LLM_ROW(LLM_LO, 4), LLM_ROW(LLM_HI, 4)},
      {LLM_ROW(LLM_LO, 2), LLM_ROW(LLM_HI, 2)}, {LLM_ROW(LLM_LO, 1), LLM_ROW(LLM_HI, 1)},
#undef LLM_ROW
#undef LLM_HI
#undef LLM_LO
  };
#pragma GCC unroll 4
  for (int level = 0; level < 4; ++level) {
    const int b = 8 >> level;
    const __m512i lo = _mm512_load_si512(kIndex[level][0]), hi = _mm512_load_si512(kIndex[level][1]);
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) {
      if (i & b) continue;
      const __m512i a = r[i], c = r[i + b];
      r[i] = _mm512_permutex2var_epi32(a, lo, c);
      r[i + b] = _mm512_permutex2var_epi32(a, hi, c);
    }
  }
}
