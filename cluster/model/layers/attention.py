"""Paged attention over the block KV cache: the seam between the model and its attention backend.

Everything that knows how K/V are stored and read lives here; the model calls
``PagedAttention`` and never learns which backend ran. Two backends, picked per device by the
runner (``WorkerSpec.attention_backend``) through the metadata it builds:

- torch (CPU): the native C++ decode kernel (``cluster.kernels``) or torch's path, and torch's
  SDPA for prefill, on ``DecodeGroup``s and ``PrefillChunk``s;
- triton (CUDA): ``cluster.kernels.triton_attention``, reading the cache in place through block
  tables for decode and for variable-length prefill over a cached prefix, from ``VarlenMetadata``.

Layout: one layer's cache is one tensor ``[2 (K, V), num_kv_heads, num_blocks, block_size, head_dim]``,
head-major, so a rank holds only its own KV heads, K and V are written and gathered in one
operation, and a context gathered block by block is already in the ``[heads, tokens, head_dim]``
shape attention wants, without a transpose.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# Below this many context tokens a lone decode uses torch's fused SDPA; above it (and for
# batches) the explicit matmul path, which torch's CPU SDPA beats only for tiny contexts.
_SDPA_DECODE_MAX_CONTEXT = 128
_SMALL_GATHER_BLOCKS = 16  # up to this many blocks, one fancy-indexing op beats a per-head loop
# torch's CPU flash attention compiles a brgemm kernel for every new (query tail, key tail) shape
# and keeps it for the life of the process: a soaking replica gained 14 MB of them in 4 minutes,
# without end, and 1,200 random prefill shapes grew a process 395 MB (measured). Prefill shapes
# rounded up to a multiple of this bound that cache (17 MB after the same 1,200); the padded query
# rows are dropped and the padded keys masked out.
CPU_PREFILL_SHAPE_QUANTUM = 32


@dataclass
class PrefillChunk:
    """One sequence's prompt chunk in the step's flattened token batch.

    With a cached prefix (``block_table`` set) its attention runs in two parts over the context
    read from the cache, merged by their log-sum-exp: the queries against the keys every one of
    them sees (the prefix up to ``split``), with no mask, and the rest causally. Neither part
    builds a mask or computes scores that a mask would throw away. With ``quantum`` > 1 every
    shape is a multiple of it (see ``CPU_PREFILL_SHAPE_QUANTUM``).
    """

    token_start: int  # index of its first token in the batch
    num_tokens: int  # tokens in the chunk
    start_position: int  # tokens already in the cache before it (0 = nothing cached)
    block_table: torch.Tensor | None  # [num_blocks] blocks holding the whole context; None: attend within the chunk
    quantum: int = 1  # attention shapes are rounded up to multiples of this

    @property
    def padded_tokens(self) -> int:
        """Query rows as attention sees them (>= num_tokens)."""
        return round_up(self.num_tokens, self.quantum)

    @property
    def split(self) -> int:
        """Keys [0, split) are seen by every query: the cached prefix rounded down to the quantum."""
        return self.start_position - self.start_position % self.quantum

    @property
    def causal_rows(self) -> int:
        """Side of the causal part: the prefix keys past ``split`` and the chunk's own, rounded up."""
        return round_up(self.start_position - self.split + self.num_tokens, self.quantum)


