// Greedy sampling's argmax over float32 or bfloat16 logits [R, V] (CPU): every row's first index of
// its largest value, as torch.argmax(dim=-1) gives it, a NaN included (the first NaN wins, as in
// torch). bfloat16 rows are widened a span at a time into a thread's buffer (exact, NaN kept), so a
// greedy step need not copy its whole logits to float32 first.
//
// torch reduces each row on one core at ~7 GB/s here (1.0-1.3 ms for a decode step's 33 x 49,152
// logits on a 2-core AMD EPYC: docs/benchmarks.md). Here every row is cut into spans spread over
// the threads, each span scanned with four 8-lane (value, index) accumulators, then the spans
// merged in order. NaN and the comparisons are tested on the bits or with ordered compares, which
// -ffast-math (the extension's flags) leaves alone.
#include "aten_lite.h"

#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kSpan = 8192;  // logits a work item

struct Best {
  float value;
  int64_t index;   // first index of the largest value in the span
  int64_t nan_at;  // first NaN in the span, or -1
};

inline bool is_nan_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return (bits & 0x7fffffffu) > 0x7f800000u;
}

// The span [begin, end) of one row (end - begin >= 1).
Best scan(const float* row, int64_t begin, int64_t end) {
  Best best{row[begin], begin, -1};
  int64_t i = begin;
#if defined(__AVX2__)
  if (end - begin >= 32) {
    const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff), inf_bits = _mm256_set1_epi32(0x7f800000);
    __m256 value[4];
    __m256i index[4];
    __m256i nan_seen = _mm256_setzero_si256();
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    // Indices as offsets from begin (int32: a span is far shorter than 2^31).
    for (int a = 0; a < 4; ++a) {
      value[a] = _mm256_loadu_ps(row + begin + 8 * a);
      index[a] = _mm256_add_epi32(lane, _mm256_set1_epi32(8 * a));
      nan_seen = _mm256_or_si256(nan_seen, _mm256_cmpgt_epi32(
          _mm256_and_si256(_mm256_castps_si256(value[a]), abs_mask), inf_bits));
    }
    i = begin + 32;
    __m256i at = _mm256_add_epi32(lane, _mm256_set1_epi32(32));
    const __m256i step = _mm256_set1_epi32(8);
    for (; i + 32 <= end; i += 32) {
      for (int a = 0; a < 4; ++a) {
        const __m256 x = _mm256_loadu_ps(row + i + 8 * a);
        nan_seen = _mm256_or_si256(nan_seen, _mm256_cmpgt_epi32(
            _mm256_and_si256(_mm256_castps_si256(x), abs_mask), inf_bits));
        const __m256 greater = _mm256_cmp_ps(x, value[a], _CMP_GT_OQ);  // strictly: the first index stays
        value[a] = _mm256_blendv_ps(value[a], x, greater);
        index[a] = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(index[a]), _mm256_castsi256_ps(at),
                                                        greater));
        at = _mm256_add_epi32(at, step);
      }
    }
    alignas(32) float values[32];
    alignas(32) int32_t indices[32];
    for (int a = 0; a < 4; ++a) {
      _mm256_store_ps(values + 8 * a, value[a]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(indices + 8 * a), index[a]);
    }
    best = {values[0], begin + indices[0], -1};
    for (int j = 1; j < 32; ++j) {
      const int64_t idx = begin + indices[j];
      if (values[j] > best.value || (values[j] == best.value && idx < best.index)) best = {values[j], idx, -1};
    }
    if (!_mm256_testz_si256(nan_seen, nan_seen)) {
      for (int64_t j = begin; j < i; ++j)
        if (is_nan_bits(row[j])) {
          best.nan_at = j;
          return best;
        }
    }
  }
#endif
  for (; i < end; ++i) {  // the tail (after every vector index, so a tie keeps the earlier)
    if (is_nan_bits(row[i])) {
      best.nan_at = i;
      return best;
    }
    if (row[i] > best.value) best = {row[i], i, -1};
  }
  return best;
}

// n bfloat16 values as float32 (a shift of the bits: exact, NaN stays NaN).
void widen(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_si512(dst + i, _mm512_slli_epi32(_mm512_cvtepu16_epi32(
                                     _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))), 16));
#elif defined(__AVX2__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm256_slli_epi32(_mm256_cvtepu16_epi32(
                            _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))), 16));
#endif
  for (; i < n; ++i) {
    const uint32_t bits = static_cast<uint32_t>(src[i]) << 16;
    std::memcpy(dst + i, &bits, sizeof bits);
  }
}

}  // namespace

at::Tensor argmax_rows(at::Tensor logits) {
  const bool bf16 = logits.scalar_type() == at::kBFloat16;
  TORCH_CHECK(logits.dim() == 2 && (logits.scalar_type() == at::kFloat || bf16) && logits.device().is_cpu(),
              "argmax_rows: float32 or bfloat16 CPU logits [R, V]");
  TORCH_CHECK(logits.size(1) > 0, "argmax_rows: empty rows");
  TORCH_CHECK(logits.stride(1) == 1, "argmax_rows: each row must be contiguous");
  const int64_t rows = logits.size(0), vocab = logits.size(1), row_stride = logits.stride(0);
  auto out = at::empty({rows}, logits.options().dtype(at::kLong));
  if (rows == 0) return out;
  const int64_t spans = (vocab + kSpan - 1) / kSpan;
  std::vector<Best> found(rows * spans);
  at::parallel_for(0, rows * spans, 1, [&](int64_t a, int64_t z) {
    std::vector<float> buf(bf16 ? kSpan : 0);
    for (int64_t item = a; item < z; ++item) {
      const int64_t r = item / spans, s = item % spans;
      const int64_t begin = s * kSpan, end = std::min(vocab, (s + 1) * kSpan);
      if (!bf16) {
        found[item] = scan(logits.const_data_ptr<float>() + r * row_stride, begin, end);
        continue;
      }
      widen(reinterpret_cast<const uint16_t*>(logits.const_data_ptr()) + r * row_stride + begin, buf.data(), end - begin);
      Best best = scan(buf.data(), 0, end - begin);  // indices from the span's start
      best.index += begin;
      if (best.nan_at >= 0) best.nan_at += begin;
      found[item] = best;
    }
  });
  int64_t* result = out.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    Best best = found[r * spans];
    for (int64_t s = 1; s < spans && best.nan_at < 0; ++s) {
      const Best& next = found[r * spans + s];
      if (next.nan_at >= 0) best.nan_at = next.nan_at;
      else if (next.value > best.value) best = next;  // spans in order: a tie keeps the earlier
    }
    result[r] = best.nan_at >= 0 ? best.nan_at : best.index;
  }
  return out;
}
