// Decode attention straight from the paged KV cache (CPU).
//
// One query token per sequence attends to its whole context, reading K and V block by
// block where they lie in the cache: no gathered copy is made, so the cache is read once.
// Work is split over (sequence, KV head) pairs; the query heads that share a KV head
// (grouped-query attention) are handled together so each K/V row is loaded once.
//
// At decode the kernel is bound by memory bandwidth (a 2,000-token context of SmolLM2 is
// ~23 MB of K/V per layer for a batch of 16), so it makes one pass: each block's K and V are
// read back to back, scores go through an online softmax (running max and sum, rescaling the
// accumulator when the max grows), and the block's rows are addressed by pointer, never by a
// per-token division. Head sizes 64 and 128 get compile-time loops the compiler unrolls.
// Where the build machine has AVX512-BF16 (the extension compiles with -march=native), bf16
// caches with those head sizes take an intrinsics path (decode_pair_avx512, below); where it has
// AMX too (and the blocks hold a multiple of 16 tokens), decode_pair_amx scores 16 tokens a tile
// and multiplies V's rows in as they lie, 512-token windows at a time (docs/benchmarks.md has both
// against their predecessors). Where it has AVX2 + FMA, float32 caches (what CPUs without native bfloat16 run) take decode_pair_avx2_f32:
// 30 layers of 33 x 600 tokens 52.9 -> 36.1 ms, 17 -> 25 GB/s (2-core AMD EPYC, AVX2 only).
#include "aten_lite.h"
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <numeric>
#include <type_traits>
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

// The running max before any key: finite, because the extension builds with -ffast-math
// (which assumes no infinities); exp(kNoScore - score) still underflows to 0.
constexpr float kNoScore = -1e30f;

// Per-thread scratch: the query (scaled, float), accumulators, one block's K/V as float, scores;
// for the AMX kernel the score tiles read out and the queries packed as tile pairs.
struct Scratch {
  std::vector<float> q, acc, kf, vf, scores, max, sum, tile;
  std::vector<uint16_t> qpack, vtail, ptile;
};

// kHeadDim > 0: the head size as a compile-time constant; 0: read it from head_dim.
template <typename scalar_t, int kHeadDim>
static void decode_pair(const scalar_t* q, const scalar_t* k_head, const scalar_t* v_head,
                        const int64_t* table, int64_t context, int64_t block_size, int64_t head_dim_arg,
                        int64_t group, float scale, scalar_t* out, Scratch& w) {
  const int64_t head_dim = kHeadDim > 0 ? kHeadDim : head_dim_arg;
  const int64_t block_stride = block_size * head_dim;
  w.q.resize(group * head_dim);
  w.acc.assign(group * head_dim, 0.f);
  w.kf.resize(block_stride);
  w.vf.resize(block_stride);
  w.scores.resize(group * block_size);
  w.max.assign(group, kNoScore);
  w.sum.assign(group, 0.f);
  for (int64_t i = 0; i < group * head_dim; ++i) w.q[i] = static_cast<float>(q[i]) * scale;
  const int64_t num_blocks = (context + block_size - 1) / block_size;
  for (int64_t b = 0; b < num_blocks; ++b) {
    const int64_t n = std::min(block_size, context - b * block_size);
    const int64_t base = table[b] * block_stride;
    to_float(k_head + base, w.kf.data(), n * head_dim);
    to_float(v_head + base, w.vf.data(), n * head_dim);
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = w.q.data() + g * head_dim;
      float* s = w.scores.data() + g * block_size;
      float block_max = kNoScore;
      for (int64_t t = 0; t < n; ++t) {
        const float* k = w.kf.data() + t * head_dim;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < head_dim; ++d) dot += qg[d] * k[d];
        s[t] = dot;
        block_max = std::max(block_max, dot);
      }
      // Online softmax: rescale what was accumulated under the old max.
      const float new_max = std::max(w.max[g], block_max);
      const float correction = std::exp(w.max[g] - new_max);
      w.max[g] = new_max;
      float block_sum = 0.f;
#pragma omp simd reduction(+ : block_sum)
      for (int64_t t = 0; t < n; ++t) {
        s[t] = std::exp(s[t] - new_max);
        block_sum += s[t];
      }
      w.sum[g] = w.sum[g] * correction + block_sum;
      float* a = w.acc.data() + g * head_dim;
      if (correction != 1.f) {
#pragma omp simd
        for (int64_t d = 0; d < head_dim; ++d) a[d] *= correction;
      }
      for (int64_t t = 0; t < n; ++t) {
        const float p = s[t];
        const float* v = w.vf.data() + t * head_dim;
#pragma omp simd
        for (int64_t d = 0; d < head_dim; ++d) a[d] += p * v[d];
      }
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    const float inv = 1.f / w.sum[g];
    for (int64_t d = 0; d < head_dim; ++d) out[g * head_dim + d] = static_cast<scalar_t>(w.acc[g * head_dim + d] * inv);
  }
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define LLM_CLUSTER_AVX512_BF16 1

#include "avx512_math.h"

// exp(x) for x <= 0 (scores minus their running max), arguments below -87 clamped there.
static inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  return exp2_nonpositive(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)));
}

static inline __m512 bf16_row_to_float(const uint16_t* src) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

constexpr int64_t kMaxGroup = 16;

