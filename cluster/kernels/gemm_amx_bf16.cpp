// y = x W^T (+ b) in bfloat16 with AMX tiles for decode-sized batches (5-64 rows): a decode step's
// linears (CPU, Xeons with AMX-BF16).
//
// At these sizes a linear is a stream of its weight: 30 layers of SmolLM2 are 212 MB against a few
// MB of activations. oneDNN's AMX kernels read them at 11-13 GB/s when they come from memory, as
// they do in a decode step (the KV cache streams through the caches in between), a third of what
// two cores can read. Here the weight is packed once at load into the tiles' own layout, each
// 16 x 32 block of W one contiguous 1 KB B tile ([N / 16][K / 32][16 k pairs][16 n][2], pack_amx_bf16),
// so a thread's share (whole 32-column panels, split over the threads) is one sequential stream.
// Per panel of 32 columns and 32 rows of x at a time: four float32 accumulator tiles (2 x 2), the
// k loop loading two x tiles and two weight tiles per step (the weight prefetched into L2 two
// steps ahead); more rows re-read the panel's weights from L2, not memory. Products are exact and
// sums float32, rounded once to bfloat16 with the bias added first, as oneDNN does; the order of
// the sums may differ from oneDNN's by a rounding step.
//
// Built where the compiler targets AVX512-BF16 and AMX-BF16 (-march=native) on Linux; used where
// the kernel grants the tile state. Elsewhere has_gemm_amx_bf16() is false and oneDNN runs.
#include "aten_lite.h"

#include <algorithm>
#include <cstring>
#include <optional>

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AMX_TILE__) && \
    defined(__AMX_BF16__) && defined(__linux__)
#include <immintrin.h>

#include "amx.h"

namespace {

constexpr int64_t kMaxRows = 64;

void configure_tiles() {
  TileConfig config{};
  config.palette_id = 1;
  for (int i = 0; i < 8; ++i) config.rows[i] = 16, config.colsb[i] = 64;  // every tile [16, 64 bytes]
  _tile_loadconfig(&config);
}

// Accumulators 0-3: (rows m0, panel block 0), (m0, 1), (m0 + 16, 0), (m0 + 16, 1); x tiles 4-5, W 6-7.
// ``two_rows`` / ``two_blocks``: whether the second row block / column block exists.
inline void panel_step(const uint16_t* x0, const uint16_t* x1, const uint16_t* w0, const uint16_t* w1, int x_stride,
                       bool two_rows, bool two_blocks) {
  _tile_loadd(4, x0, x_stride);
  _tile_loadd(6, w0, 64);
  _tile_dpbf16ps(0, 4, 6);
  if (two_blocks) {
    _tile_loadd(7, w1, 64);
    _tile_dpbf16ps(1, 4, 7);
  }
  if (two_rows) {
    _tile_loadd(5, x1, x_stride);
    _tile_dpbf16ps(2, 5, 6);
    if (two_blocks) _tile_dpbf16ps(3, 5, 7);
  }
}

// How many k steps ahead the first pass over a panel prefetches its weight tiles into L2. The
// hardware prefetcher alone left the memory stream idle while the tiles multiplied: over 30 layers
// and the head (2-core Xeon, cold weights) 32 rows 11.1 -> 9.9 ms, 48 rows 12.9 -> 11.9, 64 rows
// 14.2 -> 13.1, 16 rows and fewer unchanged (9.5-9.6); 3 or 4 steps ahead the same, into L1 worse.
constexpr int64_t kAhead = 2;

inline void prefetch_tile(const uint16_t* tile) {
  const char* p = reinterpret_cast<const char*>(tile);
  for (int line = 0; line < 16; ++line) _mm_prefetch(p + line * 64, _MM_HINT_T1);
}

// float32 accumulator rows [16][16] (+ bias) -> bfloat16 output rows, ``rows`` of them.
inline void write_block(const float* acc, const float* bias, int rows, uint16_t* y, int64_t y_stride) {
  const __m512 b = bias != nullptr ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
  for (int r = 0; r < rows; ++r)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + r * y_stride),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(_mm512_load_ps(acc + r * 16), b)));
}

}  // namespace

bool has_gemm_amx_bf16() { return amx_ready(); }

at::Tensor pack_amx_bf16(at::Tensor weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16 && weight.is_contiguous(),
              "pack_amx_bf16 needs a contiguous bfloat16 [N, K] weight");
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(n % 16 == 0 && k % 32 == 0, "pack_amx_bf16: N must be a multiple of 16 and K of 32, got [", n, ", ",
              k, "]");
  auto packed = at::empty({n / 16, k / 32, 16, 32}, weight.options());
  const auto* w = reinterpret_cast<const uint32_t*>(weight.data_ptr());  // bf16 pairs along K
  auto* out = reinterpret_cast<uint32_t*>(packed.data_ptr());
  const int64_t kb_count = k / 32, pairs = k / 2;
  at::parallel_for(0, n / 16, 1, [&](int64_t a, int64_t z) {
    for (int64_t nb = a; nb < z; ++nb)
      for (int64_t kb = 0; kb < kb_count; ++kb) {
        uint32_t* tile = out + (nb * kb_count + kb) * 256;  // [16 k pairs][16 n], a pair a 32-bit word
        for (int p = 0; p < 16; ++p)
          for (int c = 0; c < 16; ++c) tile[p * 16 + c] = w[(nb * 16 + c) * pairs + kb * 16 + p];
      }
  });
  return packed;
}

