// SwiGLU's activation in one pass: out = silu(gate) * up, where x = [gate | up] along its last
// dimension (the merged gate/up projection's output), float32 (CPU, AVX2 + FMA).
//
// torch's F.silu(gate).mul_(up) reads the strided gate half, writes a new tensor, then reads it
// and the up half again: two passes and an allocation per layer. Here each row is read once and
// its half-size output written once, rows split across the threads.
//
// silu(g) = g * sigmoid(g), with e = exp(-|g|) <= 1 (so the exp never overflows):
// sigmoid(g) = 1 / (1 + e) for g >= 0, e / (1 + e) for g < 0 (silu8, avx2_math.h; gemm_f32_silu_mul
// applies the same to its tiles).
//
// bfloat16 (silu_mul_bf16, AVX-512): bit-identical to torch's F.silu(gate).mul_(up), which
// transformers runs too. torch rounds silu(gate) to bfloat16, then multiplies by up in float32 and
// rounds again. A bfloat16 gate has only 65,536 values, so silu's rounded result is a table that
// torch itself computed (the caller passes F.silu of every bfloat16 value, ``table``): one gather
// a value replaces an exp and a division, and the product is rounded as torch rounds it (explicit
// rounding-mode intrinsics, software round-to-nearest-even, so -ffast-math cannot rewrite it).
#include "aten_lite.h"
#include <algorithm>
#include <cmath>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#include "avx2_math.h"

static inline float silu1(float g) {
  const float e = std::exp(-std::fabs(g));
  return g * ((g < 0.f ? e : 1.f) / (1.f + e));
}

at::Tensor silu_mul(at::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "silu_mul needs a contiguous float32 [rows, 2 * n] tensor");
  TORCH_CHECK(x.size(1) % 2 == 0, "silu_mul needs an even last dimension, got ", x.size(1));
  const int64_t rows = x.size(0), n = x.size(1) / 2;
  auto out = at::empty({rows, n}, x.options());
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  // Rows are independent; a small batch stays on one thread (a decode's row is ~6 KB of work).
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* gate = src + r * 2 * n;
      const float* up = gate + n;
      float* o = dst + r * n;
      int64_t i = 0;
      for (; i + 8 <= n; i += 8) {
        _mm256_storeu_ps(o + i, _mm256_mul_ps(silu8(_mm256_loadu_ps(gate + i)), _mm256_loadu_ps(up + i)));
      }
      for (; i < n; ++i) o[i] = silu1(gate[i]) * up[i];
    }
  });
  return out;
}

bool has_silu_mul() { return true; }

#else

at::Tensor silu_mul(at::Tensor x) {
  TORCH_CHECK(false, "silu_mul was not built: this CPU has no AVX2 + FMA");
  return x;
}

bool has_silu_mul() { return false; }

#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>

namespace {

inline __m512 bf16_bits_to_float(__m512i bits) { return _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16)); }

// float32 -> bfloat16 bits as torch's vectorised conversion does: round to nearest even, NaN to 0xFFFF
// (its scalar conversion, narrow1, gives 0x7FC0).
inline __m256i narrow16(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0xFFFF));
  return _mm512_cvtepi32_epi16(r);
}

inline uint16_t narrow1(float x) {
  if (std::isnan(x)) return 0x7FC0;
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

inline float widen1(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float x;
  std::memcpy(&x, &bits, 4);
  return x;
}

}  // namespace

at::Tensor silu_mul_bf16(at::Tensor x, at::Tensor table) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.stride(1) == 1,
              "silu_mul_bf16 needs a bfloat16 [rows, 2 * n] tensor, its last dimension contiguous");
  TORCH_CHECK(x.size(1) % 2 == 0, "silu_mul_bf16 needs an even last dimension, got ", x.size(1));
  TORCH_CHECK(table.dim() == 1 && table.numel() >= 65537 && table.element_size() == 2 && table.is_contiguous(),
              "silu_mul_bf16: table must hold silu of all 65,536 bfloat16 values, and one more entry");
  const int64_t rows = x.size(0), n = x.size(1) / 2, stride = x.stride(0);
  auto out = at::empty({rows, n}, x.options());
  const auto* src = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const auto* silu = reinterpret_cast<const uint16_t*>(table.data_ptr());
  auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1));
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint16_t* gate = src + r * stride;
      const uint16_t* up = gate + n;
      uint16_t* o = dst + r * n;
      int64_t i = 0;
      for (; i + 16 <= n; i += 16) {
        const __m512i index = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(gate + i)));
        // 32 bits at entry i: silu[i] in the low half (the high half, silu[i + 1], shifts out)
        const __m512 s = bf16_bits_to_float(_mm512_i32gather_epi32(index, silu, 2));
        const __m512 u = bf16_bits_to_float(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(up + i))));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + i), narrow16(_mm512_mul_round_ps(s, u, kRound)));
      }
      for (; i < n; ++i) o[i] = narrow1(widen1(silu[gate[i]]) * widen1(up[i]));
    }
  });
  return out;
}

bool has_silu_mul_bf16() { return true; }

#else

at::Tensor silu_mul_bf16(at::Tensor x, at::Tensor table) {
  TORCH_CHECK(false, "silu_mul_bf16 was not built: this CPU has no AVX-512");
  return x;
}

bool has_silu_mul_bf16() { return false; }

#endif