// Sixteen vectors of partial sums -> one vector of their sixteen totals, lane t = sum of a[t]:
// four rounds of shuffle-and-add (45 instructions) instead of sixteen horizontal reductions.
// The rounds leave total t in lane 4 * (t % 4) + t / 4; one permute puts it back in lane t.
static inline __m512 sum16(const __m512* a) {
  __m512 b[8], c[4], d[2];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)  // 256-bit halves: [a[2i] (8 partials), a[2i+1] (8)]
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)  // 128-bit quarters: totals 4i .. 4i+3, 4 partials each
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)  // quarter j: totals 8i + j and 8i + 4 + j, 2 partials each
    d[i] = _mm512_add_ps(_mm512_shuffle_ps(c[2 * i], c[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(c[2 * i], c[2 * i + 1], 0xEE));
  const __m512 e = _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], 0x88), _mm512_shuffle_ps(d[0], d[1], 0xDD));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, e);
}

static inline void prefetch_rows(const uint16_t* p, int64_t bytes) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(c + i, _MM_HINT_T0);
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define LLM_CLUSTER_AMX 1
#include "amx.h"

// Every tile [16 rows, 64 bytes], one configuration for both phases of a window:
// - scoring, S^T = K Q^T over 16 tokens: 0 and 3 the scores [16 tokens, 16 columns] (float32, the
//   group's heads in the first columns), 1-2 (and 6-7 at head size 64) a K slice [16 tokens, 32 dims],
//   4-5 (4-7 at head size 128) Q^T's 32-dim slices as bf16 pairs [16 pairs, 16 columns];
// - p.V, O = P V over 16 tokens: 0-3 O's even and odd dims [16 rows (the heads), 16 dims] of two
//   32-dim chunks, 4-5 P [16 rows, 16 tokens x 2] with the probabilities in the even / odd slots,
//   6-7 V's rows as they lie [16 tokens, 32 dims].
static inline void configure_decode_tiles() {
  TileConfig config{};
  config.palette_id = 1;
  for (int i = 0; i < 8; ++i) config.rows[i] = 16, config.colsb[i] = 64;
  _tile_loadconfig(&config);
}

// The queries as Q^T tiles (w.qpack, columns past the group zero), for load_query_tiles.
template <int kHeadDim>
static void pack_queries(const uint16_t* q, int64_t group, Scratch& w) {
  constexpr int kChunks = kHeadDim / 32;
  w.qpack.assign(kChunks * 16 * 16 * 2, 0);
  for (int c = 0; c < kChunks; ++c)
    for (int r = 0; r < 16; ++r)
      for (int64_t g = 0; g < group; ++g)
        for (int j = 0; j < 2; ++j)
          w.qpack[((c * 16 + r) * 16 + g) * 2 + j] = q[g * kHeadDim + c * 32 + 2 * r + j];
}

template <int kHeadDim>
static inline void load_query_tiles(const Scratch& w) {
  _tile_loadd(4, w.qpack.data(), 64);
  _tile_loadd(5, w.qpack.data() + 512, 64);
  if constexpr (kHeadDim == 128) {
    _tile_loadd(6, w.qpack.data() + 1024, 64);
    _tile_loadd(7, w.qpack.data() + 1536, 64);
  }
}

#endif

// One block's online-softmax update for one head: its n scores (s) become exp(score - max) (0 past
// n), the running max and sum move on, and ``correction`` says how much to scale what p.V has
// accumulated so far.
static inline void softmax_block(float* s, int64_t n, float block_max, float& running_max, float& running_sum,
                                 float& correction) {
  const float new_max = std::max(running_max, block_max);
  correction = std::exp(running_max - new_max);
  running_max = new_max;
  const __m512 vmax = _mm512_set1_ps(new_max);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t t0 = 0; t0 < n; t0 += 16) {
    const int64_t m = std::min<int64_t>(16, n - t0);
    const __mmask16 valid = m == 16 ? __mmask16(0xFFFF) : __mmask16((1u << m) - 1);
    const __m512 p = _mm512_maskz_mov_ps(valid, exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s + t0), vmax)));
    _mm512_storeu_ps(s + t0, p);
    sum = _mm512_add_ps(sum, p);
  }
  running_sum = running_sum * correction + _mm512_reduce_add_ps(sum);
}

// p.V of n V rows (vb) into the accumulators of up to four heads (s: their probabilities, head g's
// at s[g * s_stride + t]); each row widened to float32 once for all of them.
template <int kHeadDim>
static inline __attribute__((always_inline)) void pv_rows(const uint16_t* vb, int64_t n, const float* s,
                                                          int64_t s_stride, int gp, __m512 (&acc)[4][kHeadDim / 16]) {
  constexpr int kVecs = kHeadDim / 16;
  for (int64_t t = 0; t < n; ++t) {
    __m512 vf[kVecs];
    for (int i = 0; i < kVecs; ++i) vf[i] = bf16_row_to_float(vb + t * kHeadDim + i * 16);
    for (int g = 0; g < gp; ++g) {
      const __m512 p = _mm512_set1_ps(s[g * s_stride + t]);
      for (int i = 0; i < kVecs; ++i) acc[g][i] = _mm512_fmadd_ps(p, vf[i], acc[g][i]);
    }
  }
}

// Heads [g0, g0 + gp)'s accumulators from w.acc into registers, each scaled by its softmax correction.
template <int kHeadDim>
static inline __attribute__((always_inline)) void load_acc(const float* acc_mem, const float* correction, int gp,
                                                           __m512 (&acc)[4][kHeadDim / 16]) {
  for (int g = 0; g < gp; ++g) {
    const __m512 corr = _mm512_set1_ps(correction[g]);
    for (int i = 0; i < kHeadDim / 16; ++i) acc[g][i] = _mm512_mul_ps(_mm512_loadu_ps(acc_mem + g * kHeadDim + i * 16), corr);
  }
}

