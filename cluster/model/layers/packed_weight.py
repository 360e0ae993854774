"""Linear weights pre-packed for oneDNN on CPU, and the native kernels for decode-sized inputs.

oneDNN re-lays a plain weight into its blocked (AMX / AVX-512) format on every call;
for decode-sized inputs that reorder costs as much as the matmul itself. Packing once
after loading makes small-batch bfloat16 matmuls faster with bit-identical results
(`llm-cluster bench-micro`; figures in docs/benchmarks.md). float32 is not packed (its packed
path sums in a different order, about 1e-6 relative): prefill-sized float32 inputs take
``F.linear``, decode-sized ones (up to ``GEMV_F32_MAX_ROWS`` rows) the native ``gemv_f32``, which
reads each weight once for all rows at close to the memory's bandwidth where MKL's small-M
float32 GEMM reached a quarter of it (float32 is what AVX2-only CPUs run). Its sums run in its own
fixed order, the same for a row whatever the batch; the float32 greedy checks against
transformers hold with it. A float32 weight whose values are exactly GGUF Q4_1 / Q8_0 blocks (a
model converted from a quantised GGUF file, as SmolLM2 is) is also held as those blocks
(``gguf_blocks.recover``): inputs of up to ``GGUF_BLOCKS_MAX_ROWS`` then read 6 or 9 bits a weight
instead of 32 and get the very same outputs (``gemv_q4_1`` / ``gemv_q8_0`` decode the blocks to the
dense values and sum as ``gemv_f32`` does). GPUs use ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cluster.model.layers import gguf_blocks as gguf

_PACKABLE_DTYPES = (torch.bfloat16,)


def can_pack(weight: torch.Tensor) -> bool:
    """Whether oneDNN takes this weight packed: a bfloat16 CPU weight, on a CPU whose instruction
    set oneDNN runs bfloat16 on (AVX-512 BW/VL/DQ, or AVX-NE-CONVERT). On others (AVX2 only) its
    reorder raises, and ``F.linear`` is the path."""
    return (weight.device.type == "cpu" and weight.dtype in _PACKABLE_DTYPES
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


GEMV_MAX_ROWS = 4  # up to this many rows the native GEMV streams the weight faster than oneDNN
# float32, 2-core AMD EPYC (AVX2), all of SmolLM2's weights: MKL vs gemv_f32 37.7 vs 21.1 ms at 1 row,
# 76.3 vs 20.9 at 4, 77.0 vs 44.1 at 16, 101.0 vs 78.5 at 32, 128.5 vs 112.3 at 48, 153.8 vs 148.2 at 64.
GEMV_F32_MAX_ROWS = 48
# Up to this many rows a weight held as GGUF blocks is read as them (the same outputs either way);
# past it the dense float32 loop is as fast: all of SmolLM2's weights, 2-core AMD EPYC (AVX2), ms,
# dense vs blocks: 21.5 vs 12.4 at 1 row, 22.8 vs 18.0 at 4, 33.7 vs 28.3 at 8, 42.7 vs 37.5 at 12,
# 52.3 vs 55.7 at 16; a decode step of 33 rows spent 34.1 vs 37.2 in its gate/up projections.
GGUF_BLOCKS_MAX_ROWS = 12


class PackedWeight:
    """A weight [out, in] ready for ``y = x W^T + b``; packed for oneDNN when possible.

    With the native kernels (``cluster.kernels``) built for AVX512-BF16, bfloat16 inputs of up to
    ``GEMV_MAX_ROWS`` rows (decode steps of a few sequences) take ``gemv_bf16`` over the plain
    weight instead: it streams the weight at about 16 GB/s where oneDNN's blocked kernels reach
    8-12 (docs/benchmarks.md). Its sums run in another order, so its bf16 outputs can differ from
    oneDNN's by a rounding step.
    """

    def __init__(self, weight: torch.Tensor, kernels=None, gguf_blocks: bool = False):
        self.dense = weight
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach()) if can_pack(weight) else None
        self.gemv = kernels.gemv_bf16 if self.packed is not None and kernels is not None and \
            kernels.has_gemv_bf16() else None
        self.gemv_f32 = kernels.gemv_f32 if weight.dtype == torch.float32 and weight.device.type == "cpu" and \
            kernels is not None and kernels.has_gemv_f32() else None
        self.blocks = gguf.recover(weight) if gguf_blocks and self.gemv_f32 is not None else None
        if self.blocks is not None:
            self.gemv_blocks = kernels.gemv_q4_1 if self.blocks.kind == "q4_1" else kernels.gemv_q8_0

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.gemv_f32 is not None and x.dim() == 2 and 0 < x.shape[0] <= GEMV_F32_MAX_ROWS:
            if self.blocks is not None and x.shape[0] <= GGUF_BLOCKS_MAX_ROWS:
                return self.gemv_blocks(x, self.blocks.qs, self.blocks.scales, bias)
            return self.gemv_f32(x, self.dense, bias)
        if self.packed is None or x.dim() != 2:
            return F.linear(x, self.dense, bias)
        if self.gemv is not None and 0 < x.shape[0] <= GEMV_MAX_ROWS:
            return self.gemv(x, self.dense, bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")
