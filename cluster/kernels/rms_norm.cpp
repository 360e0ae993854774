// Fused residual add + RMSNorm for half-precision activations (CPU).
//
// torch's CPU rms_norm on bfloat16 runs as a chain of ops (upcast, pow, mean, rsqrt,
// multiply, downcast), each a separate pass and dispatch; at decode sizes the dispatch
// dominates. Here one pass per row: residual += x (when given), then
// out = weight * x / sqrt(mean(x^2) + eps), accumulating in float32.
#include "aten_lite.h"
#include <cmath>

template <typename scalar_t>
static void norm_rows(const scalar_t* x, scalar_t* residual, const scalar_t* weight, scalar_t* out,
                      int64_t rows, int64_t hidden, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(hidden);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* xr = x + r * hidden;
      float sum = 0.f;
      for (int64_t i = 0; i < hidden; ++i) {
        float v = static_cast<float>(xr[i]);
        if (residual != nullptr) {
          v += static_cast<float>(residual[r * hidden + i]);
          residual[r * hidden + i] = static_cast<scalar_t>(v);
          v = static_cast<float>(residual[r * hidden + i]);  // normalise what the residual holds
        }
        buf[i] = v;
        sum += v * v;
      }
      const float inv = 1.f / std::sqrt(sum / static_cast<float>(hidden) + eps);
      for (int64_t i = 0; i < hidden; ++i) {
        out[r * hidden + i] = static_cast<scalar_t>(static_cast<float>(weight[i]) * (buf[i] * inv));
      }
    }
  });
}

// x: [rows, hidden]; residual: [rows, hidden] updated in place, or an empty tensor for none.
at::Tensor rms_norm(at::Tensor x, at::Tensor residual, at::Tensor weight, double eps) {
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "rms_norm needs contiguous inputs");
  const bool has_residual = residual.numel() > 0;
  TORCH_CHECK(!has_residual || (residual.is_contiguous() && residual.sizes() == x.sizes()),
              "residual must match x");
  const int64_t hidden = x.size(-1), rows = x.numel() / hidden;
  auto out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    norm_rows<scalar_t>(x.data_ptr<scalar_t>(), has_residual ? residual.data_ptr<scalar_t>() : nullptr,
                        weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, hidden,
                        static_cast<float>(eps));
  });
  return out;
}
