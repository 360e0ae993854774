// Decode attention straight from the paged KV cache (CPU).
//
// One query token per sequence attends to its whole context, reading K and V block by
// block where they lie in the cache: no gathered copy is made, so the cache is read once.
// Work is split over (sequence, KV head) pairs; the query heads that share a KV head
// (grouped-query attention) are handled together so each K/V row is loaded once.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <limits>
#include <vector>

// Widening loads the compiler can vectorise (bfloat16 is the top half of a float32).
template <typename scalar_t>
static inline void to_float(const scalar_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <>
inline void to_float<c10::BFloat16>(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<uint32_t>(bits[i]) << 16;
}

template <typename scalar_t>
static void decode_pair(const scalar_t* q, const scalar_t* k_head, const scalar_t* v_head,
                        const int64_t* table, int64_t context, int64_t block_size, int64_t head_dim,
                        int64_t group, float scale, int64_t block_stride, scalar_t* out,
                        std::vector<float>& scores, std::vector<float>& qf, std::vector<float>& acc) {
  scores.assign(group * context, 0.f);
  qf.resize(group * head_dim);
  acc.assign(group * head_dim, 0.f);
  for (int64_t i = 0; i < group * head_dim; ++i) qf[i] = static_cast<float>(q[i]) * scale;
  for (int64_t t = 0; t < context; ++t) {
    const scalar_t* k = k_head + table[t / block_size] * block_stride + (t % block_size) * head_dim;
    float kf[512];
    to_float(k, kf, head_dim);
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = qf.data() + g * head_dim;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < head_dim; ++d) dot += qg[d] * kf[d];
      scores[g * context + t] = dot;
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores.data() + g * context;
    float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
    for (int64_t t = 0; t < context; ++t) mx = std::max(mx, s[t]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < context; ++t) { s[t] = expf(s[t] - mx); sum += s[t]; }
    const float inv = 1.f / sum;
#pragma omp simd
    for (int64_t t = 0; t < context; ++t) s[t] *= inv;
  }
  for (int64_t t = 0; t < context; ++t) {
    const scalar_t* v = v_head + table[t / block_size] * block_stride + (t % block_size) * head_dim;
    float vf[512];
    to_float(v, vf, head_dim);
    for (int64_t g = 0; g < group; ++g) {
      const float p = scores[g * context + t];
      float* a = acc.data() + g * head_dim;
#pragma omp simd
      for (int64_t d = 0; d < head_dim; ++d) a[d] += p * vf[d];
    }
  }
  for (int64_t i = 0; i < group * head_dim; ++i) out[i] = static_cast<scalar_t>(acc[i]);
}

// q: [S, Hq, D]; kv_cache: [2, Hkv, NB, BS, D]; block_table: [S, max_blocks] int64;
// context_lens: [S] int64. Returns [S, Hq, D].
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor kv_cache, torch::Tensor block_table,
                           torch::Tensor context_lens, double scale) {
  TORCH_CHECK(q.is_contiguous() && kv_cache.is_contiguous() && block_table.is_contiguous(),
              "paged_decode needs contiguous inputs");
  TORCH_CHECK(q.size(2) <= 512, "head_dim above 512 is not supported");
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t num_kv_heads = kv_cache.size(1), num_blocks = kv_cache.size(2), block_size = kv_cache.size(3);
  const int64_t group = num_heads / num_kv_heads;
  const int64_t max_blocks = block_table.size(1);
  const int64_t block_stride = block_size * head_dim;
  auto out = torch::empty_like(q);
  const int64_t* tables = block_table.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = kv_cache.data_ptr<scalar_t>();
    const scalar_t* vp = kp + num_kv_heads * num_blocks * block_stride;
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores, qf, acc;
      for (int64_t pair = begin; pair < end; ++pair) {
        const int64_t s = pair / num_kv_heads, h = pair % num_kv_heads;
        const int64_t offset = (s * num_heads + h * group) * head_dim;
        decode_pair<scalar_t>(qp + offset, kp + h * num_blocks * block_stride,
                              vp + h * num_blocks * block_stride, tables + s * max_blocks, lens[s],
                              block_size, head_dim, group, static_cast<float>(scale), block_stride,
                              op + offset, scores, qf, acc);
      }
    });
  });
  return out;
}

