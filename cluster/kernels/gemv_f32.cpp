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
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

static inline float reduce8(__m256 v) {
  const __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pairs = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  return _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1)));
}

// R output rows by MC activation rows: R * MC accumulators (<= 12 of AVX2's 16 registers).
// ``w`` points at the first of the R weight rows (``k_size`` floats apart). ``ahead``, when not null,
// points at the rows to prefetch (the first pass over these rows; later passes, the next activation
// rows, find them in L1).
template <int R, int MC>
static void gemv_block(const float* x, const float* w, const float* ahead, const float* bias, float* y,
                       int64_t k_size, int64_t n_size, int64_t n) {
  const int64_t k_full = k_size / 8 * 8;
  __m256 acc[R][MC];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MC; ++m) acc[r][m] = _mm256_setzero_ps();
  for (int64_t k = 0; k < k_full; k += 8) {
    __m256 wv[R];
    for (int r = 0; r < R; ++r) {
      if (ahead) _mm_prefetch(reinterpret_cast<const char*>(ahead + r * k_size + k), _MM_HINT_T0);
      wv[r] = _mm256_loadu_ps(w + r * k_size + k);
    }
    for (int m = 0; m < MC; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * k_size + k);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm256_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int m = 0; m < MC; ++m) {
      float sum = reduce8(acc[r][m]);
      for (int64_t k = k_full; k < k_size; ++k) sum += w[r * k_size + k] * x[m * k_size + k];
      y[m * n_size + n + r] = sum + (bias ? bias[n + r] : 0.f);
    }
  }
}

// Rows [n, n + R) of the output for all m_size activation rows, from R weight rows at ``w``: the
// block is read once and used for every activation row, four at a time.
template <int R>
static void gemv_rows_block(const float* x, const float* w, const float* ahead, const float* bias, float* y,
                            int64_t m_size, int64_t k_size, int64_t n_size, int64_t n) {
  for (int64_t m = 0; m < m_size; m += 4) {
    const float* xm = x + m * k_size;
    float* ym = y + m * n_size;
    const float* pf = m == 0 ? ahead : nullptr;
    switch (std::min<int64_t>(4, m_size - m)) {
      case 1: gemv_block<R, 1>(xm, w, pf, bias, ym, k_size, n_size, n); break;
      case 2: gemv_block<R, 2>(xm, w, pf, bias, ym, k_size, n_size, n); break;
      case 3: gemv_block<R, 3>(xm, w, pf, bias, ym, k_size, n_size, n); break;
      default: gemv_block<R, 4>(xm, w, pf, bias, ym, k_size, n_size, n); break;
    }
  }
}

// Output rows [n0, n1) for all m_size activation rows, R weight rows at a time; ``rows_at(n, r,
// scratch)`` gives a pointer to weight rows [n, n + r) (the plain weight, or rows decoded into
// ``scratch``), and ``ahead_of(n, r)`` the rows to prefetch while reading them (or null).
template <int R, typename RowsAt, typename AheadOf>
static void gemv_span(const float* x, const float* bias, float* y, int64_t m_size, int64_t k_size,
                      int64_t n_size, int64_t n0, int64_t n1, RowsAt rows_at, AheadOf ahead_of, float* scratch) {
  int64_t n = n0;
  for (; n + R <= n1; n += R)
    gemv_rows_block<R>(x, rows_at(n, R, scratch), ahead_of(n, R), bias, y, m_size, k_size, n_size, n);
  for (; n < n1; ++n)
    gemv_rows_block<1>(x, rows_at(n, 1, scratch), ahead_of(n, 1), bias, y, m_size, k_size, n_size, n);
}

// Splits the n_size output rows over torch's intra-op threads in spans of 12 (a multiple of every
// block height: 4 weight rows per block for 1-2 activation rows, else 3) and calls rows(n0, n1).
template <typename Rows>
static void split_output_rows(int64_t n_size, Rows rows) {
  const int64_t spans = n_size / 12;
  if (spans == 0) {
    rows(0, n_size);
  } else {
    at::parallel_for(0, spans, 8, [&](int64_t a, int64_t b) {
      rows(a * 12, b == spans ? n_size : b * 12);  // the last chunk takes the rows past the last span
    });
  }
}

// The plain loop over every output row; ``scratch_floats`` per thread are handed to ``rows_at``
// (0 for the plain weight).
template <typename RowsAt, typename AheadOf>
static void gemv_parallel(const float* x, const float* bias, float* y, int64_t m_size, int64_t k_size,
                          int64_t n_size, RowsAt rows_at, AheadOf ahead_of, int64_t scratch_floats) {
  split_output_rows(n_size, [&](int64_t n0, int64_t n1) {
    std::vector<float> scratch(scratch_floats);
    if (m_size <= 2) gemv_span<4>(x, bias, y, m_size, k_size, n_size, n0, n1, rows_at, ahead_of, scratch.data());
    else gemv_span<3>(x, bias, y, m_size, k_size, n_size, n0, n1, rows_at, ahead_of, scratch.data());
  });
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
  gemv_parallel(xp, bp, yp, m_size, k_size, n_size,
                [&](int64_t n, int, float*) { return wp + n * k_size; },
                [&](int64_t n, int r) { return wp + std::min(n + 2 * r, n_size - r) * k_size; }, 0);
  return y;
}

