// Causal attention of a prompt chunk over its context in float32 (CPU, AVX2 + FMA): the prefill
// half of a step on CPUs that run float32 (AVX2-only: dtype "auto").
//
// Query i of the chunk (position q_offset + i) sees keys 0 .. q_offset + i of the context; the
// context's K/V come as [S, Hkv, D] (the chunk's own, or a cached prefix and the chunk gathered from
// the paged cache). Per KV head, the keys are packed once into panels of 16 keys ([D][16], the
// layout gemm_f32 reads) and the values into one [S][D] run. The query rows that share a KV head
// (every position times the group's query heads) are cut into tiles of 6; a tile runs down the
// key panels it can see: scores 6 x 16 in registers (two panel loads and six broadcasts feed twelve
// FMAs per dimension), the keys past each row's position masked in the last panels, an online
// softmax (running max and sum, the output rescaled when the max grows), then P x V 16 dimensions
// at a time, again twelve accumulators. No mask or score matrix is built, the causal triangle's far
// side is never computed, and a chunk after a cached prefix is one pass, not two merged ones.
// Against torch's CPU flash attention (float32, 9 query heads on 3 KV heads, head size 64, 2-core
// AMD EPYC): docs/benchmarks.md.
//
// Built where the compiler targets AVX2 and FMA (-march=native); elsewhere has_prefill_attention()
// is false and the torch path runs.
#include "aten_lite.h"

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#include "avx2_math.h"

