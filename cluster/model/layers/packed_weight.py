"""Linear weights pre-packed for oneDNN on CPU.

oneDNN re-lays a plain weight into its blocked (AMX / AVX-512) format on every call;
for decode-sized inputs that reorder costs as much as the matmul itself. Packing once
after loading makes small-batch bfloat16 matmuls faster with bit-identical results
(`llm-cluster bench-micro`; figures in docs/benchmarks.md). float32 stays on ``F.linear``: its packed path sums in a
different order (about 1e-6 relative), and float32 is our exactness reference against
transformers. GPUs use ``F.linear`` too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_PACKABLE_DTYPES = (torch.bfloat16,)


def can_pack(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype in _PACKABLE_DTYPES
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


class PackedWeight:
    """A weight [out, in] ready for ``y = x W^T + b``; packed for oneDNN when possible."""

    def __init__(self, weight: torch.Tensor):
        self.dense = weight
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach()) if can_pack(weight) else None

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.packed is None or x.dim() != 2:
            return F.linear(x, self.dense, bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")
