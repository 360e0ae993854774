// A decode step's decoder layers in one call (CPU, bfloat16, Xeons with AMX-BF16): the same kernels,
// on the same tensors and in the same order as LlamaDecoderLayer._decode_native runs them one layer
// at a time from Python, so the outputs are bit-identical; what goes is the interpreter between them
// (~30 Python-level calls a layer) and two passes a layer:
// - a layer's residual add of its MLP output is the next layer's input norm (rms_norm with a
//   residual adds, rounds to bfloat16, then normalises what it stored: hidden.add_() then rms_norm);
// - a bucket's padding rows attend to nothing: their rows of the attention output are zeroed once a
//   step in a buffer the layers share, instead of a zero block concatenated per layer.
// Linears are gemm_amx_bf16 over the weights packed by pack_amx_bf16, so at most 64 rows.
#include "aten_lite.h"

#include <ATen/ops/zeros.h>

#include <vector>

at::Tensor rms_norm(at::Tensor x, at::Tensor residual, at::Tensor weight, double eps);
at::Tensor gemm_amx_bf16(at::Tensor x, at::Tensor packed, c10::optional<at::Tensor> bias);
void rotary_(at::Tensor x, at::Tensor cos, at::Tensor sin);
void write_kv(at::Tensor kv_cache, at::Tensor k, at::Tensor v, at::Tensor slot_mapping);
void paged_decode_out(at::Tensor out, at::Tensor q, at::Tensor kv_cache, at::Tensor block_table,
                      at::Tensor context_lens, double scale);
at::Tensor silu_mul_bf16(at::Tensor x, at::Tensor table);

// Per layer, kWeights tensors in this order: the input norm's weight, Q|K|V packed, Q|K|V's bias (an
// empty tensor for none), O packed, the post-attention norm's weight, gate|up packed, down packed.
constexpr size_t kWeights = 7;

// hidden [rows, hidden] bfloat16, updated in place (the residual stream); cos/sin as rotary_ takes
// them; caches one per layer; the decode group's block table and context lengths (its sequences are
// hidden's first rows, the rest padding).
void decode_layers_(at::Tensor hidden, at::Tensor cos, at::Tensor sin, std::vector<at::Tensor> caches,
                    at::Tensor slot_mapping, at::Tensor block_table, at::Tensor context_lens,
                    std::vector<at::Tensor> weights, at::Tensor silu_table, int64_t heads, int64_t kv_heads,
                    double scale, double eps) {
  const size_t layers = caches.size();
  TORCH_CHECK(weights.size() == layers * kWeights, "decode_layers_: ", kWeights, " weights a layer, got ",
              weights.size(), " for ", layers, " layers");
  TORCH_CHECK(hidden.dim() == 2 && hidden.is_contiguous() && hidden.scalar_type() == at::kBFloat16,
              "decode_layers_ needs a contiguous bfloat16 hidden [rows, hidden]");
  const int64_t rows = hidden.size(0), seqs = block_table.size(0);
  TORCH_CHECK(seqs >= 1 && seqs <= rows && context_lens.size(0) == seqs,
              "decode_layers_: the decode group's sequences must be hidden's first rows");
  const int64_t head_dim = caches.empty() ? 0 : caches[0].size(-1);
  const auto no_residual = hidden.new_empty({0});
  // the attention output of every layer; padding rows zero for the whole step
  auto attn = at::zeros({rows, heads, head_dim}, hidden.options());
  auto attn_seqs = attn.narrow(0, 0, seqs);
  auto attn_rows = attn.view({rows, heads * head_dim});
  at::Tensor pending;  // the last layer's MLP output, not yet added to hidden
  for (size_t l = 0; l < layers; ++l) {
    const at::Tensor* w = weights.data() + l * kWeights;
    const auto x = pending.defined() ? rms_norm(pending, hidden, w[0], eps) : rms_norm(hidden, no_residual, w[0], eps);
    const auto bias = w[2].numel() > 0 ? c10::optional<at::Tensor>(w[2]) : c10::nullopt;
    const auto qkv = gemm_amx_bf16(x, w[1], bias).view({rows, heads + 2 * kv_heads, head_dim});
    rotary_(qkv.narrow(1, 0, heads + kv_heads), cos, sin);
    write_kv(caches[l], qkv.narrow(1, heads, kv_heads), qkv.narrow(1, heads + kv_heads, kv_heads), slot_mapping);
    paged_decode_out(attn_seqs, qkv.narrow(0, 0, seqs).narrow(1, 0, heads), caches[l], block_table, context_lens,
                     scale);
    const auto normed = rms_norm(gemm_amx_bf16(attn_rows, w[3], c10::nullopt), hidden, w[4], eps);  // hidden += o
    pending = gemm_amx_bf16(silu_mul_bf16(gemm_amx_bf16(normed, w[5], c10::nullopt), silu_table), w[6], c10::nullopt);
  }
  if (pending.defined()) hidden.add_(pending);
}