def round_up(n: int, quantum: int) -> int:
    return -(-n // quantum) * quantum


def prefill_chunk(token_start: int, num_tokens: int, start_position: int, block_table: torch.Tensor | None,
                  quantum: int = 1) -> PrefillChunk:
    """A chunk's attention metadata. Without a block table the chunk attends within itself
    (nothing cached before it); with one, to its context read from the cache."""
    return PrefillChunk(token_start, num_tokens, start_position if block_table is not None else 0, block_table,
                        quantum)


@dataclass
class DecodeGroup:
    """Decode sequences of similar context length, attended together with padding to the longest."""

    token_start: int  # index of the group's first token in the batch
    num_seqs: int  # one token per sequence
    block_table: torch.Tensor  # [num_seqs, max_blocks] blocks of each context, padded with block 0
    max_context: int  # the longest context in the group
    context_lens: torch.Tensor  # [num_seqs] int64 context length of each sequence
    mask: torch.Tensor | None  # [num_seqs, max_blocks * block_size] bool, True for real keys; None if no padding


@dataclass
class VarlenMetadata:
    """The step as the Triton backend reads it: per sequence, where its query rows start and how
    long its context is; decodes (one row each) first, then prefill chunks."""

    query_start_loc: torch.Tensor  # [S + 1] int32: sequence i's query rows are [loc[i], loc[i + 1])
    seq_lens: torch.Tensor  # [S] int32: context length after this step's tokens
    block_tables: torch.Tensor  # [S, max_blocks] int32, padded with block 0
    num_decodes: int  # the first num_decodes sequences have one query row each
    max_query_len: int  # the longest prefill chunk (0 if none)


@dataclass
class AttentionMetadata:
    """Where this step's tokens live in the cache; built once per step, shared by every layer."""

    slot_mapping: torch.Tensor  # [T] cache slot (block_id * block_size + offset) of each new token
    decodes: list[DecodeGroup] = field(default_factory=list)  # the first tokens of the batch
    prefills: list[PrefillChunk] = field(default_factory=list)
    decode_kernel: object | None = None  # native CPU kernels (cluster.kernels): paged decode, float32 prefill; None = torch
    varlen: VarlenMetadata | None = None  # set: the Triton backend runs (decodes/prefills stay empty)

    def native_decode_group(self, rows: int, padded: bool = False) -> DecodeGroup | None:
        """The one decode group when the native kernel runs a decode step whose ``rows`` are all its
        sequences (no prefill chunk; with ``padded``, rows past them may be a bucket's padding);
        None otherwise."""
        if self.decode_kernel is None or self.prefills or len(self.decodes) != 1:
            return None
        seqs = self.decodes[0].num_seqs
        return self.decodes[0] if seqs == rows or (padded and seqs < rows) else None


@dataclass
class TailBatch:
    """SwiftKV: the tokens that go on past the SwiftKV layer (decodes, prompts' sampled tokens).

    Their K/V are already in the cache (written in bulk from the SwiftKV layer's input), so the
    later layers only read it: ``meta`` has no slots, and every query attends from the cache.
    """

    rows: torch.Tensor  # [R] rows of the full batch that continue
    meta: AttentionMetadata


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
             kernel=None) -> None:
    """Store the step's K/V ([T, Hkv, D] each) at their slots in one layer's cache. A batch padded
    to a bucket (``cluster.runner.model_input.padded_rows``) has rows past its slots: they are not stored.
    With the native CPU kernels (``kernel``) each row goes straight to its slot; torch's stack and
    index_put_ below cost 10x as much (docs/benchmarks.md)."""
    if kernel is not None and kv_cache.device.type == "cpu":
        kernel.write_kv(kv_cache, _last_dim_contiguous(k), _last_dim_contiguous(v), slot_mapping)
        return
    two, heads, _, _, head_dim = kv_cache.shape
    k, v = k[: slot_mapping.numel()], v[: slot_mapping.numel()]
    # a 16-bit cache under a float32 model (kv_cache_dtype) stores each value rounded once, here
    kv_cache.view(two, heads, -1, head_dim)[:, :, slot_mapping] = torch.stack((k, v)).transpose(1, 2).to(
        kv_cache.dtype)


