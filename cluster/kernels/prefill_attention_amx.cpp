// Causal attention of a prompt chunk over its context in bfloat16 with AMX tiles (CPU): the prefill
// half of a step on CPUs with AMX-BF16 (Intel Xeon from Sapphire Rapids on).
//
// The same contract as prefill_attention (float32, AVX2): query i of the chunk (position q_offset + i)
// sees keys 0 .. q_offset + i of the context [S, Hkv, D]; one causal pass, no mask or score matrix
// built, a chunk after a cached prefix one pass rather than two merged ones. Everything is computed
// transposed, so that each key's scores for 16 queries are one vector and the softmax needs no
// horizontal reduction:
//   S^T [16 keys, 16 queries] = K [16 keys, D] x Q^T        (A: K rows as stored, B: Q^T as bf16 pairs)
//   O^T [D, 16 queries]      += V^T [D, 32 keys] x P^T      (A: V^T, B: P^T as bf16 pairs)
// Per KV head the keys are copied once into a dense [S, D] run and the values into V^T [D, S]; the
// query rows sharing that head (positions x the group's query heads, position-major) are cut into
// tiles of 16, dealt round-robin to the threads. A tile keeps Q^T in tile registers and walks its
// visible keys in windows of 128: scores by tdpbf16ps (products exact, sums in float32), one
// online-softmax update per window in float32 (2^x, scores scaled into log2 units), P rounded to
// bfloat16 as torch's flash attention rounds it, then P x V into the float32 accumulator: at D = 64
// it stays in tiles and is rescaled (through memory) only for a window where a lane's maximum grew;
// at D = 128 a tile at a time, rescaled and added in memory. Against torch's CPU flash attention:
// docs/benchmarks.md.
//
// Built where the compiler targets AVX512-BF16 and AMX-BF16 (-march=native) on Linux; used where
// the kernel grants the tile state (arch_prctl). Elsewhere has_prefill_attention_amx() is false and
// the torch path runs.
#include "aten_lite.h"

#include <algorithm>
#include <cstring>
#include <memory>

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AMX_TILE__) && \
    defined(__AMX_BF16__) && defined(__linux__)
#define LLM_CLUSTER_AMX 1
#include <immintrin.h>

#include "amx.h"
#include "avx512_math.h"