template <int kHeadDim>
static inline __attribute__((always_inline)) void store_acc(float* acc_mem, int gp, const __m512 (&acc)[4][kHeadDim / 16]) {
  for (int g = 0; g < gp; ++g)
    for (int i = 0; i < kHeadDim / 16; ++i) _mm512_storeu_ps(acc_mem + g * kHeadDim + i * 16, acc[g][i]);
}

// The output: each head's accumulator over its softmax sum, rounded to bfloat16.
template <int kHeadDim>
static inline void write_out(const float* acc_mem, const float* running_sum, int64_t group, uint16_t* out) {
  for (int64_t g = 0; g < group; ++g) {
    const __m512 inv = _mm512_set1_ps(1.f / running_sum[g]);
    for (int i = 0; i < kHeadDim / 16; ++i) {
      const __m256bh packed = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(acc_mem + g * kHeadDim + i * 16), inv));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + g * kHeadDim + i * 16), (__m256i)packed);  // nearest even
    }
  }
}

// bfloat16 with AVX512-BF16, one (sequence, KV head) pair. Per block, 16 tokens at a time:
// - scores: q.k by dpbf16 on the stored bf16 pairs (products exact, sums in float32), sixteen
//   tokens' partial sums reduced together (sum16), scaled;
// - an online softmax over the block (running max and sum; the accumulator rescaled when the max
//   grows), 16 lanes at a time;
// - p.V in float32, each V row widened once for up to four query heads of the group.
// Explicit prefetching of the next blocks did not pay here (2-core Xeon, the workload's block tables:
// 157 ms for four steps' 30 layers without, 161-163 with); AMX CPUs take decode_pair_amx instead.
template <int kHeadDim>
static void decode_pair_avx512(const uint16_t* q, const uint16_t* k_head, const uint16_t* v_head,
                               const int64_t* table, int64_t context, int64_t block_size, int64_t group,
                               float scale, uint16_t* out, Scratch& w) {
  constexpr int kChunks = kHeadDim / 32;  // 32 bf16 per dpbf16
  constexpr int kVecs = kHeadDim / 16;    // 16 floats per register
  const int64_t padded = (block_size + 15) / 16 * 16;
  w.scores.resize(group * padded);
  w.acc.assign(group * kHeadDim, 0.f);
  float running_max[kMaxGroup], running_sum[kMaxGroup], correction[kMaxGroup];
  for (int64_t g = 0; g < group; ++g) {
    running_max[g] = kNoScore;
    running_sum[g] = 0.f;
  }
  const int64_t block_elems = block_size * kHeadDim;
  const int64_t num_blocks = (context + block_size - 1) / block_size;
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t b = 0; b < num_blocks; ++b) {
    const int64_t n = std::min(block_size, context - b * block_size);
    const uint16_t* kb = k_head + table[b] * block_elems;
    const uint16_t* vb = v_head + table[b] * block_elems;
    // Scores, 16 tokens at a time; each head re-reads the block's K rows from L1.
    for (int64_t g = 0; g < group; ++g) {
      __m512bh qv[kChunks];
      for (int c = 0; c < kChunks; ++c) qv[c] = (__m512bh)_mm512_loadu_si512(q + g * kHeadDim + c * 32);
      float* s = w.scores.data() + g * padded;
      __m512 block_max = _mm512_set1_ps(kNoScore);
      for (int64_t t0 = 0; t0 < n; t0 += 16) {
        const int64_t m = std::min<int64_t>(16, n - t0);
        __m512 dots[16];
        for (int64_t t = 0; t < 16; ++t) {  // tokens past the block's last score zero, then no score
          __m512 dot = _mm512_setzero_ps();
          if (t < m) {
            const uint16_t* k = kb + (t0 + t) * kHeadDim;
            for (int c = 0; c < kChunks; ++c)
              dot = _mm512_dpbf16_ps(dot, qv[c], (__m512bh)_mm512_loadu_si512(k + c * 32));
          }
          dots[t] = dot;
        }
        const __mmask16 valid = m == 16 ? __mmask16(0xFFFF) : __mmask16((1u << m) - 1);
        const __m512 scores = _mm512_mask_blend_ps(valid, _mm512_set1_ps(kNoScore), _mm512_mul_ps(sum16(dots), vscale));
        _mm512_storeu_ps(s + t0, scores);
        block_max = _mm512_max_ps(block_max, scores);
      }
      softmax_block(s, n, _mm512_reduce_max_ps(block_max), running_max[g], running_sum[g], correction[g]);
    }
    // p.V: up to four heads at a time hold their accumulators in registers.
    for (int64_t g0 = 0; g0 < group; g0 += 4) {
      const int gp = static_cast<int>(std::min<int64_t>(4, group - g0));
      __m512 acc[4][kVecs];
      load_acc<kHeadDim>(w.acc.data() + g0 * kHeadDim, correction + g0, gp, acc);
      pv_rows<kHeadDim>(vb, n, w.scores.data() + g0 * padded, padded, gp, acc);
      store_acc<kHeadDim>(w.acc.data() + g0 * kHeadDim, gp, acc);
    }
  }
  write_out<kHeadDim>(w.acc.data(), running_sum, group, out);
}

#ifdef LLM_CLUSTER_AMX
// S^T of 16 tokens into score tile C from the K rows at ptr, by the query tiles (4-5, or 4-7 at head
// size 128); KA/KB: the tiles that take K's 32-dim slices.
#define LLM_QK_TILES(C, KA, KB, ptr)                   \
  do {                                                 \
    _tile_zero(C);                                     \
    _tile_loadd(KA, (ptr), kRowBytes);                 \
    _tile_dpbf16ps(C, KA, 4);                          \
    _tile_loadd(KB, (ptr) + 32, kRowBytes);            \
    _tile_dpbf16ps(C, KB, 5);                          \
    if constexpr (kChunks == 4) {                      \
      _tile_loadd(KA, (ptr) + 64, kRowBytes);          \
      _tile_dpbf16ps(C, KA, 6);                        \
      _tile_loadd(KB, (ptr) + 96, kRowBytes);          \
      _tile_dpbf16ps(C, KB, 7);                        \
    }                                                  \
  } while (0)