def gather_blocks(kv_cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """[2, H, NB, BS, D] cache, [S, nb] table -> [2, H, S, nb * BS, D]: K and V of each context.

    Small gathers take one indexing op; large ones one index_select per (K/V, head) on a
    2-D view, which copies whole blocks and is several times faster than indexing 4-D.
    Blocks are copied through an int64 view (4 bf16 values per element) for the same reason.
    """
    two, heads, num_blocks, block_size, head_dim = kv_cache.shape
    rows, nb = block_table.shape
    flat = block_table.reshape(-1)
    src = kv_cache.view(two * heads, num_blocks, block_size * head_dim)
    wide = _widest_view_dtype(block_size * head_dim * kv_cache.element_size())
    if flat.numel() <= _SMALL_GATHER_BLOCKS:
        out = src.view(wide)[:, flat].view(kv_cache.dtype)
    else:
        out = torch.empty(two * heads, rows * nb, block_size * head_dim, dtype=kv_cache.dtype,
                          device=kv_cache.device)
        for h in range(two * heads):
            torch.index_select(src[h].view(wide), 0, flat, out=out[h].view(wide))
    return out.view(two, heads, rows, nb * block_size, head_dim)


def _widest_view_dtype(row_bytes: int) -> torch.dtype:
    return torch.int64 if row_bytes % 8 == 0 else torch.uint8


class PagedAttention(nn.Module):
    """Writes the step's K/V into the paged cache, then attends each query to its context."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5

    @staticmethod
    def write(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
        """Store K/V computed outside a layer (SwiftKV's projection) at the step's slots."""
        if meta.varlen is not None:
            from cluster.kernels import triton_attention

            triton_attention.write_kv(kv_cache, _last_dim_contiguous(k), _last_dim_contiguous(v), meta.slot_mapping)
        else:
            write_kv(kv_cache, k, v, meta.slot_mapping, meta.decode_kernel)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D] or None (already cached); kv_cache: [2, Hkv, NB, BS, D]
        -> [T, Hq * D]."""
        if meta.varlen is not None:
            return self._forward_triton(q, k, v, kv_cache, meta)
        kernel = meta.decode_kernel
        if k is not None:
            write_kv(kv_cache, k, v, meta.slot_mapping, kernel)
        group = meta.native_decode_group(q.shape[0])
        if group is not None:  # a decode step: the kernel's output is the layer's
            return kernel.paged_decode(_heads_contiguous(q), kv_cache, group.block_table, group.context_lens,
                                       self.scale).view(q.shape[0], -1)
        out = torch.empty_like(q)
        real = _real_rows(meta)
        if real < q.shape[0]:  # padding rows attend to nothing: zeros, never what the buffer held
            out[real:].zero_()
        for group in meta.decodes:
            rows = slice(group.token_start, group.token_start + group.num_seqs)
            if kernel is not None:  # reads K/V in place: no gathered copy; q's rows may lie apart
                out[rows] = kernel.paged_decode(_heads_contiguous(q[rows]), kv_cache, group.block_table,
                                                group.context_lens, self.scale)
            else:
                out[rows] = self._decode(q[rows], kv_cache, group)
        for chunk in meta.prefills:
            rows = slice(chunk.token_start, chunk.token_start + chunk.num_tokens)
            out[rows] = self._prefill(q[rows], None if k is None else k[rows], None if v is None else v[rows],
                                      kv_cache, chunk, meta.decode_kernel)
        return out.view(q.shape[0], -1)

    def _forward_triton(self, q, k, v, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        from cluster.kernels import triton_attention

        if k is not None:
            self.write(kv_cache, k, v, meta)
        varlen = meta.varlen
        out = triton_attention.paged_attention(_last_dim_contiguous(q), kv_cache, varlen.block_tables,
                                               varlen.seq_lens, varlen.query_start_loc, varlen.num_decodes,
                                               varlen.max_query_len, self.scale)
        return out.view(q.shape[0], -1)

    def _decode(self, q, kv_cache, group: DecodeGroup) -> torch.Tensor:
        # [Hkv, S, L, hd] each, L = blocks * block size; widened where the cache is 16-bit under float32
        keys, values = gather_blocks(kv_cache, group.block_table).to(q.dtype)
        if group.num_seqs == 1 and group.max_context <= _SDPA_DECODE_MAX_CONTEXT:
            n = group.max_context
            out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys[:, :, :n].transpose(0, 1),
                                                 values[:, :, :n].transpose(0, 1), scale=self.scale,
                                                 enable_gqa=True)
            return out[0].transpose(0, 1)
        return self._decode_matmul(q, keys, values, group.mask)

    def _decode_matmul(self, q, keys, values, mask) -> torch.Tensor:
        """Batched decode attention as two bmm calls over (head, sequence) pairs.

        Keys keep their block-padded length (slicing would force a copy); the mask hides the padding.
        """
        heads, num_seqs, length, head_dim = keys.shape
        group = self.num_heads // self.num_kv_heads
        q = (q * self.scale).view(num_seqs, heads, group, head_dim).transpose(0, 1).reshape(-1, group, head_dim)
        scores = torch.bmm(q, keys.view(-1, length, head_dim).transpose(1, 2)).view(heads, num_seqs, group, length)
        if mask is not None:
            scores.masked_fill_(~mask[None, :, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
        out = torch.bmm(probs.view(-1, group, length), values.view(-1, length, head_dim))
        return out.view(heads, num_seqs, group, head_dim).transpose(0, 1).reshape(num_seqs, self.num_heads, head_dim)

    def _prefill(self, q, k, v, kv_cache, chunk: PrefillChunk, kernel=None) -> torch.Tensor:
        """A prompt chunk's attention. With the native kernels, one causal pass over the context (no
        mask, no padding to the shape quantum, no two-part merge): in float32 (CPUs without native
        bfloat16) ``prefill_attention``, 1.5-2.2x torch's flash attention on SmolLM2's shapes; in
        bfloat16 on CPUs with AMX ``prefill_attention_amx``, 2.4-2.9x. Otherwise torch's fused
        attention as below."""
        native = _native_prefill(kernel, q.dtype, self.head_dim)
        if native is not None:
            if chunk.block_table is None:  # the chunk's own K/V
                return native(_last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v), 0,
                              self.scale)
            n = chunk.start_position + chunk.num_tokens
            keys, values = _context(kv_cache, chunk.block_table, n, n, q.dtype)  # [Hkv, n, hd]
            return native(_last_dim_contiguous(q), keys.transpose(0, 1), values.transpose(0, 1),
                          chunk.start_position, self.scale)
        if chunk.block_table is not None:
            return self._prefill_cached(q, kv_cache, chunk)
        # Nothing cached before: attend within the chunk (causal: the padded keys come after every
        # real query, so they are never seen). A leading batch dim keeps torch on its fused CPU
        # kernel (3-D inputs take a slow path).
        pad = chunk.padded_tokens - chunk.num_tokens
        out = F.scaled_dot_product_attention(_pad_rows(q, pad).transpose(0, 1)[None],
                                             _pad_rows(k, pad).transpose(0, 1)[None],
                                             _pad_rows(v, pad).transpose(0, 1)[None],
                                             is_causal=True, scale=self.scale, enable_gqa=True)
        return out[0].transpose(0, 1)[: chunk.num_tokens]

    def _prefill_cached(self, q, kv_cache, chunk: PrefillChunk) -> torch.Tensor:
        """A chunk after a cached prefix, in two unmasked parts (see ``PrefillChunk``)."""
        tokens, split = chunk.num_tokens, chunk.split
        lead = chunk.start_position - split  # prefix keys past the split, seen causally
        square = chunk.causal_rows
        n = chunk.start_position + tokens
        keys, values = _context(kv_cache, chunk.block_table, n, split + square, q.dtype)  # [Hkv, split + square, hd]
        # Causal part: ``lead`` empty rows first put query i on row lead + i, which (top-left causal)
        # sees the keys split .. start_position + i, that is everything up to its own position.
        rows = F.pad(q, (0, 0, 0, 0, lead, square - lead - tokens)).transpose(0, 1)[None]
        out, lse = _flash(rows, keys[None, :, split:], values[None, :, split:], True, self.scale)
        out, lse = out[0, :, lead:lead + tokens], lse[0, :, lead:lead + tokens]  # [Hq, T, hd], [Hq, T]
        if split:  # the prefix every query sees, then the two merged by their log-sum-exp
            rows = _pad_rows(q, chunk.padded_tokens - tokens).transpose(0, 1)[None]
            prefix_out, prefix_lse = _flash(rows, keys[None, :, :split], values[None, :, :split], False, self.scale)
            out = _merge(out, lse, prefix_out[0, :, :tokens], prefix_lse[0, :, :tokens])
        return out.transpose(0, 1)


def _native_prefill(kernel, dtype: torch.dtype, head_dim: int):
    """The native prefill-attention kernel for this dtype where it is built and usable, else None."""
    if kernel is None or head_dim not in (64, 128):
        return None
    if dtype == torch.float32 and kernel.has_prefill_attention():
        return kernel.prefill_attention
    if dtype == torch.bfloat16 and kernel.has_prefill_attention_amx():
        return kernel.prefill_attention_amx
    return None


def _flash(q, k, v, causal: bool, scale: float):
    """torch's fused CPU attention with its log-sum-exp: q [1, Hq, L, hd], k/v [1, Hkv, S, hd]
    (grouped-query heads shared) -> output [1, Hq, L, hd] and float32 log-sum-exp [1, Hq, L].
    Elsewhere (the torch backend on a GPU) the same in plain float32 ops."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1).float(), v.repeat_interleave(group, dim=1).float()
    scores = (q.float() @ k.transpose(-1, -2)) * scale
    if causal:
        scores.masked_fill_(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return (torch.exp(scores - lse[..., None]) @ v).to(q.dtype), lse


def _merge(out_a, lse_a, out_b, lse_b) -> torch.Tensor:
    """Attention over two disjoint key sets -> attention over their union ([H, T, hd], [H, T])."""
    lse = torch.logaddexp(lse_a, lse_b)
    merged = out_a.float() * torch.exp(lse_a - lse)[..., None] + out_b.float() * torch.exp(lse_b - lse)[..., None]
    return merged.to(out_a.dtype)


def _real_rows(meta: AttentionMetadata) -> int:
    """Rows of the batch that decodes and prefill chunks cover (the rest are bucket padding)."""
    ends = [g.token_start + g.num_seqs for g in meta.decodes] + [c.token_start + c.num_tokens for c in meta.prefills]
    return max(ends, default=0)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _heads_contiguous(q: torch.Tensor) -> torch.Tensor:
    """q [T, H, D] as the decode kernel reads it: each row's heads contiguous, the rows any distance
    apart (a view of the QKV projection's output is used as it is, not copied)."""
    return q if q.stride(2) == 1 and (q.shape[1] <= 1 or q.stride(1) == q.shape[2]) else q.contiguous()


def _pad_rows(x: torch.Tensor, pad: int) -> torch.Tensor:
    """x [T, H, D] with ``pad`` zero rows appended."""
    return F.pad(x, (0, 0, 0, 0, 0, pad)) if pad else x


def _context(kv_cache: torch.Tensor, block_table: torch.Tensor, n: int, padded: int, dtype: torch.dtype):
    """One sequence's first ``n`` cached keys and values [Hkv, padded, hd] in ``dtype``, zeros past
    ``n`` (the gathered tensors are copies, so zeroing them leaves the cache alone; zeros, not
    whatever stale blocks hold, so masked positions can never carry a NaN into the softmax)."""
    keys, values = gather_blocks(kv_cache, block_table[None])[:, :, 0].to(dtype)  # [Hkv, blocks * block size, hd]
    if padded <= keys.shape[1]:
        keys, values = keys[:, :padded], values[:, :padded]
        if padded > n:
            keys[:, n:].zero_()
            values[:, n:].zero_()
        return keys, values
    grow = (0, 0, 0, padded - n)
    return F.pad(keys[:, :n], grow), F.pad(values[:, :n], grow)
