// Rotary position embedding applied in place to the query and key heads (CPU).
//
// torch's rotate-half formula, x * cos + cat(-x2, x1) * sin, runs as five ops over the step's
// q and k heads (chunk, neg + cat, two multiplies, add), each a full pass that allocates its
// output. Here one pass per token rewrites each head where it lies in the QKV projection's
// output. Every product and the sum are rounded to the activation dtype exactly where torch's
// ops round them, so in 16-bit the result is bit-identical to the torch path (in float32 the
// compiler may fuse a product into the sum, one rounding fewer). bfloat16 is widened and
// rounded with integer ops so the loops vectorise (c10::BFloat16's conversions do not).
#include "aten_lite.h"

#include <cstring>
#include <vector>

namespace {

// 16-bit <-> float. bfloat16 by integer ops (nearest, ties to even), which vectorise where
// c10::BFloat16's conversions do not; float16 through c10::Half.
template <typename scalar_t>
inline float widen(scalar_t x) {
  return static_cast<float>(x);
}

template <>
inline float widen<c10::BFloat16>(c10::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <typename scalar_t>
inline scalar_t narrow(float f) {
  return static_cast<scalar_t>(f);
}

template <>
inline c10::BFloat16 narrow<c10::BFloat16>(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return c10::BFloat16(static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16), c10::BFloat16::from_bits());
}

// Rounds a float to the nearest value of the activation dtype, as a float (where torch's op rounds).
template <typename scalar_t>
inline float round_through(float f) {
  return widen(narrow<scalar_t>(f));
}

template <typename scalar_t>
void rotate_rows(scalar_t* x, int64_t tokens, int64_t heads, int64_t head_dim, int64_t token_stride,
                 const scalar_t* cos, const scalar_t* sin, int64_t table_stride) {
  const int64_t half = head_dim / 2;
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> c(half), s(half);
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t i = 0; i < half; ++i) {  // cos/sin rows hold each frequency twice: read one half
        c[i] = widen(cos[t * table_stride + i]);
        s[i] = widen(sin[t * table_stride + i]);
      }
      for (int64_t h = 0; h < heads; ++h) {
        scalar_t* x1 = x + t * token_stride + h * head_dim;
        scalar_t* x2 = x1 + half;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float a = widen(x1[i]), b = widen(x2[i]);
          const float first = round_through<scalar_t>(a * c[i]) + round_through<scalar_t>(-b * s[i]);
          const float second = round_through<scalar_t>(b * c[i]) + round_through<scalar_t>(a * s[i]);
          x1[i] = narrow<scalar_t>(first);
          x2[i] = narrow<scalar_t>(second);
        }
      }
    }
  });
}

}  // namespace

// x: [T, H, D] with unit stride over D and D over heads (any token stride), rotated in place;
// cos, sin: [T, 1, D] (or [T, D]) rows of the step's positions, each frequency twice.
void rotary_(at::Tensor x, at::Tensor cos, at::Tensor sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2), "rotary_: x must be [T, H, D] with "
              "contiguous heads");
  TORCH_CHECK(x.size(2) % 2 == 0, "rotary_: head size must be even");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.sizes() == sin.sizes(), "rotary_: cos and sin "
              "must be contiguous and alike");
  TORCH_CHECK(cos.size(0) == x.size(0) && cos.size(-1) == x.size(2), "rotary_: one cos/sin row per token");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(),
              "rotary_: cos and sin must have x's dtype");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rotary_", [&] {
    rotate_rows<scalar_t>(x.data_ptr<scalar_t>(), x.size(0), x.size(1), x.size(2), x.stride(0),
                          cos.data_ptr<scalar_t>(), sin.data_ptr<scalar_t>(), cos.size(-1));
  });
}
