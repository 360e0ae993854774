"""Paged attention over the block KV cache, in plain torch.

Everything that knows how K/V are stored and read lives here, so a GPU kernel
(FlashAttention, FlashInfer) can replace ``PagedAttention.forward`` without the
model noticing. The cache of one layer is ``[num_blocks, block_size, num_kv_heads, head_dim]``
for K and for V: a rank holds only its own KV heads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class PrefillChunk:
    """One sequence's prompt chunk in the step's flattened token batch."""

    token_start: int  # index of its first token in the batch
    num_tokens: int  # tokens in the chunk
    start_position: int  # tokens already in the cache before it (0 = nothing cached)
    context_slots: torch.Tensor | None  # cache slots of all start_position + num_tokens keys; None if start 0
    causal_mask: torch.Tensor | None  # [num_tokens, context] bool, True = may attend; None if start 0


@dataclass
class DecodeGroup:
    """Decode sequences of similar context length, attended together with padding to the longest."""

    token_start: int  # index of the group's first token in the batch
    num_seqs: int  # one token per sequence
    context_slots: torch.Tensor  # [num_seqs, L] cache slots of each context, padded
    mask: torch.Tensor | None  # [num_seqs, 1, 1, L] bool, True for real keys; None when none are padded


@dataclass
class AttentionMetadata:
    """Where this step's tokens live in the cache; built once per step, shared by every layer."""

    slot_mapping: torch.Tensor  # [T] cache slot (block_id * block_size + offset) of each new token
    decodes: list[DecodeGroup] = field(default_factory=list)  # the first tokens of the batch
    prefills: list[PrefillChunk] = field(default_factory=list)


class PagedAttention(nn.Module):
    """Writes the step's K/V into the paged cache, then attends each query to its context."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D] -> [T, Hq * D]."""
        k_cache, v_cache = (c.view(-1, self.num_kv_heads, self.head_dim) for c in kv_cache)
        k_cache[meta.slot_mapping] = k
        v_cache[meta.slot_mapping] = v
        out = torch.empty_like(q)
        for group in meta.decodes:
            rows = slice(group.token_start, group.token_start + group.num_seqs)
            out[rows] = self._decode(q[rows], k_cache, v_cache, group)
        for chunk in meta.prefills:
            rows = slice(chunk.token_start, chunk.token_start + chunk.num_tokens)
            out[rows] = self._prefill(q[rows], k[rows], v[rows], k_cache, v_cache, chunk)
        return out.view(q.shape[0], -1)

    def _decode(self, q, k_cache, v_cache, group: DecodeGroup) -> torch.Tensor:
        keys = k_cache[group.context_slots].transpose(1, 2)  # [D, Hkv, L, hd]
        values = v_cache[group.context_slots].transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2), keys, values, attn_mask=group.mask, scale=self.scale, enable_gqa=True
        )
        return out.squeeze(2)

    def _prefill(self, q, k, v, k_cache, v_cache, chunk: PrefillChunk) -> torch.Tensor:
        if chunk.context_slots is None:  # nothing cached before: attend within the chunk
            keys, values, mask, causal = k, v, None, True
        else:
            keys, values = k_cache[chunk.context_slots], v_cache[chunk.context_slots]
            mask, causal = chunk.causal_mask, False
        # A leading batch dim keeps torch on its fused CPU kernel (3-D inputs take a slow path).
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0), keys.transpose(0, 1).unsqueeze(0), values.transpose(0, 1).unsqueeze(0),
            attn_mask=mask, is_causal=causal, scale=self.scale, enable_gqa=True,
        )
        return out.squeeze(0).transpose(0, 1)
