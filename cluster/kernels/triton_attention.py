"""Paged attention in Triton, the CUDA backend: the K/V write, decode, and variable-length prefill.

Every kernel reads and writes the paged cache in place through block tables; nothing is
gathered into a copy and no mask is materialised. The cache layout is the engine's
(``cluster.model.layers.attention``): one layer is one contiguous tensor
``[2 (K, V), Hkv, num_blocks, block_size, head_dim]``, so token slot ``s`` of KV head ``h`` starts
at element ``h * NB * BS * D + s * D``, and V sits ``Hkv * NB * BS * D`` elements after K.

The batch is flat (``[T, H, D]`` rows) and described per sequence: ``query_start_loc`` ``[S + 1]``
(where each sequence's query rows start), ``seq_lens`` ``[S]`` (its context after this step's
tokens), ``block_tables`` ``[S, max_blocks]``. The first ``num_decodes`` sequences have one query
row each (decodes come first in the engine's batches); the rest are prefill chunks whose queries
attend causally to the cached prefix and to themselves.

- decode: one program per (sequence, KV head) computes every query head of that KV head's
  group at once (GQA: K/V are read once per group), an online softmax over blocks of keys;
- prefill: one program per (sequence, block of queries, KV head); the queries' rows of the
  whole group form one tile, so the two matmuls run on tensor cores (``tl.dot``), and key blocks
  past the tile's causal horizon are never loaded.

Softmax and accumulation are in float32. float32 inputs multiply in IEEE float32 (never TF32),
so a float32 model gives the same greedy tokens as on the CPU. On a machine without CUDA the
kernels run under Triton's interpreter (``TRITON_INTERPRET=1``): that is how ``make test``
checks them against the torch reference (16-bit prefill tiles multiply in float32 there).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_DECODE_BLOCK_N = 32  # keys per iteration of the decode loop
_PREFILL_BLOCK_N = 32  # keys per iteration of the prefill loop
# Triton's interpreter multiplies 16-bit tl.dot inputs wrongly (garbage for bf16, measured with
# triton 3.9): interpreted, the prefill kernel multiplies in float32 instead. On a GPU it never does.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_PREFILL_ROWS = 64  # query rows (tokens x heads of a group) per prefill tile; tl.dot needs >= 16


def _p2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, cache_ptr, slot_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
                     head_stride, kv_stride,
                     HKV: tl.constexpr, HKV_P2: tl.constexpr, D: tl.constexpr, D_P2: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    h = tl.arange(0, HKV_P2)
    d = tl.arange(0, D_P2)
    mask = (h < HKV)[:, None] & (d < D)[None, :]
    if slot >= 0:  # slot -1: a padding row (decode graphs), nothing is written
        k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
        v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
        dst = cache_ptr + h[:, None].to(tl.int64) * head_stride + slot * D + d[None, :]
        tl.store(dst, k, mask=mask)
        tl.store(dst + kv_stride, v, mask=mask)


@triton.jit
def _load_kv_block(base, kv_stride, table_ptr, start, limit, d, D: tl.constexpr, BS: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """Keys start..start+BLOCK_N of one sequence (those below ``limit``), read in place through its
    block table: (positions, their mask, K [N, D_P2], V [N, D_P2]); masked rows are zeros."""
    n = start + tl.arange(0, BLOCK_N)
    n_mask = n < limit
    block = tl.load(table_ptr + n // BS, mask=n_mask, other=0).to(tl.int64)
    offsets = (block * BS + n % BS) * D
    kv_mask = n_mask[:, None] & (d < D)[None, :]
    k = tl.load(base + offsets[:, None] + d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(base + kv_stride + offsets[:, None] + d[None, :], mask=kv_mask, other=0.0)
    return n, n_mask, k, v


@triton.jit
def _decode_kernel(q_ptr, cache_ptr, out_ptr, block_tables_ptr, seq_lens_ptr, scale,
                   stride_qt, stride_qh, stride_ot, stride_oh, stride_bt, head_stride, kv_stride,
                   G: tl.constexpr, G_P2: tl.constexpr, D: tl.constexpr, D_P2: tl.constexpr,
                   BS: tl.constexpr, BLOCK_N: tl.constexpr):
    s = tl.program_id(0)
    kvh = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + s)
    g = tl.arange(0, G_P2)
    d = tl.arange(0, D_P2)
    q_mask = (g < G)[:, None] & (d < D)[None, :]
    heads = kvh * G + g
    q = tl.load(q_ptr + s * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=q_mask, other=0.0)
    q = q.to(tl.float32) * scale
    m = tl.full([G_P2], float("-inf"), tl.float32)
    l = tl.zeros([G_P2], tl.float32)
    acc = tl.zeros([G_P2, D_P2], tl.float32)
    base = cache_ptr + kvh.to(tl.int64) * head_stride
    for start in range(0, seq_len, BLOCK_N):
        n, n_mask, k, v = _load_kv_block(base, kv_stride, block_tables_ptr + s * stride_bt, start, seq_len, d, D,
                                         BS, BLOCK_N)
        k = k.to(tl.float32)
        v = v.to(tl.float32)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [G, N]: a GEMV per head, memory-bound anyway
        scores = tl.where(n_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    out = acc / l[:, None]
    tl.store(out_ptr + s * stride_ot + heads[:, None] * stride_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=q_mask)


@triton.jit
def _prefill_kernel(q_ptr, cache_ptr, out_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr, scale,
                    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt, head_stride, kv_stride,
                    G: tl.constexpr, G_P2: tl.constexpr, D: tl.constexpr, D_P2: tl.constexpr,
                    BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                    UPCAST: tl.constexpr):
    s = tl.program_id(0)
    tile = tl.program_id(1)
    kvh = tl.program_id(2)
    q_start = tl.load(query_start_ptr + s)
    q_len = tl.load(query_start_ptr + s + 1) - q_start
    if tile * BLOCK_M < q_len:
        seq_len = tl.load(seq_lens_ptr + s)
        prefix = seq_len - q_len  # tokens cached before this chunk
        rows = tl.arange(0, BLOCK_M * G_P2)  # (query token, head of the group) pairs
        tok = tile * BLOCK_M + rows // G_P2
        head = rows % G_P2
        d = tl.arange(0, D_P2)
        row_mask = (tok < q_len) & (head < G)
        q_mask = row_mask[:, None] & (d < D)[None, :]
        q = tl.load(q_ptr + (q_start + tok)[:, None] * stride_qt + (kvh * G + head)[:, None] * stride_qh + d[None, :],
                    mask=q_mask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        position = prefix + tok  # each query row's position; it sees keys 0..position
        m = tl.full([BLOCK_M * G_P2], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M * G_P2], tl.float32)
        acc = tl.zeros([BLOCK_M * G_P2, D_P2], tl.float32)
        base = cache_ptr + kvh.to(tl.int64) * head_stride
        horizon = tl.minimum(seq_len, prefix + (tile + 1) * BLOCK_M)  # no query of this tile sees past it
        for start in range(0, horizon, BLOCK_N):
            n, n_mask, k, v = _load_kv_block(base, kv_stride, block_tables_ptr + s * stride_bt, start, horizon, d,
                                             D, BS, BLOCK_N)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [M, N]
            visible = (n[None, :] <= position[:, None]) & n_mask[None, :]
            scores = tl.where(visible, scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(scores - m_new[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m = m_new
        out = acc / l[:, None]
        tl.store(out_ptr + (q_start + tok)[:, None] * stride_ot + (kvh * G + head)[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=q_mask)


def _strides(kv_cache: torch.Tensor) -> tuple[int, int]:
    """(elements between KV heads, elements between K and V) of one layer's contiguous cache."""
    if not kv_cache.is_contiguous():
        raise ValueError("the paged KV cache must be contiguous")
    two, heads, num_blocks, block_size, head_dim = kv_cache.shape
    head_stride = num_blocks * block_size * head_dim
    return head_stride, heads * head_stride


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store the step's K/V ([T, Hkv, D] each) at their cache slots ([T]; a negative slot is skipped)."""
    tokens = slot_mapping.shape[0]
    if tokens == 0:
        return
    _, heads, _, _, head_dim = kv_cache.shape
    head_stride, kv_stride = _strides(kv_cache)
    _write_kv_kernel[(tokens,)](k, v, kv_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                                head_stride, kv_stride, HKV=heads, HKV_P2=_p2(heads), D=head_dim,
                                D_P2=_p2(head_dim))


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, num_decodes: int, max_query_len: int, scale: float,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of every query row ([T, Hq, D]) to its sequence's cached context -> [T, Hq, D].

    The K/V of this step's tokens must be in the cache already (``write_kv``). ``max_query_len``
    is the longest prefill chunk (unused when every sequence decodes).
    """
    if q.stride(2) != 1:
        raise ValueError("q's last dimension must be contiguous")
    out = torch.empty_like(q) if out is None else out
    _, kv_heads, _, block_size, head_dim = kv_cache.shape
    group = q.shape[1] // kv_heads
    head_stride, kv_stride = _strides(kv_cache)
    num_seqs = seq_lens.shape[0]
    shape = dict(G=group, G_P2=_p2(group), D=head_dim, D_P2=_p2(head_dim), BS=block_size)
    if num_decodes:
        _decode_kernel[(num_decodes, kv_heads)](
            q, kv_cache, out, block_tables, seq_lens, scale, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            block_tables.stride(0), head_stride, kv_stride, BLOCK_N=_DECODE_BLOCK_N, **shape)
    if num_seqs > num_decodes:
        block_m = max(1, _PREFILL_ROWS // _p2(group))
        upcast = _INTERPRETED and q.dtype != torch.float32
        precision = "ieee" if q.dtype == torch.float32 or upcast else "tf32"  # ignored for 16-bit inputs
        grid = (num_seqs - num_decodes, triton.cdiv(max_query_len, block_m), kv_heads)
        _prefill_kernel[grid](
            q, kv_cache, out, block_tables[num_decodes:], seq_lens[num_decodes:], query_start_loc[num_decodes:],
            scale, q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0), head_stride,
            kv_stride, BLOCK_M=block_m, BLOCK_N=_PREFILL_BLOCK_N, PRECISION=precision, UPCAST=upcast, **shape)
    return out
