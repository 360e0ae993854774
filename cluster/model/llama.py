"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2) composed of tensor-parallel layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cluster.model.arch import ModelArch
from cluster.model.layers.attention import AttentionMetadata, PagedAttention
from cluster.model.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from cluster.model.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from cluster.model.layers.norm import RMSNorm
from cluster.model.layers.rotary import RotaryEmbedding
from cluster.parallel.tp_group import TPGroup

KVCache = torch.Tensor  # [2, kv_heads, num_blocks, block_size, head_dim]; see PagedAttention


class LlamaAttention(nn.Module):
    def __init__(self, arch: ModelArch, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(arch.hidden_size, arch.head_dim, arch.num_heads, arch.num_kv_heads,
                                          arch.qkv_bias, tp, dtype)
        self.o_proj = RowParallelLinear(arch.num_heads * arch.head_dim, arch.hidden_size, False, tp, dtype)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = arch.head_dim
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, arch.head_dim)

    def forward(self, cos_sin, x, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x).view(x.shape[0], -1, self.head_dim)
        qk, v = qkv.split([self.num_heads + self.num_kv_heads, self.num_kv_heads], dim=1)
        # q and k heads are rotated in one pass: fewer kernel launches per layer.
        q, k = RotaryEmbedding.apply(cos_sin, qk).split([self.num_heads, self.num_kv_heads], dim=1)
        return self.o_proj(self.attn(q, k, v, kv_cache, meta))


class LlamaMLP(nn.Module):
    def __init__(self, arch: ModelArch, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        size = arch.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(arch.hidden_size, [size, size], False, tp, dtype)
        self.down_proj = RowParallelLinear(size, arch.hidden_size, False, tp, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)
        self.self_attn = LlamaAttention(arch, tp, dtype)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)
        self.mlp = LlamaMLP(arch, tp, dtype)

    def forward(self, cos_sin, hidden, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        """``hidden`` is this layer's to update in place (the residual stream)."""
        attn = self.self_attn(cos_sin, self.input_layernorm(hidden), kv_cache, meta)
        normed = self.post_attention_layernorm(attn, residual=hidden)  # hidden += attn, fused
        return hidden.add_(self.mlp(normed))


class LlamaModel(nn.Module):
    """Embedding -> decoder layers -> final norm."""

    def __init__(self, arch: ModelArch, max_positions: int, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size, tp, dtype)
        self.rope = RotaryEmbedding(arch.head_dim, max_positions, arch.rope_theta, arch.rope_scaling)
        self.layers = nn.ModuleList(LlamaDecoderLayer(arch, tp, dtype) for _ in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)

    def forward(self, input_ids, positions, kv_caches: list[KVCache], meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        cos_sin = self.rope.lookup(positions, hidden.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden = layer(cos_sin, hidden, kv_cache, meta)
        return self.norm(hidden)


class LlamaForCausalLM(nn.Module):
    """The full causal LM; ``packed_modules`` maps checkpoint names onto our fused projections."""

    # checkpoint sub-name -> (our sub-name, shard id)
    packed_modules = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, arch: ModelArch, max_positions: int, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.arch = arch
        self.model = LlamaModel(arch, max_positions, tp, dtype)
        self.lm_head = ParallelLMHead(arch.vocab_size, arch.hidden_size, tp, dtype)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, positions, kv_caches: list[KVCache], meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, meta)

    def full_shape(self, param_name: str, shard_id=None) -> tuple[int, ...]:
        """The unsharded checkpoint shape of a tensor loaded into ``param_name`` (for validation)."""
        a = self.arch
        q_dim, kv_dim = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        kind, suffix = param_name.rsplit(".", 2)[-2:]
        rows = {"qkv_proj": {"q": q_dim, "k": kv_dim, "v": kv_dim}.get(shard_id),
                "gate_up_proj": a.intermediate_size, "o_proj": a.hidden_size, "down_proj": a.hidden_size,
                "embed_tokens": a.vocab_size, "lm_head": a.vocab_size}.get(kind, a.hidden_size)
        cols = {"o_proj": q_dim, "down_proj": a.intermediate_size}.get(kind, a.hidden_size)
        return (rows,) if suffix == "bias" or kind.endswith("norm") else (rows, cols)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """float32 logits [N, vocab] on the sampling rank, None elsewhere."""
        return self.lm_head(hidden)