// bfloat16 with AMX, one (sequence, KV head) pair, a window of 512 tokens at a time:
// 1. scores: S^T [16 tokens, group] = K rows x Q^T per 16 tokens by AMX tiles (products exact, sums in
//    float32), two score tiles in turn so one is computed while the other is read out; each head's
//    16 scores are gathered from its column and scaled;
// 2. an online-softmax update over the window (running max and sum; the accumulator rescaled when
//    the max grows), then p.V by AMX tiles too, 16 tokens a step, with V's rows loaded as they lie
//    in the cache: [16 tokens, 32 dims] is a B tile whose pairs are dims, not tokens, so each token's
//    probability (rounded to bfloat16, as torch's flash attention rounds it) goes into two A tiles,
//    in the even slot of its pair for the even dims and in the odd slot for the odd ones (the other
//    slot zero); O's even and odd dims build up in their own accumulators, interleaved once a window.
//    Twice the tile products of pairing the tokens, but no pass that interleaves V's rows first.
// Prefetching keeps one stream in flight through both phases: K two slices ahead while scoring, the
// window's first V slices during its last scoring step, V two slices ahead during p.V, the next
// window's first K slices during its last p.V steps (each 16-token slice lies in its own block,
// where the hardware prefetcher starts cold).
// Four decode steps' block tables from the bench workload (33 sequences, contexts to ~1,100, 30
// layers), 2-core Xeon with AMX: 175-179 ms on decode_pair_avx512's predecessor, 157 on
// decode_pair_avx512, 138-148 with p.V in float32 FMAs; windows of 64 / 128 / 256 / 1,024 tokens:
// 153 / 142 / 146 / 141. p.V on tiles of token pairs (V's rows interleaved into a scratch buffer a
// step ahead, V prefetched during the scoring): 138.9 -> 133.2 ms. This version, on 128-token blocks
// (the workload's tables at 64 sequences): 126.4 -> 111.4 ms, with the cache in L2 44.8 -> 34.0;
// windows of 128 / 256 / 1,024 tokens the same within noise. Prefetches into L2 of the next window
// during p.V cost more than they hid (153 against 136), as did seeding each 4 KB page with two
// lines (118.6-119.6 against 116.3).
// Blocks must hold a multiple of 16 tokens (a tile's rows never leave the block).
template <int kHeadDim>
static void decode_pair_amx(const uint16_t* q, const uint16_t* k_head, const uint16_t* v_head, const int64_t* table,
                            int64_t context, int64_t block_size, int64_t group, float scale, uint16_t* out,
                            Scratch& w) {
  constexpr int kChunks = kHeadDim / 32;
  constexpr int kRowBytes = kHeadDim * 2;
  constexpr int64_t kWindowSubs = 32;  // 512 tokens a window
  constexpr int64_t window = kWindowSubs * 16;
  configure_decode_tiles();
  pack_queries<kHeadDim>(q, group, w);
  load_query_tiles<kHeadDim>(w);
  const int64_t subs = (context + 15) / 16;
  w.scores.resize(group * window);
  w.acc.assign(group * kHeadDim, 0.f);
  w.tile.resize(2 * 256 + 4 * 256);
  w.vtail.resize(16 * kHeadDim);
  w.ptile.assign(2 * 2 * 512, 0);  // two buffers of two P tiles; rows past the group stay zero
  const int64_t block_elems = block_size * kHeadDim;
  const auto rows_at = [&](const uint16_t* head, int64_t sub) {
    const int64_t t = sub * 16;
    return head + table[t / block_size] * block_elems + (t % block_size) * kHeadDim;
  };
  const __m512 vscale = _mm512_set1_ps(scale);
  const __m512i column = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(16));
  float* tile_out[2] = {w.tile.data(), w.tile.data() + 256};
  float* o_out = w.tile.data() + 512;  // O's four tiles read out, [4][16 heads][16 dims]
  float running_max[kMaxGroup], running_sum[kMaxGroup], correction[kMaxGroup];
  for (int64_t g = 0; g < group; ++g) running_max[g] = kNoScore, running_sum[g] = 0.f;
  for (int64_t first = 0; first < subs; first += kWindowSubs) {
    const int64_t last = std::min(subs, first + kWindowSubs);  // subs [first, last)
    const int64_t tokens = std::min(context, last * 16) - first * 16;
    const auto read_scores = [&](const float* tile, int64_t sub) {
      const int64_t m = std::min<int64_t>(16, context - sub * 16);
      const __mmask16 valid = m == 16 ? __mmask16(0xFFFF) : __mmask16((1u << m) - 1);
      for (int64_t g = 0; g < group; ++g) {
        const __m512 v = _mm512_mul_ps(_mm512_i32gather_ps(column, tile + g, 4), vscale);
        _mm512_storeu_ps(w.scores.data() + g * window + (sub - first) * 16,
                         _mm512_mask_blend_ps(valid, _mm512_set1_ps(kNoScore), v));
      }
    };
    if (first > 0) load_query_tiles<kHeadDim>(w);  // p.V used their tiles
    LLM_QK_TILES(0, 1, 2, rows_at(k_head, first));
    for (int64_t i = first; i < last; i += 2) {
      // K two slices ahead; in the last step, the first two slices of V that p.V reads
      for (int64_t j = i + 2; j < std::min(i + 4, last); ++j) prefetch_rows(rows_at(k_head, j), 16 * kRowBytes);
      if (i + 2 >= last)
        for (int64_t j = first; j < std::min(first + 2, last); ++j) prefetch_rows(rows_at(v_head, j), 16 * kRowBytes);
      if (i + 1 < last) {
        if constexpr (kChunks == 2) LLM_QK_TILES(3, 6, 7, rows_at(k_head, i + 1));
        else LLM_QK_TILES(3, 1, 2, rows_at(k_head, i + 1));
      }
      _tile_stored(0, tile_out[0], 64);
      read_scores(tile_out[0], i);
      if (i + 1 < last) {
        if (i + 2 < last) LLM_QK_TILES(0, 1, 2, rows_at(k_head, i + 2));
        _tile_stored(3, tile_out[1], 64);
        read_scores(tile_out[1], i + 1);
      }
    }
    const int64_t padded = (last - first) * 16;
    for (int64_t g = 0; g < group; ++g) {
      float* s = w.scores.data() + g * window;
      __m512 mx = _mm512_set1_ps(kNoScore);
      for (int64_t t = 0; t < padded; t += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + t));
      softmax_block(s, tokens, _mm512_reduce_max_ps(mx), running_max[g], running_sum[g], correction[g]);
    }
    // p.V, 16 tokens a step (tiles 0-3: O's even and odd dims of two 32-dim chunks; 4-5: P in the
    // even and odd slots; 6-7: V's rows, one 32-dim chunk each); then each head's accumulator scaled
    // by its correction plus the window's sum.
    const int64_t steps = last - first;
    const auto prepare = [&](int64_t c) {  // step c's P tiles, into the buffer the step before doesn't read
      const int64_t n = std::min<int64_t>(16, tokens - c * 16);
      const __mmask16 valid = n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
      uint16_t* pt = w.ptile.data() + (c & 1) * 1024;
      for (int64_t g = 0; g < group; ++g) {
        const __m256bh pb = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(valid, w.scores.data() + g * window + c * 16));
        const __m512i even = _mm512_cvtepu16_epi32((__m256i)pb);
        _mm512_storeu_si512(pt + g * 32, even);
        _mm512_storeu_si512(pt + 512 + g * 32, _mm512_slli_epi32(even, 16));
      }
    };
    const __m512i low_dims = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i high_dims = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for (int64_t dim = 0; dim < kHeadDim; dim += 64) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      prepare(0);
      for (int64_t c = 0; c < steps; ++c) {
        if (c + 1 < steps) prepare(c + 1);
        if (dim == 0) {  // V two slices ahead; in the last steps, the next window's first K slices
          const int64_t ahead = first + c + 2;
          if (ahead < last) prefetch_rows(rows_at(v_head, ahead), 16 * kRowBytes);
          else if (ahead < std::min(last + 2, subs)) prefetch_rows(rows_at(k_head, ahead), 16 * kRowBytes);
        }
        const int64_t n = std::min<int64_t>(16, tokens - c * 16);
        const uint16_t* v = rows_at(v_head, first + c);
        if (n < 16) {  // the rows past the context may hold anything (0 x NaN is NaN): a zeroed copy
          std::memset(w.vtail.data(), 0, 16 * kRowBytes);
          std::memcpy(w.vtail.data(), v, n * kRowBytes);
          v = w.vtail.data();
        }
        const uint16_t* p = w.ptile.data() + (c & 1) * 1024;
        _tile_loadd(4, p, 64);
        _tile_loadd(5, p + 512, 64);
        _tile_loadd(6, v + dim, kRowBytes);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 5, 6);
        _tile_loadd(7, v + dim + 32, kRowBytes);
        _tile_dpbf16ps(2, 4, 7);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, o_out, 64);
      _tile_stored(1, o_out + 256, 64);
      _tile_stored(2, o_out + 512, 64);
      _tile_stored(3, o_out + 768, 64);
      for (int64_t g = 0; g < group; ++g) {
        const __m512 corr = _mm512_set1_ps(correction[g]);
        float* a = w.acc.data() + g * kHeadDim + dim;
        for (int h = 0; h < 2; ++h) {  // chunk h's even and odd dims back in order
          const __m512 even = _mm512_loadu_ps(o_out + 2 * h * 256 + g * 16);
          const __m512 odd = _mm512_loadu_ps(o_out + (2 * h + 1) * 256 + g * 16);
          _mm512_storeu_ps(a + 32 * h, _mm512_fmadd_ps(_mm512_loadu_ps(a + 32 * h), corr,
                                                       _mm512_permutex2var_ps(even, low_dims, odd)));
          _mm512_storeu_ps(a + 32 * h + 16, _mm512_fmadd_ps(_mm512_loadu_ps(a + 32 * h + 16), corr,
                                                            _mm512_permutex2var_ps(even, high_dims, odd)));
        }
      }
    }
  }
  _tile_release();
  write_out<kHeadDim>(w.acc.data(), running_sum, group, out);
}
#undef LLM_QK_TILES
#endif
#endif

