// y = x W^T (+ b) in float32 over a weight packed once into column panels: CPU linears of more than
// a few rows (prefill chunks, decode steps of many sequences) where float32 is the dtype (AVX2-only
// CPUs run float32: dtype "auto").
//
// The weight [N, K] is re-laid once, after loading, as panels of 16 output columns: panel p holds
// W[16p .. 16p + 15, k] for every k as 16 consecutive floats (the last panel zero-padded). A
// register tile of 5-6 activation rows by one panel (12 accumulators) then runs down k with two
// loads of the panel and one broadcast of each row's x[m, k] feeding two FMAs per row: no
// horizontal sums, no re-layout per call. Each panel is read from memory once, the next one
// prefetched a line at a time spread over all of this panel's tiles (issued all in the first tile,
// the prefetches outran the memory: 34 rows 47.1 -> 39.6 ms below), and reused from cache by the
// other tiles. All of SmolLM2's layer weights, 2-core AMD EPYC (AVX2; 102 GFLOP/s a core of FMAs),
// one run, ms: 34 rows 49.6 (torch's float32 linear, MKL, 110.5; the row-blocked gemv_f32 81.3), 256
// rows 374 (MKL 478), 1,024 rows 1,514 (MKL 1,493); at a quieter moment 39.6 ms at 34 rows (182
// GFLOP/s) and 1.19 s at 1,024 (docs/benchmarks.md).
//
// Each output is one FMA chain down k from zero, the same whichever tile its row falls in or how
// many rows the call has: a row's result does not depend on the rows beside it. The chain differs
// from MKL's and from gemv_f32's blocked sums (both also float32): outputs agree to rounding.
//
// gemm_f32_silu_mul: the merged gate/up projection with SwiGLU's silu(gate) * up applied to each tile
// as it leaves the registers (the gate tiles of a panel pair kept in a cache-resident scratch), so the
// [M, 2n] projection is neither written nor read back: bit-identical to gemm_f32 then silu_mul.
//
// Built where the compiler targets AVX2 and FMA (-march=native); elsewhere has_gemm_f32() is false.
#include "aten_lite.h"

#include <algorithm>
#include <vector>

namespace {
constexpr int64_t kPanel = 16;  // output columns a panel (two 8-float vectors)
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#include "avx2_math.h"

// Rows [0, MR) of x (``ldx`` floats apart) against one panel over all k: y[m, 0..15] (``ldy`` apart),
// ``cols`` of them stored (16 but in the last, padded panel). ``ahead``: where this tile's share of the
// next panel starts (``lines`` lines of 64 bytes; null where there is no next panel). ``gate``: SwiGLU,
// y = silu(gate) * (this tile's product), the gate tile [MR][16] computed just before (full panels only).
template <int MR>
static void tile(const float* __restrict x, int64_t ldx, const float* __restrict panel, int64_t k_size,
                 const float* __restrict bias, float* __restrict y, int64_t ldy, int64_t cols, const float* ahead,
                 int64_t lines, const float* __restrict gate = nullptr) {
  __m256 lo[MR], hi[MR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) lo[m] = hi[m] = _mm256_setzero_ps();
  // ``lines`` lines of the next panel from ``ahead`` on, spread evenly over the k loop.
  const int64_t every = lines > 0 ? std::max<int64_t>(1, k_size / lines) : k_size + 1;
  int64_t next_at = 0, issued = 0;
  for (int64_t k = 0; k < k_size; ++k) {
    if (k == next_at && issued < lines) {
      _mm_prefetch(reinterpret_cast<const char*>(ahead + issued * kPanel), _MM_HINT_T0);
      ++issued;
      next_at += every;
    }
    const __m256 w0 = _mm256_loadu_ps(panel + k * kPanel), w1 = _mm256_loadu_ps(panel + k * kPanel + 8);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m256 a = _mm256_broadcast_ss(x + m * ldx + k);
      lo[m] = _mm256_fmadd_ps(a, w0, lo[m]);
      hi[m] = _mm256_fmadd_ps(a, w1, hi[m]);
    }
  }
  __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
  alignas(32) float pad[kPanel];
  if (bias) {
    if (cols == kPanel) {
      b0 = _mm256_loadu_ps(bias);
      b1 = _mm256_loadu_ps(bias + 8);
    } else {
      std::fill(pad, pad + kPanel, 0.f);
      std::copy(bias, bias + cols, pad);
      b0 = _mm256_load_ps(pad);
      b1 = _mm256_load_ps(pad + 8);
    }
  }
  if (gate != nullptr) {
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      _mm256_storeu_ps(y + m * ldy, _mm256_mul_ps(silu8(_mm256_loadu_ps(gate + m * kPanel)), lo[m]));
      _mm256_storeu_ps(y + m * ldy + 8, _mm256_mul_ps(silu8(_mm256_loadu_ps(gate + m * kPanel + 8)), hi[m]));
    }
    return;
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    const __m256 v0 = _mm256_add_ps(lo[m], b0), v1 = _mm256_add_ps(hi[m], b1);
    if (cols == kPanel) {
      _mm256_storeu_ps(y + m * ldy, v0);
      _mm256_storeu_ps(y + m * ldy + 8, v1);
    } else {
      _mm256_store_ps(pad, v0);
      _mm256_store_ps(pad + 8, v1);
      std::copy(pad, pad + cols, y + m * ldy);
    }
  }
}

