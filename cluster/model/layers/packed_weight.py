"""Linear weights pre-packed for oneDNN on CPU, and the native kernels for float32.

oneDNN re-lays a plain weight into its blocked (AMX / AVX-512) format on every call;
for decode-sized inputs that reorder costs as much as the matmul itself. Packing once
after loading makes small-batch bfloat16 matmuls faster with bit-identical results
(`llm-cluster bench-micro`; figures in docs/benchmarks.md).

float32 (what AVX2-only CPUs run) takes the native kernels where they are built. The weight is
re-laid once into column panels (``pack_f32``) and every input of more than a few rows runs
``gemm_f32`` over them: a register tile of 5-6 rows by 16 columns, no per-call re-layout; it beats
torch's float32 linear (MKL) up to hundreds of rows, 2.2x at 34 (a short prompt, a decode step of 33
sequences), and matches it at 1,024. Inputs of up to ``GEMV_F32_MAX_ROWS`` read the plain weight
through ``gemv_f32`` instead (a decode step of a few sequences streams the weight once at close to
the memory's bandwidth). A float32 weight whose values are exactly GGUF Q4_1 / Q8_0 blocks (a model
converted from a quantised GGUF file, as SmolLM2 is) is also held as those blocks
(``gguf_blocks.recover``): inputs of up to ``GGUF_BLOCKS_MAX_ROWS`` then read 6 or 9 bits a weight
instead of 32 and get the very same outputs as ``gemv_f32`` (``gemv_q4_1`` / ``gemv_q8_0`` decode the
blocks to the dense values and sum as ``gemv_f32`` does). Each kernel sums in its own fixed order,
the same for a row whatever the batch; the float32 greedy checks against transformers hold with all
of them. The panels are a second float32 copy of the weight (the plain one stays the parameter).

bfloat16 on a CPU that only emulates it (AVX2: no oneDNN bfloat16 kernels, ``can_pack`` false):
torch's bfloat16 linear runs there at a fifth of float32's speed or less. Where the float32 kernels
are built the weight is widened (exactly) into float32 panels instead, and every input runs
``gemm_f32``: products of bfloat16 values are exact in float32, summed in float32, and the output
rounded to bfloat16 once, which is what a native bfloat16 matmul computes, up to the order of the
sums. The panels are twice the bfloat16 weight's bytes.
GPUs use ``F.linear``.
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
# With AMX-BF16, up to this many rows ``gemm_amx_bf16`` runs over its own packed copy instead (1.2-1.6x
# oneDNN at 5-64 rows, the GEMV's equal at 1 and 1.2x it at 4; SmolLM2's 30 layers and head read in
# turn, 2-core Xeon: docs/benchmarks.md, fourteenth pass).
AMX_GEMM_MAX_ROWS = 64
# float32 over the plain weight up to this many rows, then the packed panels. All of SmolLM2's weights
# (with the tied head), 2-core AMD EPYC (AVX2), ms, gemv_f32 vs gemm_f32 (MKL): 22.0 vs 23.3 (40.0) at
# 1 row, 21.1 vs 21.8 (70.7) at 4, 28.7 vs 27.8 (77.4) at 8, 47.4 vs 37.4 (88.9) at 16, 85.8 vs 58.1
# (126.5) at 33, 155.8 vs 103.5 (182.6) at 64.
GEMV_F32_MAX_ROWS = 4
# Up to this many rows a weight held as GGUF blocks is read as them (the same outputs as gemv_f32);
# past it the panels are faster: the same weights, ms, blocks vs gemm_f32: 12.0 vs 23.3 at 1 row,
# 16.0 vs 21.8 at 4, 28.1 vs 27.8 at 8, 38.1 vs 33.2 at 12, 45.4 vs 37.4 at 16.
GGUF_BLOCKS_MAX_ROWS = 8


class PackedWeight:
    """A weight [out, in] ready for ``y = x W^T + b``; packed for oneDNN when possible.

    With the native kernels (``cluster.kernels``) built for AVX512-BF16, bfloat16 inputs of up to
    ``GEMV_MAX_ROWS`` rows (decode steps of a few sequences) take ``gemv_bf16`` over the plain
    weight instead: it streams the weight at about 16 GB/s where oneDNN's blocked kernels reach
    8-12 (docs/benchmarks.md). With AMX, inputs of up to ``AMX_GEMM_MAX_ROWS`` take
    ``gemm_amx_bf16`` over a third copy of the weight, packed as AMX tiles. Their sums run in
    another order, so their bf16 outputs can differ from oneDNN's by a rounding step.
    """

    def __init__(self, weight: torch.Tensor, kernels=None, gguf_blocks: bool = False):
        self.dense = weight
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach()) if can_pack(weight) else None
        self.gemv = kernels.gemv_bf16 if self.packed is not None and kernels is not None and \
            kernels.has_gemv_bf16() else None
        amx = self.packed is not None and kernels is not None and kernels.has_gemm_amx_bf16() and \
            weight.dim() == 2 and weight.shape[0] % 16 == 0 and weight.shape[1] % 32 == 0
        self.amx = kernels.pack_amx_bf16(weight.detach().contiguous()) if amx else None
        self.amx_gemm = kernels.gemm_amx_bf16 if amx else None
        f32_kernels = weight.device.type == "cpu" and kernels is not None and \
            kernels.has_gemv_f32() and kernels.has_gemm_f32()  # one build condition (AVX2 + FMA) for both
        f32 = weight.dtype == torch.float32 and f32_kernels
        # bfloat16 where oneDNN cannot run it: float32 panels of the widened weight (see the module doc)
        self.widened = weight.dtype == torch.bfloat16 and self.packed is None and f32_kernels
        self.gemv_f32 = kernels.gemv_f32 if f32 else None
        self.gemm_f32 = kernels.gemm_f32 if f32 or self.widened else None
        self.silu_mul_f32 = getattr(kernels, "gemm_f32_silu_mul", None) if f32 else None
        self.panels = kernels.pack_f32(weight.detach().float()) if f32 or self.widened else None
        self.blocks = gguf.recover(weight) if gguf_blocks and f32 else None
        if self.blocks is not None:
            self.gemv_blocks = kernels.gemv_q4_1 if self.blocks.kind == "q4_1" else kernels.gemv_q8_0

    def onednn_floor(self) -> int | None:
        """Up to how many rows ``linear`` takes a native kernel, past which oneDNN runs it (and builds a
        matmul for each new row count); None where oneDNN never runs it (float32 and AVX2's widened
        bfloat16 take our own panels). Follows ``linear``'s order of choice."""
        if self.packed is None:
            return None
        if self.amx is not None:
            return AMX_GEMM_MAX_ROWS
        return GEMV_MAX_ROWS if self.gemv is not None else 0

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor | None:
        """SwiGLU's silu(gate) * up of ``x`` times this merged [gate | up] weight (no bias), in one
        pass (``gemm_f32_silu_mul``) where ``linear`` would take the float32 panels; None elsewhere."""
        if self.silu_mul_f32 is None or x.dim() != 2 or x.dtype != torch.float32:
            return None
        rows, half = x.shape[0], self.dense.shape[0] // 2
        if rows <= GEMV_F32_MAX_ROWS or (self.blocks is not None and rows <= GGUF_BLOCKS_MAX_ROWS) or half % 16:
            return None
        return self.silu_mul_f32(x, self.panels, half)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.widened and x.dim() == 2 and x.shape[0] > 0:
            out = self.gemm_f32(x.float(), self.panels, self.dense.shape[0], None if bias is None else bias.float())
            return out.to(x.dtype)
        if self.panels is not None and x.dim() == 2 and x.shape[0] > 0:
            rows = x.shape[0]
            if self.blocks is not None and rows <= GGUF_BLOCKS_MAX_ROWS:
                return self.gemv_blocks(x, self.blocks.qs, self.blocks.scales, bias)
            if rows <= GEMV_F32_MAX_ROWS:
                return self.gemv_f32(x, self.dense, bias)
            return self.gemm_f32(x, self.panels, self.dense.shape[0], bias)
        if self.packed is None or x.dim() != 2:
            return F.linear(x, self.dense, bias)
        if self.amx is not None and 0 < x.shape[0] <= AMX_GEMM_MAX_ROWS:
            return self.amx_gemm(x, self.amx, bias)
        if self.gemv is not None and 0 < x.shape[0] <= GEMV_MAX_ROWS:
            return self.gemv(x, self.dense, bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")
