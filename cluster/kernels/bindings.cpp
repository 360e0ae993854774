// Python bindings of the optional CPU kernels (built by cluster/kernels/loader.py).
#include <torch/extension.h>

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor kv_cache, torch::Tensor block_table,
                           torch::Tensor context_lens, double scale);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "decode attention over a paged KV cache (CPU)");
  m.def("rms_norm", &rms_norm, "fused residual add + RMSNorm (CPU)");
}