#if defined(__AVX2__) && defined(__FMA__)
#ifndef LLM_CLUSTER_AVX512_BF16
#include <immintrin.h>
#endif
#define LLM_CLUSTER_AVX2_F32 1

#include "avx2_math.h"

// Four 8-lane partial sums -> their four totals.
static inline __m128 reduce4x8(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);
  const __m256 abcd = _mm256_hadd_ps(ab, cd);  // [a b c d] partial per 128-bit half
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// How a cache element becomes float32, 8 at a time: float32 as it is; a 16-bit cache under a
// float32 model (kv_cache_dtype) widened on load, so attention computes in float32 either way and
// decode reads half the bytes.
struct KvF32 {
  using type = float;
  static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
};
struct KvBF16 {  // bfloat16 is the top half of a float32
  using type = uint16_t;
  static inline __m256 load8(const uint16_t* p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
};
#ifdef __F16C__
#define LLM_CLUSTER_WIDENING_DECODE 1
struct KvF16 {
  using type = uint16_t;
  static inline __m256 load8(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
};
#endif

static inline void prefetch_row(const void* row, int64_t bytes, int hint) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t c = 0; c < bytes; c += 64) {
    if (hint == 0) _mm_prefetch(p + c, _MM_HINT_T0);
    else _mm_prefetch(p + c, _MM_HINT_T1);
  }
}

