"""GGUF blocks recovered, exactly, from float32 weights that came out of a GGUF file.

A model converted from a quantised GGUF file (SmolLM2's is Q4_1, its embedding Q8_0) holds float32
values that are each a block's ``d * q + m`` (Q4_1: 4-bit ``q``, float16 ``d`` and ``m`` shared by
32 weights of a row) or ``d * q`` (Q8_0: 8-bit ``q``). Those 32-bit values carry 5 or 8.5 bits of
information; a decode step streams every weight once, so reading the blocks instead of the floats
moves about a fifth of the bytes (6 and 9 bits a weight as held here: the scales widened to float32). ``recover`` finds the blocks behind a weight and keeps them only when
decoding them, with gguf's own arithmetic (product rounded, then the sum), gives back every value
bit for bit: anything else (a float checkpoint, a shard not aligned to 32 columns) returns None and
stays dense. The native ``gemv_q4_1`` / ``gemv_q8_0`` decode a few rows at a time into the same
float32 values, so the model computes exactly what it computes from the dense weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 32
_PROBE_ROWS = 8  # rows tried first, so that a float checkpoint is turned down quickly


@dataclass(frozen=True)
class GGUFBlocks:
    """A [rows, cols] weight as GGUF blocks of 32 columns.

    ``kind``: "q4_1" (``qs`` uint8 [rows, cols/32, 16]: byte j holds weight j in its low nibble and
    weight j + 16 in its high one; ``scales`` float32 [rows, cols/32, 2] = d, m) or "q8_0" (``qs``
    int8 [rows, cols/32, 32]; ``scales`` float32 [rows, cols/32] = d).
    """

    kind: str
    qs: torch.Tensor
    scales: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.qs.shape[0], self.qs.shape[1] * BLOCK

    @property
    def nbytes(self) -> int:
        return self.qs.numel() * self.qs.element_size() + self.scales.numel() * self.scales.element_size()

    def dequantize(self) -> torch.Tensor:
        """The float32 weight, as gguf decodes it (Q4_1: d * q rounded, then + m)."""
        if self.kind == "q4_1":
            lo, hi = self.qs & 0x0F, self.qs >> 4
            q = torch.cat([lo, hi], dim=-1).float()
            w = self.scales[..., :1] * q + self.scales[..., 1:]
        else:
            w = self.scales.unsqueeze(-1) * self.qs.float()
        return w.reshape(self.shape)


def recover(weight: torch.Tensor) -> GGUFBlocks | None:
    """The Q4_1 or Q8_0 blocks whose decoding is exactly ``weight`` (float32 [rows, cols]), or None."""
    if weight.dtype != torch.float32 or weight.dim() != 2 or weight.shape[1] % BLOCK or weight.numel() == 0:
        return None
    weight = weight.detach().contiguous()
    for find in (_q4_1, _q8_0):
        if find(weight[:_PROBE_ROWS]) is not None:
            return find(weight)
    return None


def _scale_candidates(estimate: torch.Tensor) -> list[torch.Tensor]:
    """float16 values at and beside ``estimate`` (the scale gguf stored rounded to float16)."""
    half = estimate.to(torch.float16)
    bits = half.view(torch.int16)
    return [half.float(), (bits + 1).view(torch.float16).float(), (bits - 1).view(torch.float16).float()]


def _solve(blocks: torch.Tensor, estimate: torch.Tensor, decode, q_range: tuple[int, int]):
    """Per block, the first candidate scale that decodes every value back exactly: (scale, q) or None."""
    found = None
    for d in _scale_candidates(estimate):
        d = torch.nan_to_num_(d, nan=0.0, posinf=0.0, neginf=0.0).clamp_(min=0.0)
        zero = d == 0
        has_zero = bool(zero.any())
        q = decode.quantize(blocks, d.masked_fill(zero, 1.0) if has_zero else d).clamp_(*q_range)
        if has_zero:
            q.masked_fill_(zero, 0.0)
        ok = (decode.dequantize(d, q) == blocks).all(-1, keepdim=True)
        if found is None:
            if bool(ok.all()):  # the usual case: the nearest float16 scale fits every block
                return d, q
            found, scale, q_out = ok, d, q
            continue
        take = ok & ~found
        scale = torch.where(take, d, scale)
        q_out = torch.where(take, q, q_out)
        found |= ok
        if bool(found.all()):
            return scale, q_out
    return None


class _Q41:
    def __init__(self, minimum: torch.Tensor):
        self.minimum = minimum

    def quantize(self, blocks, d):
        return torch.sub(blocks, self.minimum).div_(d).round_()

    def dequantize(self, d, q):
        return torch.mul(d, q).add_(self.minimum)  # the product rounded, then the sum (no fused multiply-add)


class _Q80:
    @staticmethod
    def quantize(blocks, d):
        return torch.div(blocks, d).round_()

    @staticmethod
    def dequantize(d, q):
        return d * q


def _q4_1(weight: torch.Tensor) -> GGUFBlocks | None:
    rows, cols = weight.shape
    blocks = weight.reshape(rows, cols // BLOCK, BLOCK)
    minimum = blocks.amin(-1, keepdim=True)  # q = 0 is the block's minimum: it decodes to m itself
    if not torch.equal(minimum.to(torch.float16).float(), minimum):
        return None
    solved = _solve(blocks, (blocks.amax(-1, keepdim=True) - minimum) / 15, _Q41(minimum), (0, 15))
    if solved is None:
        return None
    d, q = solved
    q = q.to(torch.uint8)
    qs = (q[..., :16] | (q[..., 16:] << 4)).contiguous()
    return GGUFBlocks("q4_1", qs, torch.cat([d, minimum], dim=-1).contiguous())


def _q8_0(weight: torch.Tensor) -> GGUFBlocks | None:
    rows, cols = weight.shape
    blocks = weight.reshape(rows, cols // BLOCK, BLOCK)
    solved = _solve(blocks, blocks.abs().amax(-1, keepdim=True) / 127, _Q80(), (-128, 127))
    if solved is None:
        return None
    d, q = solved
    return GGUFBlocks("q8_0", q.to(torch.int8).contiguous(), d.squeeze(-1).contiguous())
