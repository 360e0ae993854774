// y = x W^T (+ b) for a few rows of float32 activations: decode-sized float32 linears on CPU.
//
// float32 is what runs on CPUs without native bfloat16 (AVX2 only: dtype "auto"). A decode step
// of a few sequences streams every weight once per token, and torch's float32 linear (MKL's
// GEMV) reads them at about half the machine's bandwidth there: 15 GB/s on a 2-core AMD EPYC
// that sums a buffer at 31 (docs/benchmarks.md). This loop reads the plain row-major weight in
// order, several output rows at a time with the rows ahead prefetched, with 8-wide FMAs
// (AVX2) into float32 sums, one per output, reduced at the end. The sums run in another order
// than MKL's, so outputs can differ from torch's in the last bits (as MKL's own differ between
// shapes). Rows are split over torch's intra-op threads.
//
// Built where the compiler targets AVX2 and FMA (-march=native); elsewhere has_gemv_f32() is
// false and the caller keeps torch's linear.
#include "aten_lite.h"

#include <algorithm>
#include <type_traits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

static inline float reduce8(__m256 v) {
  const __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pairs = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  return _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1)));
}

// R output rows by MC activation rows: R * MC accumulators (<= 12 of AVX2's 16 registers).
// ``prefetch``: the first pass over these weight rows asks for the rows after them; later passes
// (the next activation rows) find them in L1.
template <int R, int MC>
static void gemv_block(const float* x, const float* w, const float* bias, float* y, int64_t k_size, int64_t n_size,
                       int64_t n, bool prefetch) {
  const int64_t k_full = k_size / 8 * 8;
  __m256 acc[R][MC];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MC; ++m) acc[r][m] = _mm256_setzero_ps();
  for (int64_t k = 0; k < k_full; k += 8) {
    __m256 wv[R];
    for (int r = 0; r < R; ++r) {
      if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(w + (n + r + 2 * R) * k_size + k), _MM_HINT_T0);
      wv[r] = _mm256_loadu_ps(w + (n + r) * k_size + k);
    }
    for (int m = 0; m < MC; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * k_size + k);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm256_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int m = 0; m < MC; ++m) {
      float sum = reduce8(acc[r][m]);
      for (int64_t k = k_full; k < k_size; ++k) sum += w[(n + r) * k_size + k] * x[m * k_size + k];
      y[m * n_size + n + r] = sum + (bias ? bias[n + r] : 0.f);
    }
  }
}

// Output rows [n0, n1) for all m_size activation rows: each block of R weight rows is read from
// memory once and used for every activation row, four at a time.
template <int R>
static void gemv_rows(const float* x, const float* w, const float* bias, float* y, int64_t m_size, int64_t k_size,
                      int64_t n_size, int64_t n0, int64_t n1) {
  auto block = [&](auto rows, int64_t n) {
    constexpr int kR = decltype(rows)::value;
    for (int64_t m = 0; m < m_size; m += 4) {
      const float* xm = x + m * k_size;
      float* ym = y + m * n_size;
      const bool first = m == 0;
      switch (std::min<int64_t>(4, m_size - m)) {
        case 1: gemv_block<kR, 1>(xm, w, bias, ym, k_size, n_size, n, first); break;
        case 2: gemv_block<kR, 2>(xm, w, bias, ym, k_size, n_size, n, first); break;
        case 3: gemv_block<kR, 3>(xm, w, bias, ym, k_size, n_size, n, first); break;
        default: gemv_block<kR, 4>(xm, w, bias, ym, k_size, n_size, n, first); break;
      }
    }
  };
  int64_t n = n0;
  for (; n + R <= n1; n += R) block(std::integral_constant<int, R>{}, n);
  for (; n < n1; ++n) block(std::integral_constant<int, 1>{}, n);
}

bool has_gemv_f32() { return true; }

at::Tensor gemv_f32(at::Tensor x, at::Tensor weight, std::optional<at::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2, "gemv_f32: x must be [M, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "gemv_f32: float32 only");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), "gemv_f32: weight must be [N, K]");
  x = x.contiguous();
  weight = weight.contiguous();
  const int64_t m_size = x.size(0), k_size = x.size(1), n_size = weight.size(0);
  at::Tensor bias_c;
  if (bias.has_value() && bias->defined()) bias_c = bias->to(at::kFloat).contiguous();
  auto y = at::empty({m_size, n_size}, x.options());
  if (m_size == 0) return y;
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* bp = bias_c.defined() ? bias_c.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  auto rows = [&](int64_t n0, int64_t n1) {  // 4 weight rows per block for 1-2 activation rows, else 3
    if (m_size <= 2) gemv_rows<4>(xp, wp, bp, yp, m_size, k_size, n_size, n0, n1);
    else gemv_rows<3>(xp, wp, bp, yp, m_size, k_size, n_size, n0, n1);
  };
  // Threads split the output rows in spans of 12 (a multiple of every block height).
  const int64_t spans = n_size / 12;
  if (spans == 0) {
    rows(0, n_size);
  } else {
    at::parallel_for(0, spans, 8, [&](int64_t a, int64_t b) {
      rows(a * 12, b == spans ? n_size : b * 12);  // the last chunk takes the rows past the last span
    });
  }
  return y;
}

#else

bool has_gemv_f32() { return false; }

at::Tensor gemv_f32(at::Tensor x, at::Tensor weight, std::optional<at::Tensor> bias) {
  TORCH_CHECK(false, "gemv_f32: built without AVX2/FMA");
}

#endif
