// SwiGLU's activation, silu(gate) * up, in one pass (CPU, 16-bit floats).
//
// The MLP's merged projection returns [T, 2I] (gate, then up); torch runs silu over the gate
// half into a new tensor and multiplies that by the up half into another: three passes over
// T x I values and two allocations of that size per layer. Here each row is read once and its
// output written once. silu is computed in float32 and rounded to the activation dtype before
// the multiply, where torch's silu rounds it. bfloat16 is widened and rounded with integer ops
// so the loops vectorise (c10::BFloat16's conversions do not).
#include "aten_lite.h"

#include <cmath>
#include <cstring>
#include <vector>

namespace {

inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline uint16_t float_to_bf16_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);  // nearest, ties to even
}

void silu_mul_bf16(const uint16_t* gate_up, uint16_t* out, int64_t rows, int64_t inter) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint16_t* gate = gate_up + r * 2 * inter;
      const uint16_t* up = gate + inter;
      uint16_t* o = out + r * inter;
#pragma omp simd
      for (int64_t i = 0; i < inter; ++i) {
        const float g = bf16_bits_to_float(gate[i]);
        const float act = bf16_bits_to_float(float_to_bf16_bits(g / (1.f + std::exp(-g))));
        o[i] = float_to_bf16_bits(act * bf16_bits_to_float(up[i]));
      }
    }
  });
}

template <typename scalar_t>
void silu_mul_rows(const scalar_t* gate_up, scalar_t* out, int64_t rows, int64_t inter) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* gate = gate_up + r * 2 * inter;
      const scalar_t* up = gate + inter;
      scalar_t* o = out + r * inter;
      for (int64_t i = 0; i < inter; ++i) {
        const float g = static_cast<float>(gate[i]);
        const float act = static_cast<float>(static_cast<scalar_t>(g / (1.f + std::exp(-g))));
        o[i] = static_cast<scalar_t>(act * static_cast<float>(up[i]));
      }
    }
  });
}

}  // namespace

// gate_up: [T, 2I] contiguous -> [T, I].
at::Tensor silu_and_mul(at::Tensor gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.is_contiguous() && gate_up.size(1) % 2 == 0,
              "silu_and_mul: gate_up must be a contiguous [T, 2I] tensor");
  const int64_t rows = gate_up.size(0), inter = gate_up.size(1) / 2;
  auto out = at::empty({rows, inter}, gate_up.options());
  if (gate_up.scalar_type() == at::kBFloat16) {
    silu_mul_bf16(reinterpret_cast<const uint16_t*>(gate_up.data_ptr()), reinterpret_cast<uint16_t*>(out.data_ptr()),
                  rows, inter);
    return out;
  }
  AT_DISPATCH_REDUCED_FLOATING_TYPES(gate_up.scalar_type(), "silu_and_mul", [&] {
    silu_mul_rows<scalar_t>(gate_up.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, inter);
  });
  return out;
}