namespace {

constexpr int kTile = 16;     // queries a tile; keys a score tile
constexpr int kWindow = 128;  // keys an online-softmax update
constexpr float kNoScore = -1e30f;  // finite: the extension builds with -ffast-math

// Tile registers (the intrinsics take literal numbers, hence macros). Scores in 0, keys in 1 (K is
// reloaded for every use). D = 64: Q^T's two 32-dim slices sit in 4-5 and O^T stays in 2, 3, 6, 7
// (16 dimensions each) through all windows; P x V loads P^T into 1 and values into 0, 4, 5, so Q^T
// is reloaded a window. D = 128: Q^T takes 4-7; P x V a tile at a time (values 3, P^T 1, O^T 2),
// added to O^T in memory.
#define LLM_TILE_SCORES 0
#define LLM_TILE_KEYS 1
#define LLM_TILE_ACC 2
#define LLM_TILE_VALUES 3

void configure_tiles() {
  TileConfig config{};
  config.palette_id = 1;
  for (int i = 0; i < 8; ++i) config.rows[i] = 16, config.colsb[i] = 64;  // every tile [16, 64 bytes]
  _tile_loadconfig(&config);
}

// One KV head's context as the tiles read it: keys [S16][D] (zero rows to a multiple of 16) and values
// transposed [D][S32] (zero columns to a multiple of 32).
struct Context {
  const uint16_t* keys;
  const uint16_t* values_t;
  int64_t s32;
};

struct Scratch {
  alignas(64) float scores[kWindow * kTile];        // S^T of a window, a key's 16 scores a row
  alignas(64) uint16_t probs[kWindow * kTile];      // P^T as bf16 pairs [window / 2][16 queries][2]
  alignas(64) uint16_t query[128 * kTile];          // Q^T as bf16 pairs [D / 32][16][16][2]
  alignas(64) float acc[128 * kTile];               // O^T [D][16 queries], float32
  alignas(64) float block[kTile * kTile];           // one P x V tile read back
};

// Scores of keys [first, first + 16 * groups) for the loaded queries, into w.scores rows from 0.
template <int D>
inline void score_keys(const Context& ctx, int64_t first, int groups, Scratch& w) {
  for (int j = 0; j < groups; ++j) {
    const uint16_t* k = ctx.keys + (first + j * kTile) * D;
#define LLM_CLUSTER_SCORE(S)                                                 \
    _tile_zero(S);                                                           \
    _tile_loadd(LLM_TILE_KEYS, k, D * 2);                                    \
    _tile_dpbf16ps(S, LLM_TILE_KEYS, 4);                                     \
    _tile_loadd(LLM_TILE_KEYS, k + 32, D * 2);                               \
    _tile_dpbf16ps(S, LLM_TILE_KEYS, 5);                                     \
    if constexpr (D == 128) {                                                \
      _tile_loadd(LLM_TILE_KEYS, k + 64, D * 2);                             \
      _tile_dpbf16ps(S, LLM_TILE_KEYS, 6);                                   \
      _tile_loadd(LLM_TILE_KEYS, k + 96, D * 2);                             \
      _tile_dpbf16ps(S, LLM_TILE_KEYS, 7);                                   \
    }                                                                        \
    _tile_stored(S, w.scores + j * kTile * kTile, 64);
    LLM_CLUSTER_SCORE(LLM_TILE_SCORES)
#undef LLM_CLUSTER_SCORE
  }
}

// One query tile: Q^T already in w.query, query lane n sees keys [0, limit[n]).
template <int D>
void query_tile(const Context& ctx, const int32_t* limit, float scale_log2, Scratch& w, uint16_t* const* out,
                int rows) {
  _tile_loadd(4, w.query, 64);
  _tile_loadd(5, w.query + kTile * kTile * 2, 64);
  if constexpr (D == 128) {
    _tile_loadd(6, w.query + 2 * kTile * kTile * 2, 64);
    _tile_loadd(7, w.query + 3 * kTile * kTile * 2, 64);
    std::fill(w.acc, w.acc + D * kTile, 0.f);
  } else {  // O^T stays in tiles 2, 3, 6, 7 (16 dimensions each) through every window
    _tile_zero(2);
    _tile_zero(3);
    _tile_zero(6);
    _tile_zero(7);
  }
  const __m512i lim = _mm512_loadu_si512(limit);
  int32_t lo = limit[0], hi = limit[0];
  for (int n = 1; n < kTile; ++n) lo = std::min(lo, limit[n]), hi = std::max(hi, limit[n]);
  const __m512 c = _mm512_set1_ps(scale_log2), none = _mm512_set1_ps(kNoScore);
  // bf16 pairs: element 2n + j of a P^T row is lane n of key 2r + j
  alignas(64) static constexpr uint16_t kInterleave[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                            8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i interleave = _mm512_load_si512(kInterleave);
  __m512 running_max = none, running_sum = _mm512_setzero_ps();
  for (int64_t w0 = 0; w0 < hi; w0 += kWindow) {
    const int keys = static_cast<int>(std::min<int64_t>(kWindow, hi - w0));
    const int groups = (keys + kTile - 1) / kTile, keys32 = (keys + 31) / 32 * 32;
    if (D == 64 && w0 > 0) {  // the last window's P x V loaded values into Q^T's tiles
      _tile_loadd(4, w.query, 64);
      _tile_loadd(5, w.query + kTile * kTile * 2, 64);
    }
    score_keys<D>(ctx, w0, groups, w);
    // The window's maximum, masking keys at or past each lane's limit (only near the diagonal).
    __m512 window_max = none;
    if (w0 + keys32 > lo) {
      for (int j = 0; j < keys32; ++j) {
        float* row = w.scores + j * kTile;
        __m512 s = j < groups * kTile ? _mm512_load_ps(row) : none;
        s = _mm512_mask_mov_ps(none, _mm512_cmpgt_epi32_mask(lim, _mm512_set1_epi32(static_cast<int>(w0) + j)), s);
        _mm512_store_ps(row, s);
        window_max = _mm512_max_ps(window_max, s);
      }
    } else {  // a full window (128 keys, every one visible to every lane)
      __m512 m2 = none;
      for (int j = 0; j < kWindow; j += 2) {
        window_max = _mm512_max_ps(window_max, _mm512_load_ps(w.scores + j * kTile));
        m2 = _mm512_max_ps(m2, _mm512_load_ps(w.scores + (j + 1) * kTile));
      }
      window_max = _mm512_max_ps(window_max, m2);
    }
    const __m512 new_max = _mm512_max_ps(running_max, window_max);
    const __m512 correction = exp2_nonpositive(_mm512_mul_ps(_mm512_sub_ps(running_max, new_max), c));
    const __m512 shift = _mm512_mul_ps(new_max, c);
    const __mmask16 grew = _mm512_cmp_ps_mask(new_max, running_max, _CMP_GT_OQ);
    running_max = new_max;
    __m512 total = _mm512_setzero_ps();
    for (int r = 0; r < keys32 / 2; ++r) {
      const __m512 p0 = exp2_nonpositive_bf16(_mm512_fmsub_ps(_mm512_load_ps(w.scores + 2 * r * kTile), c, shift));
      const __m512 p1 =
          exp2_nonpositive_bf16(_mm512_fmsub_ps(_mm512_load_ps(w.scores + (2 * r + 1) * kTile), c, shift));
      total = _mm512_add_ps(total, _mm512_add_ps(p0, p1));
      const __m512i pair = (__m512i)_mm512_cvtne2ps_pbh(p1, p0);  // p0 low half, p1 high
      _mm512_store_si512(w.probs + r * 2 * kTile, _mm512_permutexvar_epi16(interleave, pair));
    }
    running_sum = _mm512_fmadd_ps(running_sum, correction, total);
    if constexpr (D == 64) {
      // A lane whose maximum grew rescales what its accumulator holds (once the first window is in:
      // zeros before); past the first windows the maximum seldom moves, and the sums stay in tiles.
      if (w0 > 0 && grew) {
        _tile_stored(2, w.acc, 64);
        _tile_stored(3, w.acc + 16 * kTile, 64);
        _tile_stored(6, w.acc + 32 * kTile, 64);
        _tile_stored(7, w.acc + 48 * kTile, 64);
#pragma GCC unroll 8
        for (int i = 0; i < D; ++i)
          _mm512_store_ps(w.acc + i * kTile, _mm512_mul_ps(_mm512_load_ps(w.acc + i * kTile), correction));
        _tile_loadd(2, w.acc, 64);
        _tile_loadd(3, w.acc + 16 * kTile, 64);
        _tile_loadd(6, w.acc + 32 * kTile, 64);
        _tile_loadd(7, w.acc + 48 * kTile, 64);
      }
      // P x V: each 32 keys' P^T loaded once for the four output tiles; values through tiles 0, 4, 5
      // (scores and Q^T are not needed again until the next window)
      const uint16_t* values = ctx.values_t + w0;
      const int stride = static_cast<int>(ctx.s32 * 2);
      for (int k = 0; k < keys32; k += 32) {
        _tile_loadd(LLM_TILE_KEYS, w.probs + k * kTile, 64);
        _tile_loadd(0, values + k, stride);
        _tile_dpbf16ps(2, 0, LLM_TILE_KEYS);
        _tile_loadd(4, values + 16 * ctx.s32 + k, stride);
        _tile_dpbf16ps(3, 4, LLM_TILE_KEYS);
        _tile_loadd(5, values + 32 * ctx.s32 + k, stride);
        _tile_dpbf16ps(6, 5, LLM_TILE_KEYS);
        _tile_loadd(0, values + 48 * ctx.s32 + k, stride);
        _tile_dpbf16ps(7, 0, LLM_TILE_KEYS);
      }
      continue;
    }
    // D = 128: P x V, 16 output dimensions a tile, then acc = acc * correction + tile.
    for (int d = 0; d < D; d += kTile) {
      _tile_zero(LLM_TILE_ACC);
      for (int k = 0; k < keys32; k += 32) {
        _tile_loadd(LLM_TILE_VALUES, ctx.values_t + d * ctx.s32 + w0 + k, static_cast<int>(ctx.s32 * 2));
        _tile_loadd(LLM_TILE_KEYS, w.probs + k * kTile, 64);
        _tile_dpbf16ps(LLM_TILE_ACC, LLM_TILE_VALUES, LLM_TILE_KEYS);
      }
      _tile_stored(LLM_TILE_ACC, w.block, 64);
#pragma GCC unroll 16
      for (int i = 0; i < kTile; ++i) {
        float* a = w.acc + (d + i) * kTile;
        _mm512_store_ps(a, _mm512_fmadd_ps(_mm512_load_ps(a), correction, _mm512_load_ps(w.block + i * kTile)));
      }
    }
  }
  if constexpr (D == 64) {
    _tile_stored(2, w.acc, 64);
    _tile_stored(3, w.acc + 16 * kTile, 64);
    _tile_stored(6, w.acc + 32 * kTile, 64);
    _tile_stored(7, w.acc + 48 * kTile, 64);
  }
  // out[n] = O^T's column n / its sum: 16 dimensions at a time, transposed in registers.
  const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.f), running_sum);
  for (int d = 0; d < D; d += kTile) {
    __m512i r[kTile];
#pragma GCC unroll 16
    for (int i = 0; i < kTile; ++i) r[i] = _mm512_castps_si512(_mm512_mul_ps(_mm512_load_ps(w.acc + (d + i) * kTile), inv));
    transpose16x16(r);
    for (int n = 0; n < rows; ++n)  // round to nearest even, as torch converts
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[n] + d), (__m256i)_mm512_cvtneps_pbh(_mm512_castsi512_ps(r[n])));
  }
}

