"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2) composed of tensor-parallel layers.

With SwiftKV on (``arch.swiftkv``), layers from ``arch.swiftkv_layer`` on take their K/V from one
input, the residual stream entering that layer through ``norm_swiftkv``, projected by
``kv_proj_swiftkv`` (one K/V per AcrossKV group, RoPE on K as usual), and their queries from
``q_proj_swiftkv``. Every token's later-layer K/V are therefore known once the first layers have
run: they are written to the cache in bulk, and only the tokens that need logits (a ``TailBatch``:
decodes and each prompt's last token) run the remaining layers, reading K/V from the cache.

Attention is a backend the layers are built with: ``PagedAttention`` (the paged KV cache, for
serving) by default, ``DenseAttention`` (whole rows, no cache) for SwiftKV distillation and
reference runs, which train and check this same layer code (``cluster/swiftkv/dense_model.py``).
Under autograd the residual stream is updated out of place; serving (inference mode) updates it
in place.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cluster.model.arch import ModelArch
from cluster.model.layers.attention import AttentionMetadata, PagedAttention, TailBatch
from cluster.model.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from cluster.model.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    SwiftKVProjection,
    kv_heads_on_rank,
)
from cluster.model.layers.norm import RMSNorm
from cluster.model.layers.packed_weight import AMX_GEMM_MAX_ROWS
from cluster.model.layers.rotary import RotaryEmbedding
from cluster.distributed.tp_group import TPGroup

KVCache = torch.Tensor  # [2, kv_heads, num_blocks, block_size, head_dim]; see PagedAttention


