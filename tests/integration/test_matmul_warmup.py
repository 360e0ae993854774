"""The start-up build of the CPU matmuls (cluster/runner/matmul_warmup.py): every (row count,
weight) a step runs through oneDNN was built before the first request, and no more than the cache
holds."""

from __future__ import annotations

import pytest

from cluster.model.layers.packed_weight import GEMV_MAX_ROWS, PackedWeight
from cluster.runner.matmul_warmup import WARM_MAX_ROWS, row_buckets, warm_matmuls
from cluster.runner.model_input import padded_rows
from cluster.sampling_params import SamplingParams


@pytest.fixture
def matmul_calls(monkeypatch):
    """Every (rows, weight shape) that PackedWeight.linear ran through oneDNN, in order."""
    calls: list[tuple[int, tuple[int, ...]]] = []
    linear = PackedWeight.linear

    def recorded(self, x, bias=None):
        floor = self.onednn_floor()
        if x.dim() == 2 and floor is not None and x.shape[0] > floor:
            calls.append((x.shape[0], tuple(self.dense.shape)))
        return linear(self, x, bias)

    monkeypatch.setattr(PackedWeight, "linear", recorded)
    return calls


def _oneDNN_weights(llm) -> dict[tuple[int, ...], PackedWeight]:
    model = llm.engine.executor.worker.runner.model
    return {tuple(m._matmul.dense.shape): m._matmul for m in model.modules()
            if isinstance(getattr(m, "_matmul", None), PackedWeight) and m._matmul.onednn_floor() is not None}


def test_the_capacity_is_the_one_onednn_reads(monkeypatch):
    from cluster.runner.matmul_warmup import cache_capacity

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    assert cache_capacity(256) == 256 and cache_capacity(None) is None
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "40")  # an operator's setting wins
    assert cache_capacity(256) == 40


def test_row_buckets_are_the_padded_row_counts():
    assert row_buckets(4) == []
    assert row_buckets(17) == [16, 32]
    assert row_buckets(300) == list(range(16, 257, 16)) + [320]
    assert row_buckets(300, floor=64) == list(range(80, 257, 16)) + [320]
    assert row_buckets(3, floor=0) == [1, 2, 3]
    for n in range(GEMV_MAX_ROWS + 1, 2049):
        assert padded_rows(n) in row_buckets(2048)


def test_every_matmul_a_step_runs_was_built_at_start_up(tiny_llama_dir, matmul_calls):
    """bfloat16 pads its batches; whatever mix of prefill chunks and decodes the steps run, the
    (rows, weight) pairs oneDNN runs are ones start-up built, the LM head's included."""
    from cluster.llm import LLM

    llm = LLM(model=tiny_llama_dir("llama_untied"), dtype="bfloat16", block_size=4, max_num_batched_tokens=300,
              max_num_seqs=24)
    assert llm.engine.executor.worker.runner.pad_rows
    built = set(matmul_calls)
    weights = _oneDNN_weights(llm)
    if not weights:  # no oneDNN bfloat16 here (AVX2: our own float32 panels, nothing to build)
        assert not built
        return
    assert len(weights) == 5  # qkv, o, gate_up, down, and the (untied) LM head
    head = max(weights)  # vocab rows
    for shape, matmul in weights.items():
        expected = row_buckets(24 if shape == head else 300, matmul.onednn_floor())
        assert sorted(rows for rows, s in built if s == shape) == expected
    matmul_calls.clear()
    prompts = [{"prompt_token_ids": [100 + i + j % 7 for j in range(3 + 23 * i)]} for i in range(20)]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    llm.generate(prompts, params)  # full-budget mixed steps, then decode batches
    for n in (9, 40, 77, 150, 230, 290):  # one at a time (not cached): a bucket per prompt length
        llm.generate([{"prompt_token_ids": [200 + n + j % 5 for j in range(n)]}], params)
    ran = set(matmul_calls)
    assert len({rows for rows, _ in ran}) > 3  # the steps met several buckets
    assert ran <= built


def test_only_as_many_as_the_cache_holds_are_built_the_largest_first(tiny_llama_dir, matmul_calls):
    from cluster.llm import LLM

    llm = LLM(model=tiny_llama_dir("llama_untied"), dtype="bfloat16", block_size=4, max_num_batched_tokens=300)
    weights = _oneDNN_weights(llm)
    if not weights:
        pytest.skip("oneDNN runs no bfloat16 matmul on this CPU")
    model = llm.engine.executor.worker.runner.model
    matmul_calls.clear()
    assert warm_matmuls(model, 300, 4, capacity=6) == 6  # 4 logits rows: the LM head needs nothing
    assert sorted(rows for rows, _ in matmul_calls) == [256] * 2 + [320] * 4
    matmul_calls.clear()
    assert warm_matmuls(model, 4, 4, capacity=None) == 0 and not matmul_calls
    # a large budget: start-up stops at WARM_MAX_ROWS (no budget-sized inputs, no minutes of matmuls)
    layers = [m for shape, m in weights.items() if shape != max(weights)]
    assert warm_matmuls(model, 1 << 20, 4, capacity=None) == \
        sum(len(row_buckets(WARM_MAX_ROWS, m.onednn_floor())) for m in layers)
    assert max(rows for rows, _ in matmul_calls) == WARM_MAX_ROWS