// Rows of blocks to prefetch while a block is read (null where there is none): this block's V (to
// L1, read right after its K), the next block's K (to L1) and the K and V two blocks ahead (to L2).
template <typename T>
struct Ahead {
  const T *v, *next_k, *far_k, *far_v;
};

// Query heads [0, GP) of a pass (GP <= 3; ``qs`` their scaled queries) against one block of n tokens:
// each K row is loaded once for all GP heads, then an online-softmax update of ``max``/``sum`` and
// p.V, 32 dims at a time with V's row loaded once for all GP heads (GP x 4 accumulators).
template <typename KV, int kHeadDim, int GP>
static void block_pass(const float* qs, const typename KV::type* kb, const typename KV::type* vb, int64_t n,
                       float* scores, int64_t padded, float* max, float* sum, float* acc,
                       const Ahead<typename KV::type>& ahead) {
  using T = typename KV::type;
  constexpr int kVecs = kHeadDim / 8;
  constexpr int64_t kRowBytes = kHeadDim * sizeof(T);
  for (int64_t t = 0; t < n; ++t) {
    if (ahead.v) prefetch_row(ahead.v + t * kHeadDim, kRowBytes, 0);
    if (ahead.far_k) prefetch_row(ahead.far_k + t * kHeadDim, kRowBytes, 1);
    const T* k = kb + t * kHeadDim;
    __m256 a[3];
    for (int g = 0; g < GP; ++g) a[g] = _mm256_setzero_ps();
    for (int i = 0; i < kVecs; ++i) {
      const __m256 kv = KV::load8(k + i * 8);
      for (int g = 0; g < GP; ++g) a[g] = _mm256_fmadd_ps(kv, _mm256_loadu_ps(qs + g * kHeadDim + i * 8), a[g]);
    }
    const __m256 z = _mm256_setzero_ps();
    alignas(16) float dots[4];
    _mm_store_ps(dots, reduce4x8(a[0], GP > 1 ? a[1] : z, GP > 2 ? a[2] : z, z));
    for (int g = 0; g < GP; ++g) scores[g * padded + t] = dots[g];
  }
  // Online softmax over the block (scores past n are masked out of the sum and of p.V).
  float correction[3];
  for (int g = 0; g < GP; ++g) {
    float* s = scores + g * padded;
    float block_max = kNoScore;
    for (int64_t u = 0; u < n; ++u) block_max = std::max(block_max, s[u]);
    const float new_max = std::max(max[g], block_max);
    correction[g] = std::exp(max[g] - new_max);
    max[g] = new_max;
    __m256 total = _mm256_setzero_ps();
    const __m256 m = _mm256_set1_ps(new_max);
    for (int64_t u = 0; u < n; u += 8) {
      __m256 p = exp_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(s + u), m));
      if (n - u < 8) {  // zero the lanes past the block's last token
        const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        p = _mm256_and_ps(p, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(int(n - u)), lane)));
      }
      _mm256_storeu_ps(s + u, p);
      total = _mm256_add_ps(total, p);
    }
    const __m256 z = _mm256_setzero_ps();
    sum[g] = sum[g] * correction[g] + _mm_cvtss_f32(reduce4x8(total, z, z, z));
  }
  for (int d = 0; d < kHeadDim; d += 32) {
    __m256 ac[3][4];
    for (int g = 0; g < GP; ++g) {
      const __m256 corr = _mm256_set1_ps(correction[g]);
      for (int i = 0; i < 4; ++i) ac[g][i] = _mm256_mul_ps(_mm256_loadu_ps(acc + g * kHeadDim + d + i * 8), corr);
    }
    const T* next = d == 0 ? ahead.next_k : d == 32 ? ahead.far_v : nullptr;
    const int hint = d == 0 ? 0 : 1;
    for (int64_t u = 0; u < n; ++u) {
      if (next) prefetch_row(next + u * kHeadDim, kRowBytes, hint);
      const T* v = vb + u * kHeadDim + d;
      __m256 p[3];
      for (int g = 0; g < GP; ++g) p[g] = _mm256_set1_ps(scores[g * padded + u]);
      for (int i = 0; i < 4; ++i) {
        const __m256 vv = KV::load8(v + i * 8);
        for (int g = 0; g < GP; ++g) ac[g][i] = _mm256_fmadd_ps(p[g], vv, ac[g][i]);
      }
    }
    for (int g = 0; g < GP; ++g)
      for (int i = 0; i < 4; ++i) _mm256_storeu_ps(acc + g * kHeadDim + d + i * 8, ac[g][i]);
  }
}