class LlamaAttention(nn.Module):
    def __init__(self, arch: ModelArch, tp: TPGroup, dtype: torch.dtype, swiftkv: bool = False,
                 attention: type[nn.Module] = PagedAttention):
        super().__init__()
        self.swiftkv = swiftkv
        if swiftkv:  # queries only: K/V come from the model's SwiftKV projection, already cached
            self.q_proj_swiftkv = ColumnParallelLinear(arch.hidden_size, arch.num_heads * arch.head_dim,
                                                       arch.qkv_bias, tp, dtype)
            self.num_heads = self.q_proj_swiftkv.out_per_rank // arch.head_dim
            self.num_kv_heads = kv_heads_on_rank(arch.num_kv_heads, tp)[0]
        else:
            self.qkv_proj = QKVParallelLinear(arch.hidden_size, arch.head_dim, arch.num_heads, arch.num_kv_heads,
                                              arch.qkv_bias, tp, dtype)
            self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(arch.num_heads * arch.head_dim, arch.hidden_size, False, tp, dtype)
        self.head_dim = arch.head_dim
        self.attn = attention(self.num_heads, self.num_kv_heads, arch.head_dim)
        self._kernels = None

    def finalize_weights(self, kernels) -> None:
        """Rotate CPU activations in place with the native kernel (one pass, no copies)."""
        self._kernels = _cpu_kernels(self.o_proj.weight, kernels)

    def forward(self, cos_sin, x, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        if self.swiftkv:
            q = RotaryEmbedding.apply(cos_sin, self.q_proj_swiftkv(x).view(x.shape[0], -1, self.head_dim))
            return self.o_proj(self.attn(q, None, None, kv_cache, meta))
        qkv = self.qkv_proj(x).view(x.shape[0], -1, self.head_dim)
        heads, qk_heads = self.num_heads, self.num_heads + self.num_kv_heads
        qk, v = qkv[:, :qk_heads], qkv[:, qk_heads:]  # views (slicing costs less than split's tuple)
        if self._kernels is not None and not torch.is_grad_enabled():
            self._kernels.rotary_(qk, *cos_sin)  # in place, where the projection wrote them
        else:  # q and k heads are rotated in one pass: fewer kernel launches per layer
            qk = RotaryEmbedding.apply(cos_sin, qk)
        return self.o_proj(self.attn(qk[:, :heads], qk[:, heads:], v, kv_cache, meta))


class LlamaMLP(nn.Module):
    def __init__(self, arch: ModelArch, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        size = arch.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(arch.hidden_size, [size, size], False, tp, dtype)
        self.down_proj = RowParallelLinear(size, arch.hidden_size, False, tp, dtype)
        self._silu_mul = self._silu_mul_bf16 = None

    def finalize_weights(self, kernels) -> None:
        """Take the one-pass SwiGLU activation on CPU where it was built: in float32 its product is
        within 5e-7, relative, of the exact one (far below the linears' own rounding differences); in
        bfloat16 it is bit-identical to torch's two ops."""
        weight = self.down_proj.weight
        usable = kernels is not None and kernels.has_silu_mul()
        self._silu_mul = kernels if usable and weight.device.type == "cpu" and weight.dtype == torch.float32 else None
        # bfloat16: one pass, bit-identical to F.silu(gate).mul_(up) (torch's silu as a table, its roundings)
        usable = kernels is not None and kernels.has_silu_mul_bf16()
        usable = usable and weight.device.type == "cpu" and weight.dtype == torch.bfloat16
        self._silu_mul_bf16 = functools.partial(kernels.silu_mul_bf16, table=silu_bf16_table()) if usable else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._silu_mul_bf16 is not None and not torch.is_grad_enabled():
            gate_up = self.gate_up_proj(x)
            act = self._silu_mul_bf16(gate_up.reshape(-1, gate_up.shape[-1]))
            return self.down_proj(act.view(*gate_up.shape[:-1], gate_up.shape[-1] // 2))
        if self._silu_mul is not None and not torch.is_grad_enabled():
            fused = self.gate_up_proj.silu_mul(x)  # the projection's panels apply the activation themselves
            if fused is not None:
                return self.down_proj(fused)
            gate_up = self.gate_up_proj(x)
            return self.down_proj(self._silu_mul.silu_mul(gate_up.reshape(-1, gate_up.shape[-1])).view(
                *gate_up.shape[:-1], gate_up.shape[-1] // 2))
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        if torch.is_grad_enabled():  # training (SwiftKV distillation): autograd keeps both operands
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(gate).mul_(up))  # one buffer fewer per layer; the same values


@functools.cache
def silu_bf16_table() -> torch.Tensor:
    """torch's ``F.silu`` of every bfloat16 value, indexed by its bits (and one entry more, so that
    the kernel's 32-bit gathers stay inside): what ``silu_mul_bf16`` looks up. Computed by torch's
    own vectorised kernel, so the lookup is bit-identical to it."""
    every = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    return torch.cat((F.silu(every).view(torch.int16), torch.zeros(1, dtype=torch.int16)))


def _cpu_kernels(weight: torch.Tensor, kernels):
    """The native kernels where a layer runs on CPU, else None. In 16-bit they round where torch's
    ops round (bit-identical); in float32 the fused products may round once where torch rounds
    twice (a last-bit difference; the float32 greedy checks against transformers hold)."""
    return kernels if weight.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float16,
                                                                       torch.float32) else None


@dataclass(frozen=True)
class _NativeDecode:
    """What a decode step's layer needs to call the native CPU kernels one after another (float32 or
    bfloat16, one rank): the weights as the linears packed them, the norms' weights, the attention's
    shape, the SwiGLU activation's kernel."""

    kernels: object
    silu_mul: object  # kernels.silu_mul (float32) or kernels.silu_mul_bf16
    norm1: torch.Tensor
    norm2: torch.Tensor
    eps1: float
    eps2: float
    no_residual: torch.Tensor
    qkv: object  # PackedWeight of [q | k | v]
    qkv_bias: torch.Tensor | None
    o: object
    gate_up: object
    down: object
    heads: int
    kv_heads: int
    head_dim: int
    scale: float


@dataclass(frozen=True)
class _DecodeStack:
    """A bfloat16 decode step's layers below the SwiftKV split (all of them without SwiftKV) as one
    native call (``decode_layers_``, cluster/kernels/decode_layers.cpp): the same kernels in the same
    order as each layer's ``_decode_native``, bit-identical, without the interpreter between them.
    Built where every one of those layers runs natively over AMX-packed linears; it runs only when
    the step's kernels (``meta.decode_kernel``) are the ones it was built from (a step given others,
    e.g. the fault-isolation tests' failing wrapper, runs the layers one by one through them)."""

    kernels: object
    run: object  # kernels.decode_layers_
    weights: list  # seven a layer, in decode_layers.cpp's order
    silu_table: torch.Tensor
    heads: int
    kv_heads: int
    scale: float
    eps: float

    @classmethod
    def build(cls, kernels, natives: list) -> _DecodeStack | None:
        if kernels is None or not hasattr(kernels, "decode_layers_") or not natives or None in natives:
            return None
        first = natives[0]
        table = getattr(first.silu_mul, "keywords", {}).get("table")
        same = all((n.heads, n.kv_heads, n.head_dim, n.scale) == (first.heads, first.kv_heads, first.head_dim,
                                                                  first.scale) for n in natives)
        if table is None or not same or len({n.eps1 for n in natives} | {n.eps2 for n in natives}) != 1 or \
                first.norm1.dtype != torch.bfloat16 or \
                any(p.amx is None for n in natives for p in (n.qkv, n.o, n.gate_up, n.down)):
            return None
        none = first.norm1.new_empty(0)
        weights = []
        for n in natives:
            weights += [n.norm1, n.qkv.amx, none if n.qkv_bias is None else n.qkv_bias, n.o.amx, n.norm2,
                        n.gate_up.amx, n.down.amx]
        return cls(kernels, kernels.decode_layers_, weights, table, first.heads, first.kv_heads, first.scale,
                   first.eps1)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, tp: TPGroup, dtype: torch.dtype, swiftkv: bool = False,
                 attention: type[nn.Module] = PagedAttention):
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)
        self.self_attn = LlamaAttention(arch, tp, dtype, swiftkv, attention)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)
        self.mlp = LlamaMLP(arch, tp, dtype)
        self._native: _NativeDecode | None = None

    def finalize_weights(self, kernels) -> None:
        """After the parts prepared theirs: on CPU with the native kernels, one rank, float32 (packed
        panels) or bfloat16 (oneDNN-packed weights, the one-pass activation), decode steps run the
        layer as a straight sequence of kernel calls (``_decode_native``), the same kernels on the
        same tensors as the modules' forwards, without their dispatch (~4 ms of a 33-sequence decode
        step on a 2-core AVX2 EPYC, docs/benchmarks.md, eleventh pass; bfloat16: fourteenth)."""
        attn, mlp, n1, n2 = self.self_attn, self.mlp, self.input_layernorm, self.post_attention_layernorm
        parts = None if attn.swiftkv else (attn.qkv_proj._matmul, attn.o_proj._matmul, mlp.gate_up_proj._matmul,
                                           mlp.down_proj._matmul)
        silu_mul = None
        if mlp._silu_mul is not None and parts is not None and all(
                p is not None and p.panels is not None and not p.widened for p in parts):
            silu_mul = mlp._silu_mul.silu_mul  # float32 over the native panels
        elif mlp._silu_mul_bf16 is not None and parts is not None and all(
                p is not None and p.packed is not None for p in parts):
            silu_mul = mlp._silu_mul_bf16  # bfloat16 over oneDNN's packed weights
        usable = (kernels is not None and silu_mul is not None
                  and attn._kernels is not None and n1._kernels is not None
                  and n2._kernels is not None and isinstance(attn.attn, PagedAttention)
                  and attn.o_proj.tp.tp_size == 1 and attn.o_proj.bias is None and mlp.down_proj.bias is None
                  and mlp.gate_up_proj.bias is None)
        self._native = _NativeDecode(kernels, silu_mul, n1.weight, n2.weight, n1.eps, n2.eps, n1._no_residual,
                                     parts[0], attn.qkv_proj.bias, parts[1], parts[2], parts[3], attn.num_heads,
                                     attn.num_kv_heads, attn.head_dim, attn.attn.scale) if usable else None

    def forward(self, cos_sin, hidden, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        """``hidden`` is this layer's to update in place (the residual stream), except under autograd."""
        if self._native is not None and meta.native_decode_group(hidden.shape[0], padded=True) is not None and \
                not torch.is_grad_enabled():
            return self._decode_native(cos_sin, hidden, kv_cache, meta)
        attn = self.self_attn(cos_sin, self.input_layernorm(hidden), kv_cache, meta)
        if torch.is_grad_enabled():  # training: the stream's old values are saved for the backward pass
            hidden = hidden + attn
            return hidden + self.mlp(self.post_attention_layernorm(hidden))
        normed = self.post_attention_layernorm(attn, residual=hidden)  # hidden += attn, fused
        return hidden.add_(self.mlp(normed))

    def _decode_native(self, cos_sin, hidden, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        """forward() of a decode step (every row one sequence's next token), kernel by kernel: what
        RMSNorm, LlamaAttention, PagedAttention and LlamaMLP run on CPU, in their order."""
        n, k, group = self._native, self._native.kernels, meta.decodes[0]
        rows, qk_heads = hidden.shape[0], n.heads + n.kv_heads
        x = k.rms_norm(hidden, n.no_residual, n.norm1, n.eps1)
        qkv = n.qkv.linear(x, n.qkv_bias).view(rows, -1, n.head_dim)
        k.rotary_(qkv[:, :qk_heads], *cos_sin)
        # attention through the step's kernels (meta.decode_kernel), as PagedAttention runs it
        meta.decode_kernel.write_kv(kv_cache, qkv[:, n.heads:qk_heads], qkv[:, qk_heads:], meta.slot_mapping)
        seqs = group.num_seqs
        attn = meta.decode_kernel.paged_decode(qkv[:seqs, :n.heads], kv_cache, group.block_table,
                                               group.context_lens, n.scale).view(seqs, -1)
        if seqs < rows:  # a bucket's padding rows (bfloat16) attend to nothing: zeros, as PagedAttention gives
            attn = torch.cat((attn, attn.new_zeros(rows - seqs, attn.shape[1])))
        x = k.rms_norm(n.o.linear(attn), hidden, n.norm2, n.eps2)  # hidden += attention, fused
        act = n.gate_up.silu_mul(x)
        if act is None:  # decode-sized inputs take the gemv, bfloat16 oneDNN: the activation is its own pass
            act = n.silu_mul(n.gate_up.linear(x))
        return hidden.add_(n.down.linear(act))


class LlamaModel(nn.Module):
    """Embedding -> decoder layers -> final norm."""

    def __init__(self, arch: ModelArch, max_positions: int, tp: TPGroup, dtype: torch.dtype,
                 attention: type[nn.Module] = PagedAttention):
        super().__init__()
        self.arch = arch
        self.attention = attention
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size, tp, dtype)
        self.rope = RotaryEmbedding(arch.head_dim, max_positions, arch.rope_theta, arch.rope_scaling)
        split = arch.swiftkv_layer
        self.layers = nn.ModuleList(LlamaDecoderLayer(arch, tp, dtype, i >= split, attention)
                                    for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)
        if arch.skips_prefill:
            self.norm_swiftkv = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)
            self.kv_proj_swiftkv = SwiftKVProjection(arch.hidden_size, arch.head_dim, arch.num_kv_heads,
                                                     arch.num_cache_layers - split, arch.qkv_bias, tp, dtype)

    def forward(self, input_ids, positions, kv_caches: list[KVCache], meta: AttentionMetadata,
                tail: TailBatch | None = None) -> torch.Tensor:
        """Hidden states of every token, or with SwiftKV of the ``tail`` rows only."""
        hidden = self.embed_tokens(input_ids)
        cos_sin = self.rope.lookup(positions, hidden.dtype)
        hidden = self.run_layers(0, self.arch.swiftkv_layer, cos_sin, hidden, kv_caches, meta)
        if self.arch.skips_prefill:
            hidden = self.swiftkv_layers(cos_sin, hidden, kv_caches, meta, tail)
        return self.norm(hidden)

    def finalize_weights(self, kernels) -> None:
        """After the layers prepared theirs: bfloat16 decode steps of up to ``AMX_GEMM_MAX_ROWS`` rows
        run the layers below the SwiftKV split in one native call where each of them could run
        natively over AMX-packed linears (``_DecodeStack``)."""
        self._stack = _DecodeStack.build(kernels, [layer._native for layer in
                                                   self.layers[:self.arch.swiftkv_layer]])

    def run_layers(self, start: int, end: int, cos_sin, hidden, kv_caches: list, meta) -> torch.Tensor:
        """Layers [start, end) over every token (below the SwiftKV split, or all of them without it)."""
        stack = getattr(self, "_stack", None)
        if stack is not None and start == 0 and end == self.arch.swiftkv_layer and \
                meta.decode_kernel is stack.kernels and hidden.shape[0] <= AMX_GEMM_MAX_ROWS and \
                not torch.is_grad_enabled():
            group = meta.native_decode_group(hidden.shape[0], padded=True)
            if group is not None:
                caches = [kv_caches[self.arch.cache_index(i)] for i in range(end)]
                stack.run(hidden, *cos_sin, caches, meta.slot_mapping, group.block_table, group.context_lens,
                          stack.weights, stack.silu_table, stack.heads, stack.kv_heads, stack.scale, stack.eps)
                return hidden
        for i in range(start, end):
            hidden = self.layers[i](cos_sin, hidden, kv_caches[self.arch.cache_index(i)], meta)
        return hidden

    def swiftkv_layers(self, cos_sin, hidden, kv_caches: list, meta, tail: TailBatch) -> torch.Tensor:
        """From the stream entering the split: every SwiftKV layer's K/V for every token into the
        cache, then only the ``tail`` rows through the later layers (not yet normed)."""
        split = self.arch.swiftkv_layer
        self._write_swiftkv_cache(cos_sin, hidden, kv_caches[split:], meta)
        if tail.rows.numel() == 0:  # nothing needs logits this step (a long prompt's earlier chunks)
            return hidden[:0]
        hidden = hidden[tail.rows]
        cos_sin = tuple(t[tail.rows] for t in cos_sin)
        return self.run_layers(split, self.arch.num_layers, cos_sin, hidden, kv_caches, tail.meta)

    def _write_swiftkv_cache(self, cos_sin, hidden, caches: list, meta) -> None:
        """K/V of every SwiftKV layer group, for every token, from the residual stream at the split."""
        proj = self.kv_proj_swiftkv
        kv = proj(self.norm_swiftkv(hidden)).view(hidden.shape[0], proj.num_groups, 2, proj.num_kv_heads, -1)
        keys = RotaryEmbedding.apply(cos_sin, kv[:, :, 0].reshape(hidden.shape[0], -1, kv.shape[-1]))
        keys = keys.view(kv[:, :, 0].shape)
        for group, cache in enumerate(caches):
            self.attention.write(cache, keys[:, group], kv[:, group, 1], meta)


class LlamaForCausalLM(nn.Module):
    """The full causal LM; ``packed_modules`` maps checkpoint names onto our fused projections."""

    # checkpoint sub-name -> (our sub-name, shard id)
    packed_modules = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, arch: ModelArch, max_positions: int, tp: TPGroup, dtype: torch.dtype,
                 attention: type[nn.Module] = PagedAttention):
        super().__init__()
        self.arch = arch
        self.model = LlamaModel(arch, max_positions, tp, dtype, attention)
        self.lm_head = ParallelLMHead(arch.vocab_size, arch.hidden_size, tp, dtype)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, positions, kv_caches: list[KVCache], meta: AttentionMetadata,
                tail: TailBatch | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, meta, tail)

    def full_shape(self, param_name: str, shard_id=None) -> tuple[int, ...]:
        """The unsharded checkpoint shape of a tensor loaded into ``param_name`` (for validation)."""
        a = self.arch
        q_dim, kv_dim = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        kind, suffix = param_name.rsplit(".", 2)[-2:]
        rows = {"qkv_proj": {"q": q_dim, "k": kv_dim, "v": kv_dim}.get(shard_id), "q_proj_swiftkv": q_dim,
                "kv_proj_swiftkv": kv_dim,
                "gate_up_proj": a.intermediate_size, "o_proj": a.hidden_size, "down_proj": a.hidden_size,
                "embed_tokens": a.vocab_size, "lm_head": a.vocab_size}.get(kind, a.hidden_size)
        cols = {"o_proj": q_dim, "down_proj": a.intermediate_size}.get(kind, a.hidden_size)
        return (rows,) if suffix == "bias" or kind.endswith(("norm", "norm_swiftkv")) else (rows, cols)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """float32 logits [N, vocab] on the sampling rank, None elsewhere."""
        return self.lm_head(hidden)