template <int D>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t q_offset, float scale,
         at::Tensor& out) {
  const int64_t tokens = q.size(0), heads = q.size(1), keys = k.size(0), kv_heads = k.size(1);
  const int64_t group = heads / kv_heads, rows = tokens * group;
  const int64_t s16 = (keys + 15) / 16 * 16, s32 = (keys + 31) / 32 * 32;
  // Each KV head's keys as one dense run and its values transposed, zero-padded (64-byte aligned).
  auto key_runs = at::empty({kv_heads, s16, D}, q.options());
  auto values_t = at::empty({kv_heads, D, s32}, q.options());
  const auto* kp = reinterpret_cast<const uint16_t*>(k.data_ptr());
  const auto* vp = reinterpret_cast<const uint16_t*>(v.data_ptr());
  auto* key_out = reinterpret_cast<uint16_t*>(key_runs.data_ptr());
  auto* vt_out = reinterpret_cast<uint16_t*>(values_t.data_ptr());
  const int64_t k_row = k.stride(0), k_head = k.stride(1), v_row = v.stride(0), v_head = v.stride(1);
  const int64_t chunks = s32 / 32;
  at::parallel_for(0, kv_heads * chunks, 1, [&](int64_t a, int64_t z) {
    for (int64_t item = a; item < z; ++item) {
      const int64_t h = item / chunks, s0 = (item % chunks) * 32;
      for (int64_t s = s0; s < std::min(s0 + 32, s16); ++s) {
        uint16_t* dst = key_out + (h * s16 + s) * D;
        if (s < keys) std::memcpy(dst, kp + s * k_row + h * k_head, D * 2);
        else std::memset(dst, 0, D * 2);
      }
      // V^T: 16 keys x 16 dimension pairs transposed as 32-bit elements, then each pair split in two
      alignas(64) static const uint16_t kSplit[32] = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30,
                                                      1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
      const __m512i split = _mm512_load_si512(kSplit);
      for (int64_t k0 = s0; k0 < s0 + 32; k0 += 16)
        for (int c = 0; c < D; c += 32) {
          __m512i r[16];
#pragma GCC unroll 16
          for (int i = 0; i < 16; ++i)
            r[i] = k0 + i < keys ? _mm512_loadu_si512(vp + (k0 + i) * v_row + h * v_head + c) : _mm512_setzero_si512();
          transpose16x16(r);
#pragma GCC unroll 16
          for (int p = 0; p < 16; ++p) {  // r[p]: dims c + 2p (low halves) and c + 2p + 1 of the 16 keys
            const __m512i both = _mm512_permutexvar_epi16(split, r[p]);
            uint16_t* dst = vt_out + (h * D + c + 2 * p) * s32 + k0;
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_castsi512_si256(both));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + s32), _mm512_extracti64x4_epi64(both, 1));
          }
        }
    }
  });
  const int64_t tiles_per_head = (rows + kTile - 1) / kTile, tiles = kv_heads * tiles_per_head;
  const auto* qp = reinterpret_cast<const uint16_t*>(q.data_ptr());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t q_row = q.stride(0), q_head = q.stride(1);
  const float scale_log2 = scale * 1.4426950408889634f;
  const int64_t lanes = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tiles));
  at::parallel_for(0, lanes, 1, [&](int64_t a, int64_t z) {
    configure_tiles();
    auto w = std::make_unique<Scratch>();
    for (int64_t lane = a; lane < z; ++lane) {
      for (int64_t t = lane; t < tiles; t += lanes) {
        const int64_t h = t / tiles_per_head, r0 = (t % tiles_per_head) * kTile;
        const int mr = static_cast<int>(std::min<int64_t>(kTile, rows - r0));
        alignas(64) int32_t limit[kTile];
        uint16_t* dst[kTile];
        const uint16_t* src[kTile];
        for (int n = 0; n < kTile; ++n) {
          // lanes past the last row repeat it (their output is not written)
          const int64_t r = r0 + std::min(n, mr - 1), pos = r / group, head = h * group + r % group;
          src[n] = qp + pos * q_row + head * q_head;
          limit[n] = static_cast<int32_t>(std::min(keys, q_offset + pos + 1));
          dst[n] = op + (pos * heads + head) * D;
        }
        for (int c = 0; c < D; c += 32) {  // Q^T as bf16 pairs: the rows' 32-bit pairs transposed
          __m512i r[kTile];
#pragma GCC unroll 16
          for (int n = 0; n < kTile; ++n) r[n] = _mm512_loadu_si512(src[n] + c);
          transpose16x16(r);
#pragma GCC unroll 16
          for (int p = 0; p < 16; ++p) _mm512_store_si512(w->query + (c / 32 * 16 + p) * kTile * 2, r[p]);
        }
        const Context ctx{key_out + h * s16 * D, vt_out + h * D * s32, s32};
        query_tile<D>(ctx, limit, scale_log2, *w, dst, mr);
      }
    }
    _tile_release();
  });
}

}  // namespace