// ---- Weights held as GGUF blocks (cluster/model/layers/gguf_blocks.py) ----------------------------
// A weight whose float32 values are exactly a GGUF Q4_1 or Q8_0 dequantisation (a model converted
// from such a file) is held as those blocks: 32 weights of a row share a scale (and, for Q4_1, a
// minimum). The blocks decode to the very float32 values the plain weight holds (gguf's own
// arithmetic: Q4_1 d * q + m, two roundings; Q8_0 d * q): in registers as they are used for up to 4
// activation rows, else a block of R weight rows at a time into a per-thread scratch that the plain
// loop then reads. Either way the FMAs run as over the plain weight: outputs are bit-identical to
// gemv_f32 over the decoded weight, and a decode step reads 6 (Q4_1, its two float16 scales held as
// float32) or 9 (Q8_0) bits a weight instead of 32. All of SmolLM2's weights, 2-core AMD EPYC
// (AVX2), ms: dense 19.9 / 22.2 / 22.3 at 1 / 2 / 4 rows, blocks 11.3 / 12.9 / 15.6 (the decode's
// arithmetic, not memory, bounds it: 2.9 cycles per 8 Q4_1 weights at 1 row, 2.0 dense).

// Keeps the compiler (-ffast-math) from fusing a product into the add that follows it: the decode
// must round the product before adding, as gguf's numpy dequantisation does.
static inline __m256 rounded(__m256 v) {
  asm("" : "+x"(v));
  return v;
}

// Q4_1: per block, scales [d, m] (float32) and 16 bytes; byte j holds weight j in its low nibble and
// weight j + 16 in its high one. ``vec(qs, scales, i)``: weights 8i .. 8i + 7 of the block.
struct Q4_1 {
  using q_t = uint8_t;
  static constexpr int kBytes = 16, kScales = 2;
  static inline __m256 vec(const uint8_t* qs, const float* scales, int i) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
    const __m128i low4 = _mm_set1_epi8(0x0F);
    __m128i part = i < 2 ? _mm_and_si128(raw, low4) : _mm_and_si128(_mm_srli_epi16(raw, 4), low4);
    if (i % 2) part = _mm_srli_si128(part, 8);
    const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(part));
    return _mm256_add_ps(rounded(_mm256_mul_ps(_mm256_set1_ps(scales[0]), q)), _mm256_set1_ps(scales[1]));
  }
};

// Q8_0: per block, a scale d (float32) and 32 signed bytes.
struct Q8_0 {
  using q_t = int8_t;
  static constexpr int kBytes = 32, kScales = 1;
  static inline __m256 vec(const int8_t* qs, const float* scales, int i) {
    const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + i * 8));
    return _mm256_mul_ps(_mm256_set1_ps(scales[0]), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw)));
  }
};

// ``rows`` rows of blocks, decoded in order into ``out`` (32 floats a block).
template <typename F>
static void decode_rows(const typename F::q_t* qs, const float* scales, int64_t blocks, int rows, float* out) {
  for (int64_t b = 0; b < blocks * rows; ++b)
    for (int i = 0; i < 4; ++i)
      _mm256_storeu_ps(out + b * 32 + i * 8, F::vec(qs + b * F::kBytes, scales + b * F::kScales, i));
}