// All m_size rows against panel ``p``: ceil(m_size / 6) tiles as even as can be (34 rows: 6, 6, 6, 6,
// 5, 5), each prefetching its share of the next panel.
static void panel_rows(const float* x, int64_t m_size, int64_t k_size, const float* panel, const float* ahead,
                       const float* bias, float* y, int64_t n_size, int64_t cols) {
  const int64_t tiles = (m_size + 5) / 6, base = m_size / tiles, extra = m_size % tiles;
  int64_t m = 0;
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t rows = base + (t < extra ? 1 : 0);
    const float* xm = x + m * k_size;
    float* ym = y + m * n_size;
    // Every tile prefetches its share of the next panel's k_size lines (64 bytes each).
    const int64_t from = ahead ? k_size * t / tiles : 0, to = ahead ? k_size * (t + 1) / tiles : 0;
    const float* pf = ahead ? ahead + from * kPanel : nullptr;
    const int64_t lines = to - from;
    switch (rows) {
      case 1: tile<1>(xm, k_size, panel, k_size, bias, ym, n_size, cols, pf, lines); break;
      case 2: tile<2>(xm, k_size, panel, k_size, bias, ym, n_size, cols, pf, lines); break;
      case 3: tile<3>(xm, k_size, panel, k_size, bias, ym, n_size, cols, pf, lines); break;
      case 4: tile<4>(xm, k_size, panel, k_size, bias, ym, n_size, cols, pf, lines); break;
      case 5: tile<5>(xm, k_size, panel, k_size, bias, ym, n_size, cols, pf, lines); break;
      default: tile<6>(xm, k_size, panel, k_size, bias, ym, n_size, cols, pf, lines); break;
    }
    m += rows;
  }
}

// SwiGLU over a merged [gate | up] weight: gate panel ``j`` for every row tile into ``gate`` ([M][16]
// scratch, cache-resident), then up panel ``j`` (``half`` panels later) tile by tile storing
// silu(gate) * up: the [M, 2n] projection is never written out nor read back. Tiles as in panel_rows.
static void pair_rows(const float* x, int64_t m_size, int64_t k_size, const float* gate_panel,
                      const float* up_panel, const float* gate_ahead, float* gate, float* y, int64_t n_size) {
  const int64_t tiles = (m_size + 5) / 6, base = m_size / tiles, extra = m_size % tiles;
  for (int pass = 0; pass < 2; ++pass) {
    const float* panel = pass == 0 ? gate_panel : up_panel;
    // the gate pass prefetches the up panel (read next), the up pass the next pair's gate panel
    const float* ahead = pass == 0 ? up_panel : gate_ahead;
    int64_t m = 0;
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t rows = base + (t < extra ? 1 : 0);
      const float* xm = x + m * k_size;
      const int64_t from = ahead ? k_size * t / tiles : 0, to = ahead ? k_size * (t + 1) / tiles : 0;
      const float* pf = ahead ? ahead + from * kPanel : nullptr;
      const int64_t lines = to - from;
      float* gm = gate + m * kPanel;
      float* ym = y + m * n_size;
      switch (rows) {
#define LLM_CLUSTER_PAIR(R)                                                                                   \
  case R:                                                                                                     \
    if (pass == 0) tile<R>(xm, k_size, panel, k_size, nullptr, gm, kPanel, kPanel, pf, lines);                \
    else tile<R>(xm, k_size, panel, k_size, nullptr, ym, n_size, kPanel, pf, lines, gm);                      \
    break;
        LLM_CLUSTER_PAIR(1)
        LLM_CLUSTER_PAIR(2)
        LLM_CLUSTER_PAIR(3)
        LLM_CLUSTER_PAIR(4)
        LLM_CLUSTER_PAIR(5)
        LLM_CLUSTER_PAIR(6)
#undef LLM_CLUSTER_PAIR
      }
      m += rows;
    }
  }
}

bool has_gemm_f32() { return true; }