// float32 caches with AVX2 + FMA (CPUs without native bfloat16 run float32): K and V read where
// they lie (no widening copy, unlike decode_pair), one pass per block for up to three query heads
// of the group at a time (each K and V row loaded once for them), an 8-lane exp. The table scatters
// a sequence's blocks over the cache, which the hardware prefetcher cannot follow: each block's V
// is prefetched while its K is read, the next block's K while its V is read, and the K and V two
// blocks ahead into L2. 30 layers of 33 sequences x 600 tokens, blocks scattered at random over a
// 4 GiB cache, 2-core AMD EPYC (AVX2): 54.5 ms before the prefetching, in order 37.7. ``KV``: how the
// cache's elements load as float32 (KvF32, or a 16-bit cache widened on load).
template <typename KV, int kHeadDim>
static void decode_pair_avx2_f32(const float* q, const void* k_head_arg, const void* v_head_arg, const int64_t* table,
                                 int64_t context, int64_t block_size, int64_t group, float scale, float* out,
                                 Scratch& w) {
  using T = typename KV::type;
  const T* k_head = static_cast<const T*>(k_head_arg);
  const T* v_head = static_cast<const T*>(v_head_arg);
  const int64_t padded = (block_size + 7) / 8 * 8;
  w.q.resize(group * kHeadDim);
  w.acc.assign(group * kHeadDim, 0.f);
  w.scores.assign(3 * padded, 0.f);
  w.max.assign(group, kNoScore);
  w.sum.assign(group, 0.f);
  for (int64_t i = 0; i < group * kHeadDim; ++i) w.q[i] = q[i] * scale;
  const int64_t block_elems = block_size * kHeadDim;
  const int64_t num_blocks = (context + block_size - 1) / block_size;
  for (int64_t b = 0; b < num_blocks; ++b) {
    const int64_t n = std::min(block_size, context - b * block_size);
    const T* kb = k_head + table[b] * block_elems;
    const T* vb = v_head + table[b] * block_elems;
    for (int64_t g0 = 0; g0 < group; g0 += 3) {
      Ahead<T> ahead{nullptr, nullptr, nullptr, nullptr};
      if (g0 == 0) {  // the first pass reads the block from memory; later ones find it in L1
        ahead.v = vb;
        if (b + 1 < num_blocks) ahead.next_k = k_head + table[b + 1] * block_elems;
        if (b + 2 < num_blocks) {
          ahead.far_k = k_head + table[b + 2] * block_elems;
          ahead.far_v = v_head + table[b + 2] * block_elems;
        }
      }
      const float* qs = w.q.data() + g0 * kHeadDim;
      float* acc = w.acc.data() + g0 * kHeadDim;
      float* mx = w.max.data() + g0;
      float* sm = w.sum.data() + g0;
      switch (std::min<int64_t>(3, group - g0)) {
        case 1: block_pass<KV, kHeadDim, 1>(qs, kb, vb, n, w.scores.data(), padded, mx, sm, acc, ahead); break;
        case 2: block_pass<KV, kHeadDim, 2>(qs, kb, vb, n, w.scores.data(), padded, mx, sm, acc, ahead); break;
        default: block_pass<KV, kHeadDim, 3>(qs, kb, vb, n, w.scores.data(), padded, mx, sm, acc, ahead); break;
      }
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    const float inv = 1.f / w.sum[g];
    for (int64_t d = 0; d < kHeadDim; ++d) out[g * kHeadDim + d] = w.acc[g * kHeadDim + d] * inv;
  }
}

using F32PairFn = void (*)(const float*, const void*, const void*, const int64_t*, int64_t, int64_t, int64_t, float,
                           float*, Scratch&);

// The float32-compute kernel for a cache of ``kv`` elements and this head size (null: none).
static F32PairFn avx2_f32_pair_fn(at::ScalarType kv, int64_t head_dim) {
  if (head_dim != 64 && head_dim != 128) return nullptr;
  const bool h64 = head_dim == 64;
  if (kv == at::kFloat) return h64 ? &decode_pair_avx2_f32<KvF32, 64> : &decode_pair_avx2_f32<KvF32, 128>;
#ifdef LLM_CLUSTER_WIDENING_DECODE
  if (kv == at::kBFloat16) return h64 ? &decode_pair_avx2_f32<KvBF16, 64> : &decode_pair_avx2_f32<KvBF16, 128>;
  if (kv == at::kHalf) return h64 ? &decode_pair_avx2_f32<KvF16, 64> : &decode_pair_avx2_f32<KvF16, 128>;
#endif
  return nullptr;
}
#endif

// Runs fn(pair, scratch) for every (sequence, KV head) pair, longest context first, each thread
// taking the next pair when it finishes one. A pair's cost is its context length, and a decode
// batch's contexts differ by 10x and more: split into equal counts of pairs in batch order (what
// at::parallel_for does), one thread got most of the long ones and the other waited. 30 layers of
// 33 sequences of 40-1,200 tokens, 2-core AMD EPYC (AVX2): 45.6 ms in random order and 52.2 sorted
// longest first, against 41.3 with every context at their mean (docs/benchmarks.md).
template <typename Fn>
static void for_each_pair(const int64_t* lens, int64_t num_seqs, int64_t num_kv_heads, Fn&& fn) {
  std::vector<int64_t> order(num_seqs * num_kv_heads);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return lens[a / num_kv_heads] > lens[b / num_kv_heads];
  });
  const int64_t total = static_cast<int64_t>(order.size());
  const int64_t lanes = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, lanes, 1, [&](int64_t, int64_t) {
    Scratch scratch;
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < total;
         i = next.fetch_add(1, std::memory_order_relaxed))
      fn(order[i], scratch);
  });
}

