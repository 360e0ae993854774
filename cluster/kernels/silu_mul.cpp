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
#include "aten_lite.h"
#include <algorithm>
#include <cmath>

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
