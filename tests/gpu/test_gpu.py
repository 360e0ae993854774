"""GPU checks (NCCL): run where CUDA is present, skipped elsewhere. Results go to docs/benchmarks.md.

tp=1 on one GPU, and tp=2 over two GPUs with NCCL when there are two, must give the CPU
float32 engine's greedy tokens.
"""

from __future__ import annotations

import pytest
import torch

from cluster.llm import LLM
from cluster.sampling_params import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

GREEDY = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
NAMES = ("english", "code", "question", "chat")


def _tokens(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)]


def test_smollm2_tp1_cuda_matches_cpu_float32(smollm2_path, smollm2_prompts):
    prompts = [smollm2_prompts[n] for n in NAMES]
    expected = _tokens(LLM(model=smollm2_path, dtype="float32", device="cpu"), prompts)
    assert not torch.backends.cuda.matmul.allow_tf32  # float32 matmuls stay float32
    gpu = LLM(model=smollm2_path, dtype="float32", device="cuda")
    assert next(gpu.engine.executor.worker.runner.model.parameters()).is_cuda
    assert _tokens(gpu, prompts) == expected


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tiny_tp2_nccl_matches_cpu_float32(local_ray, tiny_llama_dir):
    path = tiny_llama_dir("llama_untied")
    prompts = [[(17 * i + 31 * j) % 4000 + 100 for j in range(5 + 9 * i)] for i in range(4)]
    expected = _tokens(LLM(model=path, dtype="float32", device="cpu"), prompts)
    llm = LLM(model=path, dtype="float32", device="cuda", tensor_parallel_size=2)
    try:
        assert _tokens(llm, prompts) == expected
    finally:
        llm.engine.shutdown()