namespace {

constexpr int kKeys = 16;  // keys a panel
constexpr int kRows = 6;   // query rows a tile
constexpr float kNoScore = -1e30f;  // finite: the extension builds with -ffast-math

// One KV head's context, re-laid for the tiles: keys as panels [ceil(S / 16)][D][16] (zeros past S),
// values as [S][D].
struct Context {
  const float* panels;
  const float* values;
  int64_t keys;
};

// A tile: MR query rows (scaled, [MR][D] in ``q``), each seeing keys [0, limit[m]), into out rows.
// Keys go 32 at a time (two panels): scores, then one online-softmax update, then P x V.
template <int D, int MR>
void tile(const float* q, const int64_t* limit, const Context& ctx, float* const* out) {
  constexpr int kStep = 2 * kKeys;
  alignas(32) float o[MR][D];
  alignas(32) float p[MR][kStep];
  alignas(32) float row_max[8], new_max[8], correction[8];
  float row_sum[MR];
  std::fill(row_max, row_max + 8, kNoScore);
  std::fill(new_max, new_max + 8, kNoScore);
#pragma GCC unroll 6
  for (int m = 0; m < MR; ++m) {
    std::fill(o[m], o[m] + D, 0.f);
    row_sum[m] = 0.f;
  }
  const int64_t visible = limit[MR - 1];  // rows are in position order: the last sees the most
  const int64_t panels = (visible + kKeys - 1) / kKeys;
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 none = _mm256_set1_ps(kNoScore);
  for (int64_t b0 = 0; b0 < panels; b0 += 2) {
    const int steps = std::min<int64_t>(2, panels - b0);
    const int64_t first = b0 * kKeys;
    // Scores: q rows x 16 keys a panel, in registers, then into p (masked past each row's limit).
    for (int half = 0; half < 2; ++half) {
      if (half == steps) {  // an odd last panel: its partner scores nothing
#pragma GCC unroll 6
        for (int m = 0; m < MR; ++m) {
          _mm256_store_ps(p[m] + kKeys, none);
          _mm256_store_ps(p[m] + kKeys + 8, none);
        }
        break;
      }
      const float* panel = ctx.panels + (b0 + half) * D * kKeys;
      __m256 lo[MR], hi[MR];
#pragma GCC unroll 6
      for (int m = 0; m < MR; ++m) lo[m] = hi[m] = _mm256_setzero_ps();
      for (int d = 0; d < D; ++d) {
        const __m256 k0 = _mm256_load_ps(panel + d * kKeys), k1 = _mm256_load_ps(panel + d * kKeys + 8);
#pragma GCC unroll 6
        for (int m = 0; m < MR; ++m) {
          const __m256 a = _mm256_broadcast_ss(q + m * D + d);
          lo[m] = _mm256_fmadd_ps(a, k0, lo[m]);
          hi[m] = _mm256_fmadd_ps(a, k1, hi[m]);
        }
      }
      const int64_t panel_first = first + half * kKeys;
#pragma GCC unroll 6
      for (int m = 0; m < MR; ++m) {
        const int64_t seen = limit[m] - panel_first;
        if (seen < kKeys) {
          const __m256i n = _mm256_set1_epi32(static_cast<int>(std::max<int64_t>(seen, 0)));
          const __m256i n8 = _mm256_sub_epi32(n, _mm256_set1_epi32(8));
          lo[m] = _mm256_blendv_ps(none, lo[m], _mm256_castsi256_ps(_mm256_cmpgt_epi32(n, lane)));
          hi[m] = _mm256_blendv_ps(none, hi[m], _mm256_castsi256_ps(_mm256_cmpgt_epi32(n8, lane)));
        }
        _mm256_store_ps(p[m] + half * kKeys, lo[m]);
        _mm256_store_ps(p[m] + half * kKeys + 8, hi[m]);
      }
    }
    // Online softmax (scores in log2 units: q was scaled by log2(e)): the new maxima, all rows'
    // corrections in one exp2, then p = 2^(score - max) and the sums. Only a step holding masked
    // keys (some row's limit inside it, or the odd last panel's blank partner) zeroes them.
    const bool masked = limit[0] < first + kStep;
#pragma GCC unroll 6
    for (int m = 0; m < MR; ++m) {
      const __m256 a = _mm256_max_ps(_mm256_load_ps(p[m]), _mm256_load_ps(p[m] + 8));
      const __m256 c = _mm256_max_ps(_mm256_load_ps(p[m] + 16), _mm256_load_ps(p[m] + 24));
      new_max[m] = std::max(row_max[m], max8(_mm256_max_ps(a, c)));
    }
    const __m256 old_max = _mm256_load_ps(row_max), max_now = _mm256_load_ps(new_max);
    _mm256_store_ps(correction, exp2_nonpositive8(_mm256_sub_ps(old_max, max_now)));
    _mm256_store_ps(row_max, max_now);
#pragma GCC unroll 6
    for (int m = 0; m < MR; ++m) {
      const __m256 mx = _mm256_set1_ps(new_max[m]);
      __m256 total = _mm256_setzero_ps();
      if (masked) {
        for (int i = 0; i < kStep; i += 8) {
          const __m256 score = _mm256_load_ps(p[m] + i);
          const __m256 e = _mm256_and_ps(exp2_nonpositive8(_mm256_sub_ps(score, mx)),
                                         _mm256_cmp_ps(score, none, _CMP_GT_OQ));
          _mm256_store_ps(p[m] + i, e);
          total = _mm256_add_ps(total, e);
        }
      } else {
        for (int i = 0; i < kStep; i += 8) {
          const __m256 e = exp2_nonpositive8(_mm256_sub_ps(_mm256_load_ps(p[m] + i), mx));
          _mm256_store_ps(p[m] + i, e);
          total = _mm256_add_ps(total, e);
        }
      }
      row_sum[m] = row_sum[m] * correction[m] + sum8(total);
    }
    // P x V, 16 output dimensions at a time.
    const int64_t keys = std::min<int64_t>(kStep, ctx.keys - first);
    const float* vb = ctx.values + first * D;
    for (int d = 0; d < D; d += 16) {
      __m256 a0[MR], a1[MR];
#pragma GCC unroll 6
      for (int m = 0; m < MR; ++m) {
        const __m256 c = _mm256_set1_ps(correction[m]);
        a0[m] = _mm256_mul_ps(_mm256_load_ps(o[m] + d), c);
        a1[m] = _mm256_mul_ps(_mm256_load_ps(o[m] + d + 8), c);
      }
      for (int64_t j = 0; j < keys; ++j) {
        const __m256 v0 = _mm256_loadu_ps(vb + j * D + d), v1 = _mm256_loadu_ps(vb + j * D + d + 8);
#pragma GCC unroll 6
        for (int m = 0; m < MR; ++m) {
          const __m256 w = _mm256_broadcast_ss(p[m] + j);
          a0[m] = _mm256_fmadd_ps(w, v0, a0[m]);
          a1[m] = _mm256_fmadd_ps(w, v1, a1[m]);
        }
      }
#pragma GCC unroll 6
      for (int m = 0; m < MR; ++m) {
        _mm256_store_ps(o[m] + d, a0[m]);
        _mm256_store_ps(o[m] + d + 8, a1[m]);
      }
    }
  }
#pragma GCC unroll 6
  for (int m = 0; m < MR; ++m) {
    const float inv = 1.f / row_sum[m];
    for (int d = 0; d < D; ++d) out[m][d] = o[m][d] * inv;
  }
}

template <int D>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t q_offset, float scale, at::Tensor& out) {
  const int64_t tokens = q.size(0), heads = q.size(1), keys = k.size(0), kv_heads = k.size(1);
  const int64_t group = heads / kv_heads, rows = tokens * group;
  const int64_t panels = (keys + kKeys - 1) / kKeys;
  // Re-lay each KV head's keys as panels and its values as one run (64-byte aligned storage).
  auto key_panels = at::empty({kv_heads, panels, D, kKeys}, q.options());
  auto value_rows = at::empty({kv_heads, keys, D}, q.options());
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* panel_out = key_panels.data_ptr<float>();
  float* value_out = value_rows.data_ptr<float>();
  const int64_t k_row = k.stride(0), k_head = k.stride(1), v_row = v.stride(0), v_head = v.stride(1);
  at::parallel_for(0, kv_heads * panels, 1, [&](int64_t a, int64_t z) {
    for (int64_t item = a; item < z; ++item) {
      const int64_t h = item / panels, b = item % panels;
      float* dst = panel_out + item * D * kKeys;
      for (int j = 0; j < kKeys; ++j) {
        const int64_t key = b * kKeys + j;
        const float* src = kp + key * k_row + h * k_head;
        for (int d = 0; d < D; ++d) dst[d * kKeys + j] = key < keys ? src[d] : 0.f;
        if (key < keys) std::copy(vp + key * v_row + h * v_head, vp + key * v_row + h * v_head + D,
                                  value_out + (h * keys + key) * D);
      }
    }
  });
  // Tiles of 6 query rows (position-major: row r is position r / group, query head r % group of the
  // KV head's group), dealt round-robin to the threads (later tiles see more keys).
  const int64_t tiles_per_head = (rows + kRows - 1) / kRows, tiles = kv_heads * tiles_per_head;
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t q_row = q.stride(0), q_head = q.stride(1);
  const float scale_log2 = scale * 1.4426950408889634f;  // scores in log2 units: softmax by exp2
  const int64_t lanes = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tiles));
  at::parallel_for(0, lanes, 1, [&](int64_t a, int64_t z) {
    alignas(32) float qs[kRows * D];
    for (int64_t lane = a; lane < z; ++lane) {
      for (int64_t t = lane; t < tiles; t += lanes) {
        const int64_t h = t / tiles_per_head, r0 = (t % tiles_per_head) * kRows;
        const int64_t mr = std::min<int64_t>(kRows, rows - r0);
        int64_t limit[kRows];
        float* dst[kRows];
        for (int64_t m = 0; m < mr; ++m) {
          const int64_t pos = (r0 + m) / group, head = h * group + (r0 + m) % group;
          const float* src = qp + pos * q_row + head * q_head;
          for (int d = 0; d < D; ++d) qs[m * D + d] = src[d] * scale_log2;
          limit[m] = std::min(keys, q_offset + pos + 1);
          dst[m] = op + (pos * heads + head) * D;
        }
        const Context ctx{panel_out + h * panels * D * kKeys, value_out + h * keys * D, keys};
        switch (mr) {
          case 1: tile<D, 1>(qs, limit, ctx, dst); break;
          case 2: tile<D, 2>(qs, limit, ctx, dst); break;
          case 3: tile<D, 3>(qs, limit, ctx, dst); break;
          case 4: tile<D, 4>(qs, limit, ctx, dst); break;
          case 5: tile<D, 5>(qs, limit, ctx, dst); break;
          default: tile<D, 6>(qs, limit, ctx, dst); break;
        }
      }
    }
  });
}

}  // namespace