at::Tensor gemm_f32_silu_mul(at::Tensor x, at::Tensor panels, int64_t n_size) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "gemm_f32_silu_mul: x must be float32 [M, K]");
  TORCH_CHECK(n_size > 0 && n_size % kPanel == 0, "gemm_f32_silu_mul: n (gate and up each) must be a positive "
              "multiple of 16, got ", n_size);
  TORCH_CHECK(panels.dim() == 3 && panels.scalar_type() == at::kFloat && panels.is_contiguous() &&
                  panels.size(2) == kPanel && panels.size(1) == x.size(1) && panels.size(0) == 2 * n_size / kPanel,
              "gemm_f32_silu_mul: panels must be float32 [2n / 16, K, 16] from pack_f32 of a [gate | up] weight");
  TORCH_CHECK(x.size(1) > 0, "gemm_f32_silu_mul: x has no columns");
  x = x.contiguous();
  const int64_t m_size = x.size(0), k_size = x.size(1), half = n_size / kPanel;
  auto y = at::empty({m_size, n_size}, x.options());
  if (m_size == 0) return y;
  const float* xp = x.data_ptr<float>();
  const float* wp = panels.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t panel_floats = k_size * kPanel;
  at::parallel_for(0, half, 1, [&](int64_t j0, int64_t j1) {
    std::vector<float> gate(m_size * kPanel);  // one pair's gate tile column, reused
    for (int64_t j = j0; j < j1; ++j) {
      const float* gate_panel = wp + j * panel_floats;
      const float* up_panel = wp + (half + j) * panel_floats;
      const bool next = j + 1 < j1;
      pair_rows(xp, m_size, k_size, gate_panel, up_panel, next ? gate_panel + panel_floats : nullptr, gate.data(),
                yp + j * kPanel, n_size);
    }
  });
  return y;
}

at::Tensor gemm_f32(at::Tensor x, at::Tensor panels, int64_t n_size, std::optional<at::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "gemm_f32: x must be float32 [M, K]");
  TORCH_CHECK(panels.dim() == 3 && panels.scalar_type() == at::kFloat && panels.is_contiguous() &&
                  panels.size(2) == kPanel && panels.size(1) == x.size(1),
              "gemm_f32: panels must be float32 [ceil(N / 16), K, 16] from pack_f32");
  TORCH_CHECK(n_size > (panels.size(0) - 1) * kPanel && n_size <= panels.size(0) * kPanel,
              "gemm_f32: n_size ", n_size, " does not match ", panels.size(0), " panels");
  x = x.contiguous();
  const int64_t m_size = x.size(0), k_size = x.size(1), count = panels.size(0);
  at::Tensor bias_c;
  if (bias.has_value() && bias->defined()) {
    bias_c = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(bias_c.numel() == n_size, "gemm_f32: bias must have ", n_size, " values");
  }
  TORCH_CHECK(k_size > 0, "gemm_f32: x has no columns");
  auto y = at::empty({m_size, n_size}, x.options());
  if (m_size == 0) return y;
  const float* xp = x.data_ptr<float>();
  const float* wp = panels.data_ptr<float>();
  const float* bp = bias_c.defined() ? bias_c.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, count, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const float* panel = wp + p * k_size * kPanel;
      const float* ahead = p + 1 < p1 ? panel + k_size * kPanel : nullptr;
      panel_rows(xp, m_size, k_size, panel, ahead, bp ? bp + p * kPanel : nullptr, yp + p * kPanel, n_size,
                 std::min(kPanel, n_size - p * kPanel));
    }
  });
  return y;
}

#else

bool has_gemm_f32() { return false; }

at::Tensor gemm_f32_silu_mul(at::Tensor x, at::Tensor panels, int64_t n_size) {
  TORCH_CHECK(false, "gemm_f32_silu_mul: built without AVX2/FMA");
}

at::Tensor gemm_f32(at::Tensor x, at::Tensor panels, int64_t n_size, std::optional<at::Tensor> bias) {
  TORCH_CHECK(false, "gemm_f32: built without AVX2/FMA");
}

#endif

// The weight [N, K] as panels [ceil(N / 16), K, 16]: panel p, row k = W[16p .. 16p + 15, k], zeros
// past N. Plain C++ (it runs once a weight, after loading).
at::Tensor pack_f32(at::Tensor weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat, "pack_f32: weight must be float32 [N, K]");
  weight = weight.contiguous();
  const int64_t n_size = weight.size(0), k_size = weight.size(1), count = (n_size + kPanel - 1) / kPanel;
  auto panels = at::empty({count, k_size, kPanel}, weight.options());
  const float* w = weight.data_ptr<float>();
  float* out = panels.data_ptr<float>();
  at::parallel_for(0, count, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t k = 0; k < k_size; ++k)
        for (int64_t j = 0; j < kPanel; ++j) {
          const int64_t n = p * kPanel + j;
          out[(p * k_size + k) * kPanel + j] = n < n_size ? w[n * k_size + k] : 0.f;
        }
  });
  return panels;
}
