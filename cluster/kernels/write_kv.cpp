// A step's K and V stored at their slots of one layer's paged cache (CPU), each row copied, or
// rounded once where a 16-bit cache holds a float32 model's K/V (kv_cache_dtype).
//
// torch's path (stack K and V, transpose, cast, index_put_ through a flattened view) costs ~50 us a
// layer for a decode step's 36 tokens and ~490 us for a 1,019-token prefill step, 30 layers a step:
// 1.5 and 14.6 ms a step on a 2-core AMD EPYC (docs/benchmarks.md). Here each token's rows go
// straight to their slots, no intermediate copy.
//
// Slots are checked before anything is written: one outside the cache refuses the whole call (a
// bad slot must never write outside the tensor); a negative slot is a padding row and is skipped.
#include "aten_lite.h"

#include <cstring>
#include <type_traits>

namespace {

template <typename src_t, typename dst_t>
void store(const at::Tensor& k, const at::Tensor& v, const int64_t* slots, int64_t tokens, at::Tensor& cache) {
  const int64_t heads = cache.size(1), head_dim = cache.size(4);
  const int64_t head_slots = cache.size(2) * cache.size(3);
  dst_t* out = cache.data_ptr<dst_t>();
  const src_t* sources[2] = {k.data_ptr<src_t>(), v.data_ptr<src_t>()};
  const int64_t row_stride[2] = {k.stride(0), v.stride(0)}, head_stride[2] = {k.stride(1), v.stride(1)};
  at::parallel_for(0, tokens, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = slots[t];
      if (slot < 0) continue;
      for (int kv = 0; kv < 2; ++kv)
        for (int64_t h = 0; h < heads; ++h) {
          const src_t* src = sources[kv] + t * row_stride[kv] + h * head_stride[kv];
          dst_t* dst = out + ((kv * heads + h) * head_slots + slot) * head_dim;
          if constexpr (std::is_same_v<src_t, dst_t>) {
            std::memcpy(dst, src, head_dim * sizeof(dst_t));
          } else {
            for (int64_t d = 0; d < head_dim; ++d) dst[d] = static_cast<dst_t>(src[d]);  // round to nearest even
          }
        }
    }
  });
}

}  // namespace

// kv_cache: [2, Hkv, NB, BS, D] (contiguous); k, v: [T, Hkv, D] (last dim contiguous), T >= the
// slots; slot_mapping: [n] int64, slot s = block * BS + offset, negative = skip.
void write_kv(at::Tensor kv_cache, at::Tensor k, at::Tensor v, at::Tensor slot_mapping) {
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2 && kv_cache.is_contiguous(),
              "write_kv: kv_cache must be a contiguous [2, Hkv, NB, BS, D] tensor");
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && k.sizes() == v.sizes() && k.scalar_type() == v.scalar_type(),
              "write_kv: k and v must be [T, Hkv, D] of one dtype");
  TORCH_CHECK(k.size(1) == kv_cache.size(1) && k.size(2) == kv_cache.size(4),
              "write_kv: k is [", k.size(0), ", ", k.size(1), ", ", k.size(2), "], the cache holds ", kv_cache.size(1),
              " heads of ", kv_cache.size(4));
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1, "write_kv: k and v need a contiguous last dimension");
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous(),
              "write_kv: slot_mapping must be a contiguous int64 vector");
  const int64_t tokens = slot_mapping.numel();
  TORCH_CHECK(tokens <= k.size(0), "write_kv: ", tokens, " slots for ", k.size(0), " rows of K/V");
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t capacity = kv_cache.size(2) * kv_cache.size(3);
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(slots[t] < capacity, "write_kv: slot ", slots[t], " is past the cache's ", capacity, " slots");
  const auto src = k.scalar_type(), dst = kv_cache.scalar_type();
  if (src == dst) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dst, "write_kv",
                                    [&] { store<scalar_t, scalar_t>(k, v, slots, tokens, kv_cache); });
  } else if (src == at::kFloat && dst == at::kBFloat16) {
    store<float, c10::BFloat16>(k, v, slots, tokens, kv_cache);
  } else if (src == at::kFloat && dst == at::kHalf) {
    store<float, c10::Half>(k, v, slots, tokens, kv_cache);
  } else {
    TORCH_CHECK(false, "write_kv: ", src, " K/V into a ", dst, " cache is not supported");
  }
}