bool has_prefill_attention() { return true; }

at::Tensor prefill_attention(at::Tensor q, at::Tensor k, at::Tensor v, int64_t q_offset, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "prefill_attention: q [T, Hq, D], k/v [S, Hkv, D]");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "prefill_attention: float32 only");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(2) == q.size(2), "prefill_attention: k and v must be [S, Hkv, D]");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "prefill_attention: query heads must be a multiple of KV heads");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1, "prefill_attention: head dims must be contiguous");
  TORCH_CHECK(q_offset >= 0 && q_offset + q.size(0) <= k.size(0),
              "prefill_attention: the context must hold q_offset + T keys");
  const int64_t head_dim = q.size(2);
  TORCH_CHECK(head_dim == 64 || head_dim == 128, "prefill_attention: head size 64 or 128, got ", head_dim);
  auto out = at::empty({q.size(0), q.size(1), head_dim}, q.options());
  if (q.size(0) == 0) return out;
  if (head_dim == 64) run<64>(q, k, v, q_offset, static_cast<float>(scale), out);
  else run<128>(q, k, v, q_offset, static_cast<float>(scale), out);
  return out;
}

#else

bool has_prefill_attention() { return false; }

at::Tensor prefill_attention(at::Tensor q, at::Tensor k, at::Tensor v, int64_t q_offset, double scale) {
  TORCH_CHECK(false, "prefill_attention: built without AVX2/FMA");
}

#endif
