"""GGUF blocks recovered from float32 weights: exact or not at all."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from cluster.model.layers.gguf_blocks import GGUFBlocks, recover

Q4_1, Q8_0 = gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0


def _gguf_weight(qtype, rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """A float32 weight as transformers loads it from a GGUF file of ``qtype``, and its raw blocks."""
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    raw = gguf.quants.quantize(w, qtype)
    return torch.from_numpy(gguf.quants.dequantize(raw, qtype).copy()), raw


@pytest.mark.parametrize("rows, cols", [(37, 96), (1, 32), (192, 576), (8, 1536)])
def test_q4_1_weights_come_back_as_the_files_blocks(rows, cols):
    weight, raw = _gguf_weight(Q4_1, rows, cols, seed=rows + cols)
    blocks = recover(weight)
    assert blocks is not None and blocks.kind == "q4_1" and blocks.shape == (rows, cols)
    assert torch.equal(blocks.dequantize(), weight)  # bit for bit
    raw = raw.reshape(rows, cols // 32, 20)  # d, m as float16, then 16 bytes of nibbles
    assert np.array_equal(blocks.qs.numpy(), raw[..., 4:])
    halves = torch.from_numpy(raw[..., :4].copy().view(np.float16).astype(np.float32))
    assert torch.equal(blocks.scales, halves)
    assert blocks.nbytes == rows * cols // 32 * 24  # 6 bits a weight as held (d, m widened to float32)


@pytest.mark.parametrize("rows, cols", [(37, 96), (49, 576)])
def test_q8_0_weights_come_back_as_the_files_blocks(rows, cols):
    weight, raw = _gguf_weight(Q8_0, rows, cols, seed=rows)
    blocks = recover(weight)
    assert blocks is not None and blocks.kind == "q8_0"
    assert torch.equal(blocks.dequantize(), weight)
    raw = raw.reshape(rows, cols // 32, 34)
    assert np.array_equal(blocks.qs.numpy(), raw[..., 2:].view(np.int8))


def test_constant_and_zero_blocks_are_exact_too():
    weight, _ = _gguf_weight(Q4_1, 4, 64)
    weight[0] = 0.0
    weight[1, :32] = 0.5  # one value in a block: d is 0 and every q too
    blocks = recover(weight)
    assert blocks is not None and torch.equal(blocks.dequantize(), weight)


def test_weights_that_are_not_exact_blocks_stay_dense():
    gen = torch.Generator().manual_seed(0)
    assert recover(torch.randn(64, 576, generator=gen)) is None  # a float checkpoint
    weight, _ = _gguf_weight(Q4_1, 64, 576)
    nudged = weight.clone()
    nudged[40, 7] = torch.nextafter(nudged[40, 7], torch.tensor(10.0))  # one value off, past the probed rows
    assert recover(nudged) is None
    assert recover(weight[:, :100]) is None  # columns not a multiple of 32 (a misaligned shard)
    assert recover(weight[:, 16:48].contiguous()) is None  # 32 columns, but across two blocks
    assert recover(weight.bfloat16()) is None and recover(weight[0]) is None
    assert recover(torch.empty(0, 64)) is None


def test_a_column_shard_on_block_boundaries_keeps_its_blocks():
    weight, _ = _gguf_weight(Q4_1, 16, 576)
    shard = weight[:, 288:].contiguous()  # the second rank's half of a row-parallel weight
    blocks = recover(shard)
    assert isinstance(blocks, GGUFBlocks) and torch.equal(blocks.dequantize(), shard)


def test_bench_runs_our_engine_with_or_without_gguf_blocks(monkeypatch):
    """`llm-cluster bench --dense-weights` gives the same comparison with every weight held dense."""
    import cluster.bench as bench
    from cluster.cli import main

    seen = []

    class FakeLLM:
        def __init__(self, **kwargs):
            seen.append(kwargs["gguf_blocks"])
            raise RuntimeError("stop here")

    monkeypatch.setattr("cluster.LLM", FakeLLM)
    monkeypatch.setattr(bench, "run_bench", lambda args: bench._bench_engine(args, None, []))
    for argv, blocks in ((["bench", "--skip-hf"], True), (["bench", "--skip-hf", "--dense-weights"], False)):
        with pytest.raises(RuntimeError, match="stop here"):
            main(argv)
        assert seen[-1] is blocks