// A few activation rows (decode: 1-4) against R rows of blocks, each 8-weight vector decoded in
// registers as it is used: the FMAs and the final sums run exactly as gemv_block's over the decoded
// rows (the same vectors in the same order), so the outputs are the same bits, without the scratch.
template <typename F, int R, int MC>
static void blocks_block(const float* x, const typename F::q_t* qs, const float* scales, const float* bias, float* y,
                         int64_t blocks, int64_t n_size, int64_t n) {
  const int64_t k_size = blocks * 32;
  __m256 acc[R][MC];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MC; ++m) acc[r][m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    for (int i = 0; i < 4; ++i) {
      __m256 wv[R];
      for (int r = 0; r < R; ++r) {
        const int64_t at = (n + r) * blocks + b;
        wv[r] = F::vec(qs + at * F::kBytes, scales + at * F::kScales, i);
      }
      for (int m = 0; m < MC; ++m) {
        const __m256 xv = _mm256_loadu_ps(x + m * k_size + b * 32 + i * 8);
        for (int r = 0; r < R; ++r) acc[r][m] = _mm256_fmadd_ps(wv[r], xv, acc[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MC; ++m) y[m * n_size + n + r] = reduce8(acc[r][m]) + (bias ? bias[n + r] : 0.f);
}

template <typename F, int R>
static void blocks_rows(const float* x, const typename F::q_t* qs, const float* scales, const float* bias, float* y,
                        int64_t m_size, int64_t blocks, int64_t n_size, int64_t n) {
  switch (m_size) {
    case 1: blocks_block<F, R, 1>(x, qs, scales, bias, y, blocks, n_size, n); break;
    case 2: blocks_block<F, R, 2>(x, qs, scales, bias, y, blocks, n_size, n); break;
    case 3: blocks_block<F, R, 3>(x, qs, scales, bias, y, blocks, n_size, n); break;
    default: blocks_block<F, R, 4>(x, qs, scales, bias, y, blocks, n_size, n); break;
  }
}

// Up to 4 activation rows, split over the threads as gemv_parallel does, with the same block heights
// (4 weight rows for 1-2 activation rows, else 3; single rows at the end).
template <typename F>
static void blocks_in_registers(const float* x, const typename F::q_t* qs, const float* scales, const float* bias,
                                float* y, int64_t m_size, int64_t blocks, int64_t n_size) {
  split_output_rows(n_size, [&](int64_t n0, int64_t n1) {
    auto span = [&](auto height) {
      constexpr int R = decltype(height)::value;
      int64_t n = n0;
      for (; n + R <= n1; n += R) blocks_rows<F, R>(x, qs, scales, bias, y, m_size, blocks, n_size, n);
      for (; n < n1; ++n) blocks_rows<F, 1>(x, qs, scales, bias, y, m_size, blocks, n_size, n);
    };
    if (m_size <= 2) span(std::integral_constant<int, 4>{});
    else span(std::integral_constant<int, 3>{});
  });
}

static void check_blocks(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales, int64_t bytes,
                         int64_t scale_floats, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, name, ": x must be float32 [M, K]");
  TORCH_CHECK(qs.dim() == 3 && qs.size(2) == bytes && qs.size(1) * 32 == x.size(1), name,
              ": qs must be [N, K / 32, ", bytes, "]");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == qs.size(0) * qs.size(1) * scale_floats,
              name, ": scales must be float32 with ", scale_floats, " per block");
  TORCH_CHECK(qs.is_contiguous() && scales.is_contiguous(), name, ": blocks must be contiguous");
}

// Up to 4 rows the blocks are decoded in registers; more rows decode each block of weight rows once
// into a per-thread scratch and run the plain loop over it (the decode is then shared by every row).
template <typename F>
static at::Tensor gemv_blocks(at::Tensor x, const at::Tensor& qs, const at::Tensor& scales,
                              std::optional<at::Tensor> bias) {
  x = x.contiguous();
  const int64_t m_size = x.size(0), k_size = x.size(1), n_size = qs.size(0), blocks = qs.size(1);
  at::Tensor bias_c;
  if (bias.has_value() && bias->defined()) bias_c = bias->to(at::kFloat).contiguous();
  auto y = at::empty({m_size, n_size}, x.options());
  if (m_size == 0) return y;
  const auto* q = reinterpret_cast<const typename F::q_t*>(qs.data_ptr());
  const float* s = scales.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* bp = bias_c.defined() ? bias_c.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  if (m_size <= 4) {
    blocks_in_registers<F>(xp, q, s, bp, yp, m_size, blocks, n_size);
    return y;
  }
  gemv_parallel(xp, bp, yp, m_size, k_size, n_size,
                [&](int64_t n, int r, float* scratch) {
                  decode_rows<F>(q + n * blocks * F::kBytes, s + n * blocks * F::kScales, blocks, r, scratch);
                  return static_cast<const float*>(scratch);
                },
                [](int64_t, int) { return static_cast<const float*>(nullptr); }, 4 * k_size);
  return y;
}

at::Tensor gemv_q4_1(at::Tensor x, at::Tensor qs, at::Tensor scales, std::optional<at::Tensor> bias) {
  check_blocks(x, qs, scales, 16, 2, "gemv_q4_1");
  TORCH_CHECK(qs.scalar_type() == at::kByte, "gemv_q4_1: qs must be uint8");
  return gemv_blocks<Q4_1>(x, qs, scales, bias);
}

at::Tensor gemv_q8_0(at::Tensor x, at::Tensor qs, at::Tensor scales, std::optional<at::Tensor> bias) {
  check_blocks(x, qs, scales, 32, 1, "gemv_q8_0");
  TORCH_CHECK(qs.scalar_type() == at::kChar, "gemv_q8_0: qs must be int8");
  return gemv_blocks<Q8_0>(x, qs, scales, bias);
}

#else

bool has_gemv_f32() { return false; }

at::Tensor gemv_f32(at::Tensor x, at::Tensor weight, std::optional<at::Tensor> bias) {
  TORCH_CHECK(false, "gemv_f32: built without AVX2/FMA");
}

at::Tensor gemv_q4_1(at::Tensor x, at::Tensor qs, at::Tensor scales, std::optional<at::Tensor> bias) {
  TORCH_CHECK(false, "gemv_q4_1: built without AVX2/FMA");
}

at::Tensor gemv_q8_0(at::Tensor x, at::Tensor qs, at::Tensor scales, std::optional<at::Tensor> bias) {
  TORCH_CHECK(false, "gemv_q8_0: built without AVX2/FMA");
}

#endif
