// Python bindings of the optional CPU kernels (built by cluster/kernels/loader.py).
// pybind11 with torch's Tensor casters only: torch/extension.h (the whole C++ frontend) took 28 s of
// the first-use build on a 2-core box, this header 9 s.
#include <torch/csrc/utils/pybind.h>

at::Tensor paged_decode(at::Tensor q, at::Tensor kv_cache, at::Tensor block_table,
                        at::Tensor context_lens, double scale);
at::Tensor rms_norm(at::Tensor x, at::Tensor residual, at::Tensor weight, double eps);
at::Tensor gemv_bf16(at::Tensor x, at::Tensor weight, c10::optional<at::Tensor> bias);
bool has_gemv_bf16();
at::Tensor pack_amx_bf16(at::Tensor weight);
at::Tensor gemm_amx_bf16(at::Tensor x, at::Tensor packed, c10::optional<at::Tensor> bias);
bool has_gemm_amx_bf16();
at::Tensor gemv_f32(at::Tensor x, at::Tensor weight, c10::optional<at::Tensor> bias);
bool has_gemv_f32();
at::Tensor gemv_q4_1(at::Tensor x, at::Tensor qs, at::Tensor scales, c10::optional<at::Tensor> bias);
at::Tensor gemv_q8_0(at::Tensor x, at::Tensor qs, at::Tensor scales, c10::optional<at::Tensor> bias);
at::Tensor gemm_f32(at::Tensor x, at::Tensor panels, int64_t n_size, c10::optional<at::Tensor> bias);
at::Tensor pack_f32(at::Tensor weight);
at::Tensor gemm_f32_silu_mul(at::Tensor x, at::Tensor panels, int64_t n_size);
bool has_gemm_f32();
at::Tensor prefill_attention(at::Tensor q, at::Tensor k, at::Tensor v, int64_t q_offset, double scale);
bool has_prefill_attention();
at::Tensor prefill_attention_amx(at::Tensor q, at::Tensor k, at::Tensor v, int64_t q_offset, double scale);
bool has_prefill_attention_amx();
bool has_widening_decode();
void rotary_(at::Tensor x, at::Tensor cos, at::Tensor sin);
at::Tensor silu_mul(at::Tensor x);
bool has_silu_mul();
at::Tensor silu_mul_bf16(at::Tensor x, at::Tensor table);
bool has_silu_mul_bf16();
void write_kv(at::Tensor kv_cache, at::Tensor k, at::Tensor v, at::Tensor slot_mapping);
at::Tensor argmax_rows(at::Tensor logits);
void decode_layers_(at::Tensor hidden, at::Tensor cos, at::Tensor sin, std::vector<at::Tensor> caches,
                    at::Tensor slot_mapping, at::Tensor block_table, at::Tensor context_lens,
                    std::vector<at::Tensor> weights, at::Tensor silu_table, int64_t heads, int64_t kv_heads,
                    double scale, double eps);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "decode attention over a paged KV cache (CPU)");
  m.def("rms_norm", &rms_norm, "fused residual add + RMSNorm (CPU)");
  m.def("gemv_bf16", &gemv_bf16, "y = x W^T (+ b) for 1-4 bfloat16 rows (CPU, AVX512-BF16)");
  m.def("rotary_", &rotary_, "rotary embedding of [T, H, D] heads in place (CPU)");
  m.def("has_gemv_bf16", &has_gemv_bf16, "whether gemv_bf16 was built (AVX512-BF16)");
  m.def("pack_amx_bf16", &pack_amx_bf16, "a bfloat16 weight [N, K] as AMX B tiles [N / 16, K / 32, 16, 32] for gemm_amx_bf16");
  m.def("gemm_amx_bf16", &gemm_amx_bf16, "y = x W^T (+ b) in bfloat16 for up to 64 rows over a weight packed by pack_amx_bf16 (CPU, AMX-BF16)");
  m.def("decode_layers_", &decode_layers_, "a bfloat16 decode step's decoder layers in one call, hidden updated in place (CPU, AMX-BF16; see decode_layers.cpp)");
  m.def("has_gemm_amx_bf16", &has_gemm_amx_bf16, "whether gemm_amx_bf16 was built (AMX-BF16) and Linux grants the tile state");
  m.def("gemv_f32", &gemv_f32, "y = x W^T (+ b) for a few float32 rows, each weight read once (CPU, AVX2 + FMA)");
  m.def("has_gemv_f32", &has_gemv_f32, "whether gemv_f32 was built (AVX2 + FMA)");
  m.def("gemm_f32", &gemm_f32, "y = x W^T (+ b) in float32 over a weight packed by pack_f32 (CPU, AVX2 + FMA)");
  m.def("gemm_f32_silu_mul", &gemm_f32_silu_mul, "silu(gate) * up of x [gate | up]^T over the merged weight's panels, one pass (CPU, AVX2 + FMA)");
  m.def("pack_f32", &pack_f32, "a float32 weight [N, K] as column panels [ceil(N / 16), K, 16] for gemm_f32");
  m.def("has_gemm_f32", &has_gemm_f32, "whether gemm_f32 was built (AVX2 + FMA)");
  m.def("prefill_attention", &prefill_attention,
        "causal float32 attention of a prompt chunk over its context [S, Hkv, D] (CPU, AVX2 + FMA)");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of x = [gate | up], one pass (CPU, float32, AVX2 + FMA)");
  m.def("has_silu_mul", &has_silu_mul, "whether silu_mul was built (AVX2 + FMA)");
  m.def("silu_mul_bf16", &silu_mul_bf16,
        "silu(gate) * up of x = [gate | up] in bfloat16 from torch's silu of every bfloat16 value (table), bit-identical to F.silu(gate).mul_(up) (CPU, AVX-512)",
        pybind11::arg("x"), pybind11::arg("table"));
  m.def("has_silu_mul_bf16", &has_silu_mul_bf16, "whether silu_mul_bf16 was built (AVX-512)");
  m.def("has_prefill_attention", &has_prefill_attention, "whether prefill_attention was built (AVX2 + FMA)");
  m.def("prefill_attention_amx", &prefill_attention_amx,
        "causal bfloat16 attention of a prompt chunk over its context [S, Hkv, D] (CPU, AMX-BF16)");
  m.def("has_prefill_attention_amx", &has_prefill_attention_amx,
        "whether prefill_attention_amx was built (AVX512-BF16 + AMX-BF16) and Linux grants the tile state");
  m.def("has_widening_decode", &has_widening_decode,
        "whether paged_decode reads bfloat16 / float16 caches under float32 queries (AVX2 + FMA + F16C)");
  m.def("gemv_q4_1", &gemv_q4_1, "gemv_f32 over a weight held as GGUF Q4_1 blocks, decoded exactly (CPU, AVX2)");
  m.def("write_kv", &write_kv, "store a step's K/V [T, Hkv, D] at their slots of a paged cache (CPU; 16-bit caches rounded once)");
  m.def("argmax_rows", &argmax_rows, "each row's first index of its largest value, NaN first, as torch.argmax(dim=-1) (CPU, float32)");
  m.def("gemv_q8_0", &gemv_q8_0, "gemv_f32 over a weight held as GGUF Q8_0 blocks, decoded exactly (CPU, AVX2)");
}
