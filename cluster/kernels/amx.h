// What the AMX kernels share (paged_decode.cpp's decode_pair_amx, prefill_attention_amx.cpp,
// gemm_amx_bf16.cpp): Linux's tile-state permission and the tile configuration record. Include
// where the build targets AMX on Linux, after <immintrin.h>.
#pragma once
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

// Linux hands a thread AMX's tile state only after the process asks for it (once; oneDNN asks too).
static inline bool amx_ready() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ok;
}

// The 64-byte record ``ldtilecfg`` reads: palette 1, then each tile's bytes a row and rows.
struct alignas(64) TileConfig {
  uint8_t palette_id, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