at::Tensor gemm_amx_bf16(at::Tensor x, at::Tensor packed, c10::optional<at::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.stride(1) == 1,
              "gemm_amx_bf16 needs bfloat16 x [M, K], its last dimension contiguous");
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == at::kBFloat16 && packed.size(2) == 16 &&
              packed.size(3) == 32 && packed.is_contiguous(), "gemm_amx_bf16: packed must come from pack_amx_bf16");
  const int64_t m = x.size(0), k = x.size(1), nb_count = packed.size(0), kb_count = packed.size(1), n = nb_count * 16;
  TORCH_CHECK(k == kb_count * 32, "gemm_amx_bf16: x has K = ", k, ", the packed weight ", kb_count * 32);
  TORCH_CHECK(m <= kMaxRows, "gemm_amx_bf16: at most ", kMaxRows, " rows, got ", m);
  const float* bias_f = nullptr;
  at::Tensor bias32;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "gemm_amx_bf16: bias must be [N]");
    bias32 = bias->to(at::kFloat).contiguous();
    bias_f = bias32.data_ptr<float>();
  }
  TORCH_CHECK(amx_ready(), "gemm_amx_bf16: the kernel did not grant AMX tile state");
  auto y = at::empty({m, n}, x.options());
  if (m == 0) return y;
  // x as whole 16-row tiles: rows past M zero (a copy only when M is not a multiple of 16)
  const int64_t m16 = (m + 15) / 16 * 16;
  at::Tensor xs = x;
  if (m16 != m || x.stride(0) != k) {
    xs = at::empty({m16, k}, x.options());
    auto* dst = reinterpret_cast<uint16_t*>(xs.data_ptr());
    for (int64_t r = 0; r < m; ++r)
      std::memcpy(dst + r * k, reinterpret_cast<const uint16_t*>(x.data_ptr()) + r * x.stride(0), k * 2);
    std::memset(dst + m * k, 0, (m16 - m) * k * 2);
  }
  const auto* xp = reinterpret_cast<const uint16_t*>(xs.data_ptr());
  const auto* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr());
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  const int x_stride = static_cast<int>(k * 2);
  const int64_t panels = (nb_count + 1) / 2;  // 32 columns each (the last may hold one block)
  at::parallel_for(0, panels, 1, [&](int64_t a, int64_t z) {
    configure_tiles();
    alignas(64) float acc[4][16 * 16];
    for (int64_t panel = a; panel < z; ++panel) {
      const int64_t nb0 = panel * 2;
      const bool two_blocks = nb0 + 1 < nb_count;
      const uint16_t* w0 = wp + nb0 * kb_count * 512;
      const uint16_t* w1 = w0 + kb_count * 512;
      for (int64_t m0 = 0; m0 < m16; m0 += 32) {
        const bool two_rows = m0 + 16 < m16;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        const uint16_t* x0 = xp + m0 * k;
        const uint16_t* x1 = x0 + 16 * k;
        for (int64_t kb = 0; kb < kb_count; ++kb) {
          if (m0 == 0) {  // the weight two steps ahead, into the next panel near the end of this one
            const int64_t ahead = kb + kAhead;
            if (ahead < kb_count) {
              prefetch_tile(w0 + ahead * 512);
              if (two_blocks) prefetch_tile(w1 + ahead * 512);
            } else if (panel + 1 < z && ahead - kb_count < kb_count) {  // the thread's next panel
              const uint16_t* next0 = w0 + 2 * kb_count * 512;
              const uint16_t* next1 = next0 + kb_count * 512;
              prefetch_tile(next0 + (ahead - kb_count) * 512);
              if (nb0 + 3 < nb_count) prefetch_tile(next1 + (ahead - kb_count) * 512);
            }
          }
          panel_step(x0 + kb * 32, x1 + kb * 32, w0 + kb * 512, w1 + kb * 512, x_stride, two_rows, two_blocks);
        }
        _tile_stored(0, acc[0], 64);
        if (two_blocks) _tile_stored(1, acc[1], 64);
        if (two_rows) {
          _tile_stored(2, acc[2], 64);
          if (two_blocks) _tile_stored(3, acc[3], 64);
        }
        const int rows0 = static_cast<int>(std::min<int64_t>(16, m - m0));
        const int rows1 = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(16, m - m0 - 16)));
        for (int blk = 0; blk < (two_blocks ? 2 : 1); ++blk) {
          const int64_t col = (nb0 + blk) * 16;
          const float* b = bias_f != nullptr ? bias_f + col : nullptr;
          write_block(acc[blk], b, rows0, yp + m0 * n + col, n);
          if (rows1 > 0) write_block(acc[2 + blk], b, rows1, yp + (m0 + 16) * n + col, n);
        }
      }
    }
    _tile_release();
  });
  return y;
}

#else

bool has_gemm_amx_bf16() { return false; }

at::Tensor pack_amx_bf16(at::Tensor weight) {
  TORCH_CHECK(false, "pack_amx_bf16: built without AVX512-BF16 and AMX-BF16");
}

at::Tensor gemm_amx_bf16(at::Tensor x, at::Tensor packed, c10::optional<at::Tensor> bias) {
  TORCH_CHECK(false, "gemm_amx_bf16: built without AVX512-BF16 and AMX-BF16");
}

#endif