bool has_prefill_attention_amx() { return amx_ready(); }

at::Tensor prefill_attention_amx(at::Tensor q, at::Tensor k, at::Tensor v, int64_t q_offset, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "prefill_attention_amx: q [T, Hq, D], k/v [S, Hkv, D]");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
              v.scalar_type() == at::kBFloat16, "prefill_attention_amx: bfloat16 only");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(2) == q.size(2), "prefill_attention_amx: k and v must be [S, Hkv, D]");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              "prefill_attention_amx: query heads must be a multiple of KV heads");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1,
              "prefill_attention_amx: head dims must be contiguous");
  TORCH_CHECK(q_offset >= 0 && q_offset + q.size(0) <= k.size(0),
              "prefill_attention_amx: the context must hold q_offset + T keys");
  TORCH_CHECK(k.size(0) < (int64_t{1} << 31), "prefill_attention_amx: context too long");
  const int64_t head_dim = q.size(2);
  TORCH_CHECK(head_dim == 64 || head_dim == 128, "prefill_attention_amx: head size 64 or 128, got ", head_dim);
  TORCH_CHECK(amx_ready(), "prefill_attention_amx: the kernel did not grant AMX tile state");
  auto out = at::empty({q.size(0), q.size(1), head_dim}, q.options());
  if (q.size(0) == 0) return out;
  if (head_dim == 64) run<64>(q, k, v, q_offset, static_cast<float>(scale), out);
  else run<128>(q, k, v, q_offset, static_cast<float>(scale), out);
  return out;
}

#else

bool has_prefill_attention_amx() { return false; }

at::Tensor prefill_attention_amx(at::Tensor q, at::Tensor k, at::Tensor v, int64_t q_offset, double scale) {
  TORCH_CHECK(false, "prefill_attention_amx: built without AVX512-BF16 and AMX-BF16");
}

#endif
