"""The engine on the Triton attention backend gives the torch backend's greedy tokens.

On a machine without CUDA the kernels run under Triton's interpreter (tests/conftest.py), so this
runs the whole model path of the CUDA backend here: the metadata the runner builds, the K/V
write, decode and prefill over cached prefixes in one batch, chunked prefill, the prefix cache,
and SwiftKV's read-only tail. float32, tiny random-weight models.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import assert_no_leak
from tests.integration.test_swiftkv import perturbed_params, prompts_with_shared_prefixes

from cluster.config import ModelConfig
from cluster.errors import InvalidConfigError
from cluster.llm import LLM
from cluster.sampling_params import SamplingParams
from cluster.swiftkv.checkpoint import save_params

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def _greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)]


def _both(model_dir: str, **options) -> tuple[LLM, LLM]:
    return (LLM(model=model_dir, dtype="float32", attention_backend="torch", **options),
            LLM(model=model_dir, dtype="float32", attention_backend="triton", **options))


def test_triton_backend_matches_torch_with_chunked_prefill_and_the_prefix_cache(tiny_llama_dir):
    torch_llm, triton_llm = _both(tiny_llama_dir("llama_untied"), block_size=4, max_num_batched_tokens=16)
    assert triton_llm.engine.plan.worker_spec(triton_llm.engine.config).attention_backend == "triton"
    prompts = prompts_with_shared_prefixes()
    expected = _greedy(torch_llm, prompts)
    assert _greedy(triton_llm, prompts) == expected
    assert _greedy(triton_llm, prompts) == expected  # again: now served from the prefix cache
    assert triton_llm.engine.stats()["prefix_cache_hits"] > 0
    assert_no_leak(triton_llm)


def test_triton_backend_matches_torch_with_swiftkv(tiny_llama_dir, tmp_path):
    model_dir = tiny_llama_dir("llama_deep")
    path = str(tmp_path / "p.safetensors")
    save_params(path, perturbed_params(model_dir, 2, 2), dtype=torch.float32)
    torch_llm, triton_llm = _both(model_dir, swiftkv_params=path, block_size=4, max_num_batched_tokens=16,
                                  cache_dir=str(tmp_path / "cache"))
    assert triton_llm.engine.arch.swiftkv
    prompts = prompts_with_shared_prefixes()
    assert _greedy(triton_llm, prompts) == _greedy(torch_llm, prompts)


def test_unknown_backend_is_refused_naming_the_field():
    with pytest.raises(InvalidConfigError, match="attention_backend"):
        ModelConfig(attention_backend="flash")


def test_triton_on_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(InvalidConfigError, match="attention_backend") as err:
        ModelConfig(device="cpu", attention_backend="triton")
    assert "CUDA" in str(err.value)


def test_auto_is_torch_on_cpu():
    assert ModelConfig(device="cpu").resolved_attention_backend() == "torch"