// q: [S, Hq, D]; kv_cache: [2, Hkv, NB, BS, D] (q's dtype, or bfloat16 / float16 under float32 q
// where has_widening_decode()); block_table: [S, max_blocks] int64; context_lens: [S] int64.
// Returns [S, Hq, D].
bool has_widening_decode() {
#ifdef LLM_CLUSTER_WIDENING_DECODE
  return true;
#else
  return false;
#endif
}

// Into out ([S, Hq, D], contiguous, q's dtype): what paged_decode returns.
void paged_decode_out(at::Tensor out, at::Tensor q, at::Tensor kv_cache, at::Tensor block_table,
                      at::Tensor context_lens, double scale) {
  // q's rows may lie apart (a view of the QKV projection's output); each row's heads are contiguous
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && (q.size(1) <= 1 || q.stride(1) == q.size(2)) &&
                  kv_cache.is_contiguous() && block_table.is_contiguous(),
              "paged_decode needs q [S, H, D] with each row's heads contiguous, and a contiguous cache and table");
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t q_row = q.stride(0);
  const int64_t num_kv_heads = kv_cache.size(1), num_blocks = kv_cache.size(2), block_size = kv_cache.size(3);
  const int64_t group = num_heads / num_kv_heads;
  const int64_t max_blocks = block_table.size(1);
  const int64_t head_stride = num_blocks * block_size * head_dim;
  TORCH_CHECK(out.is_contiguous() && out.dim() == 3 && out.size(0) == num_seqs && out.size(1) == num_heads &&
                  out.size(2) == head_dim && out.scalar_type() == q.scalar_type(),
              "paged_decode: out must be a contiguous [S, Hq, D] tensor of q's dtype");
  const int64_t* tables = block_table.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
#ifdef LLM_CLUSTER_AVX2_F32
  // float32 queries (AVX2 + FMA): one loop for a float32 cache and for a 16-bit one widened on load
  auto f32_fn = q.scalar_type() == at::kFloat ? avx2_f32_pair_fn(kv_cache.scalar_type(), head_dim) : nullptr;
  if (f32_fn != nullptr) {
    const float* qp = q.data_ptr<float>();
    const char* kp = static_cast<const char*>(kv_cache.data_ptr());
    const int64_t head_bytes = head_stride * kv_cache.element_size();
    const char* vp = kp + num_kv_heads * head_bytes;
    float* op = out.data_ptr<float>();
    for_each_pair(lens, num_seqs, num_kv_heads, [&](int64_t pair, Scratch& scratch) {
      const int64_t s = pair / num_kv_heads, h = pair % num_kv_heads;
      const int64_t offset = (s * num_heads + h * group) * head_dim;
      f32_fn(qp + s * q_row + h * group * head_dim, kp + h * head_bytes, vp + h * head_bytes, tables + s * max_blocks, lens[s], block_size,
             group, static_cast<float>(scale), op + offset, scratch);
    });
    return;
  }
#endif
  TORCH_CHECK(kv_cache.scalar_type() == q.scalar_type(), "paged_decode: a ", kv_cache.scalar_type(),
              " cache takes ", kv_cache.scalar_type(), " queries, or float32 queries of head size 64 or 128 where ",
              "has_widening_decode(); got ", q.scalar_type(), " queries of head size ", head_dim);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = kv_cache.data_ptr<scalar_t>();
    const scalar_t* vp = kp + num_kv_heads * head_stride;
    scalar_t* op = out.data_ptr<scalar_t>();
    auto pair_fn = head_dim == 64    ? &decode_pair<scalar_t, 64>
                   : head_dim == 128 ? &decode_pair<scalar_t, 128>
                                     : &decode_pair<scalar_t, 0>;
#ifdef LLM_CLUSTER_AVX512_BF16
    auto fast_fn = !std::is_same_v<scalar_t, c10::BFloat16> || group > kMaxGroup ? nullptr
                   : head_dim == 64                                           ? &decode_pair_avx512<64>
                   : head_dim == 128                                          ? &decode_pair_avx512<128>
                                                                              : nullptr;
#ifdef LLM_CLUSTER_AMX
    if (fast_fn != nullptr && block_size % 16 == 0 && amx_ready())
      fast_fn = head_dim == 64 ? &decode_pair_amx<64> : &decode_pair_amx<128>;
#endif
#endif
    for_each_pair(lens, num_seqs, num_kv_heads, [&](int64_t pair, Scratch& scratch) {
      const int64_t s = pair / num_kv_heads, h = pair % num_kv_heads;
      const int64_t offset = (s * num_heads + h * group) * head_dim;
#ifdef LLM_CLUSTER_AVX512_BF16
      if (fast_fn != nullptr) {
        fast_fn(reinterpret_cast<const uint16_t*>(qp + s * q_row + h * group * head_dim), reinterpret_cast<const uint16_t*>(kp + h * head_stride),
                reinterpret_cast<const uint16_t*>(vp + h * head_stride), tables + s * max_blocks, lens[s],
                block_size, group, static_cast<float>(scale), reinterpret_cast<uint16_t*>(op + offset), scratch);
        return;
      }
#endif
      pair_fn(qp + s * q_row + h * group * head_dim, kp + h * head_stride, vp + h * head_stride, tables + s * max_blocks, lens[s],
              block_size, head_dim, group, static_cast<float>(scale), op + offset, scratch);
    });
  });
}

at::Tensor paged_decode(at::Tensor q, at::Tensor kv_cache, at::Tensor block_table, at::Tensor context_lens,
                        double scale) {
  TORCH_CHECK(q.dim() == 3, "paged_decode needs q [S, H, D]");
  auto out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  paged_decode_out(out, q, kv_cache, block_table, context_lens, scale);
  return out;
}
