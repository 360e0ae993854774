// Vector math the AVX2 kernels share (float32, 8 lanes). Include inside an
// ``#if defined(__AVX2__) && defined(__FMA__)`` block, after <immintrin.h>.
#pragma once
#include <immintrin.h>

// exp(x) for x <= 0: 2^n * 2^f with f in [-0.5, 0.5], 2^f by a degree-6 polynomial (relative error
// ~1e-7), 2^n built in the exponent bits. Arguments below -87 give exp(-87) (~1.6e-38), not 0.
static inline __m256 exp_nonpositive8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_mul_ps(_mm256_sub_ps(t, n), _mm256_set1_ps(0.69314718055994531f));
  __m256 p = _mm256_set1_ps(1.f / 720);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

// 2^x for x <= 0: 2^n * 2^f with f in [-0.5, 0.5], 2^f by a degree-6 polynomial (relative error
// ~1e-7, as exp_nonpositive8), 2^n added to the exponent bits. Arguments below -125 give 2^-125 (a
// normal float), not 0. Callers that keep scores in log2 units (scaled by log2(e) up front) take
// this: two multiplies and a multiply-by-2^n fewer than exp_nonpositive8.
static inline __m256 exp2_nonpositive8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-125.f));
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, n);
  __m256 p = _mm256_set1_ps(1.5403530393381608e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291076284772e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504108664821580e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.24022650695910071f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.69314718055994531f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  const __m256i shift = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), shift));
}

// silu(g) = g * sigmoid(g) with e = exp(-|g|) <= 1 (never overflows): sigmoid(g) = 1 / (1 + e) for
// g >= 0, e / (1 + e) for g < 0.
static inline __m256 silu8(__m256 g) {
  const __m256 e = exp_nonpositive8(_mm256_or_ps(g, _mm256_set1_ps(-0.f)));  // exp(-|g|)
  const __m256 negative = _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_LT_OQ);
  const __m256 num = _mm256_blendv_ps(_mm256_set1_ps(1.f), e, negative);
  return _mm256_mul_ps(g, _mm256_div_ps(num, _mm256_add_ps(_mm256_set1_ps(1.f), e)));
}

// The largest and the sum of the 8 lanes.
static inline float max8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}

static inline float sum8(__m256 v) {
  __m128 m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_add_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_add_ss(m, _mm_shuffle_ps(m, m, 1)));
}
