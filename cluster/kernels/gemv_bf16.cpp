// y = x W^T (+ b) for a few rows of bfloat16 activations: decode-sized linears on CPU.
//
// A decode step multiplies one to a few activation rows by every weight matrix of the model, so it
// streams all the weights from memory once per token. oneDNN's packed matmul reaches about 8-12
// GB/s on that here (its blocked kernels are built for many rows); this loop reads the plain
// row-major weight in order, four output rows at a time with the next rows prefetched, and
// multiplies bf16 pairs with AVX512-BF16's dpbf16 into float32 sums: about 16 GB/s, 30% less time
// for all of SmolLM2's weights at 1-3 rows (docs/benchmarks.md). Each output is its float32 sum
// (plus the bias) rounded once to bfloat16. Rows are split over torch's intra-op threads.
//
// Built only where the compiler targets AVX512-BF16 (-march=native); elsewhere
// has_gemv_bf16() is false and the caller keeps oneDNN.
#include "aten_lite.h"

#include <cstring>

constexpr int64_t kMaxRows = 4;

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>

static inline uint16_t round_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  bits += 0x7FFF + ((bits >> 16) & 1);  // round to nearest, ties to even
  return static_cast<uint16_t>(bits >> 16);
}

template <int M>
static void gemv_rows(const uint16_t* x, const uint16_t* w, const float* bias, uint16_t* y, int64_t k_size,
                      int64_t n_size, int64_t n0, int64_t n1) {
  const int64_t k_full = k_size / 32 * 32;
  const __mmask32 tail = static_cast<__mmask32>((1ull << (k_size - k_full)) - 1);
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    __m512 acc[4][M];
    for (int r = 0; r < 4; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < k_full; k += 32) {
      __m512bh wv[4];
      for (int r = 0; r < 4; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(w + (n + r + 8) * k_size + k), _MM_HINT_T0);
        wv[r] = (__m512bh)_mm512_loadu_si512(w + (n + r) * k_size + k);
      }
      for (int m = 0; m < M; ++m) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * k_size + k);
        for (int r = 0; r < 4; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv[r], xv);
      }
    }
    if (tail) {
      __m512bh wv[4];
      for (int r = 0; r < 4; ++r) wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(tail, w + (n + r) * k_size + k_full);
      for (int m = 0; m < M; ++m) {
        const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(tail, x + m * k_size + k_full);
        for (int r = 0; r < 4; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv[r], xv);
      }
    }
    for (int r = 0; r < 4; ++r)
      for (int m = 0; m < M; ++m)
        y[m * n_size + n + r] = round_to_bf16(_mm512_reduce_add_ps(acc[r][m]) + (bias ? bias[n + r] : 0.f));
  }
  for (; n < n1; ++n) {
    for (int m = 0; m < M; ++m) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t k = 0; k < k_full; k += 32)
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(w + n * k_size + k),
                               (__m512bh)_mm512_loadu_si512(x + m * k_size + k));
      if (tail)
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_maskz_loadu_epi16(tail, w + n * k_size + k_full),
                               (__m512bh)_mm512_maskz_loadu_epi16(tail, x + m * k_size + k_full));
      y[m * n_size + n] = round_to_bf16(_mm512_reduce_add_ps(acc) + (bias ? bias[n] : 0.f));
    }
  }
}

bool has_gemv_bf16() { return true; }

at::Tensor gemv_bf16(at::Tensor x, at::Tensor weight, std::optional<at::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) <= kMaxRows, "gemv_bf16: x must be [0..4, K]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16, "gemv_bf16: bfloat16 only");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), "gemv_bf16: weight must be [N, K]");
  x = x.contiguous();
  weight = weight.contiguous();
  const int64_t m_size = x.size(0), k_size = x.size(1), n_size = weight.size(0);
  at::Tensor bias_f32;
  if (bias.has_value() && bias->defined()) bias_f32 = bias->to(at::kFloat).contiguous();
  auto y = at::empty({m_size, n_size}, x.options());
  if (m_size == 0) return y;
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const auto* wp = reinterpret_cast<const uint16_t*>(weight.data_ptr());
  const float* bp = bias_f32.defined() ? bias_f32.data_ptr<float>() : nullptr;
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  auto rows = [&](int64_t n0, int64_t n1) {
    switch (m_size) {
      case 1: gemv_rows<1>(xp, wp, bp, yp, k_size, n_size, n0, n1); break;
      case 2: gemv_rows<2>(xp, wp, bp, yp, k_size, n_size, n0, n1); break;
      case 3: gemv_rows<3>(xp, wp, bp, yp, k_size, n_size, n0, n1); break;
      default: gemv_rows<4>(xp, wp, bp, yp, k_size, n_size, n0, n1); break;
    }
  };
  const int64_t quads = n_size / 4;  // threads split the output rows four at a time
  if (quads == 0) {
    rows(0, n_size);
  } else {
    at::parallel_for(0, quads, 16, [&](int64_t a, int64_t b) {
      rows(a * 4, b == quads ? n_size : b * 4);  // the last chunk takes the rows past the last four
    });
  }
  return y;
}

#else

bool has_gemv_bf16() { return false; }

at::Tensor gemv_bf16(at::Tensor x, at::Tensor weight, std::optional<at::Tensor> bias) {
  TORCH_CHECK(false, "gemv_bf16: built without AVX512-BF16");
}

#endif
