"""Tiny random-weight checkpoints of every supported layout, against transformers.

Each variant (tied / untied embeddings, llama3 RoPE scaling, Qwen2 q/k/v biases, a
sharded checkpoint) must give transformers' greedy tokens and its logprobs; bad
checkpoint directories are refused with ModelLoadError before anything is unpickled.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from cluster import LLM, InvalidConfigError, InvalidRequestError, ModelLoadError, SamplingParams
from tests.conftest import NUM_THREADS, assert_no_leak, copy_tokenizer, hf_greedy

VARIANTS = ["llama_tied", "llama_untied", "llama3_rope", "qwen2", "mistral", "sharded"]
MAX_TOKENS = 32
NUM_BLOCKS = 128  # 2,048 tokens: plenty, and cheap to allocate
LOGPROB_TOL = 1e-4


def _prompts() -> list[list[int]]:
    """Token-id prompts of 1, 4, 37 and 150 tokens (the last runs well past llama3's 64 original positions)."""
    gen = torch.Generator().manual_seed(1234)
    lengths = [1, 4, 37, 150]
    return [torch.randint(3, 49152, (n,), generator=gen).tolist() for n in lengths]


PROMPTS = _prompts()


def make_llm(path: str, **options) -> LLM:
    options = {"num_threads": NUM_THREADS, "num_blocks": NUM_BLOCKS, "max_model_len": 512, **options}
    return LLM(path, **options)


class _CreatesFileWhenUnpickled:
    """A pickle payload whose only effect, if anyone unpickles it, is creating ``path``."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def write_booby_trapped_bin(directory: str, marker: str) -> None:
    with open(os.path.join(directory, "pytorch_model.bin"), "wb") as f:
        pickle.dump(_CreatesFileWhenUnpickled(marker), f)


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_tokens_match_transformers(variant, tiny_llama_dir, hf_tiny_model):
    path, hf = tiny_llama_dir(variant), hf_tiny_model(variant)
    llm = make_llm(path)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                           SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    for prompt, out in zip(PROMPTS, outputs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, MAX_TOKENS), f"{variant}, prompt of {len(prompt)}"
    assert_no_leak(llm)


@pytest.mark.parametrize("variant", VARIANTS)
def test_logprobs_match_transformers(variant, tiny_llama_dir, hf_tiny_model):
    """SamplingParams(logprobs=5) returns the raw model's log-softmax at each generated position."""
    path, hf = tiny_llama_dir(variant), hf_tiny_model(variant)
    llm = make_llm(path)
    prompts = PROMPTS[1:3]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0.0, max_tokens=12, logprobs=5))
    for prompt, out in zip(prompts, outputs):
        completion = out.outputs[0]
        assert len(completion.logprobs) == len(completion.token_ids)
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + completion.token_ids])).logits[0].float()
        # Position len(prompt) - 1 + i predicts generated token i.
        hf_logprobs = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
        for i, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
            assert entry.token_id == token
            assert entry.logprob == pytest.approx(hf_logprobs[i, token].item(), abs=LOGPROB_TOL)
            top_values, top_ids = hf_logprobs[i].topk(5)
            assert list(entry.top) == top_ids.tolist(), f"{variant}: top-5 ids at step {i}"
            assert list(entry.top.values()) == pytest.approx(top_values.tolist(), abs=LOGPROB_TOL)
    assert_no_leak(llm)


def test_qwen2_checkpoint_really_has_biases(tiny_llama_dir):
    """Guards the fixture: the Qwen2 comparison only means something if q/k/v biases are non-zero."""
    tensors = load_file(os.path.join(tiny_llama_dir("qwen2"), "model.safetensors"))
    biases = [name for name in tensors if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))]
    assert len(biases) == 3 * 3
    assert all(tensors[name].abs().min() > 0 for name in biases)


def test_sharded_checkpoint_loads_like_the_single_file_one(tiny_llama_dir):
    sharded, single = tiny_llama_dir("sharded"), tiny_llama_dir("llama_untied")
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    assert len([n for n in os.listdir(sharded) if n.endswith(".safetensors")]) > 1
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    # Same seed, same shapes: the two checkpoints hold identical weights.
    sharded_tokens = [o.outputs[0].token_ids for o in make_llm(sharded).generate(prompts, params)]
    single_tokens = [o.outputs[0].token_ids for o in make_llm(single).generate(prompts, params)]
    assert sharded_tokens == single_tokens


def test_pickled_weights_are_never_loaded(tmp_path, tiny_llama_dir):
    """A directory with only pytorch_model.bin is refused, and the pickle is never opened."""
    source = tiny_llama_dir("llama_tied")
    shutil.copy(os.path.join(source, "config.json"), tmp_path)
    copy_tokenizer(source, str(tmp_path))
    marker = str(tmp_path / "unpickled.marker")
    write_booby_trapped_bin(str(tmp_path), marker)
    with pytest.raises(ModelLoadError, match=r"\.safetensors") as err:
        make_llm(str(tmp_path))
    assert err.value.field == "model"
    assert not os.path.exists(marker), "the engine unpickled pytorch_model.bin"


def test_safetensors_win_over_a_pickle_next_to_them(tmp_path, tiny_llama_dir):
    path = str(tmp_path / "ckpt")
    shutil.copytree(tiny_llama_dir("sharded"), path)
    marker = str(tmp_path / "unpickled.marker")
    write_booby_trapped_bin(path, marker)
    llm = make_llm(path)
    llm.generate({"prompt_token_ids": PROMPTS[1]}, SamplingParams(temperature=0.0, max_tokens=4))
    assert not os.path.exists(marker), "the engine unpickled pytorch_model.bin"


def test_unsupported_model_type_is_named(tmp_path, tiny_llama_dir):
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 49152, "n_embd": 64,
              "n_layer": 2, "n_head": 4, "n_positions": 128}
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({"transformer.wte.weight": torch.zeros(8, 4)}, str(tmp_path / "model.safetensors"))
    copy_tokenizer(tiny_llama_dir("llama_tied"), str(tmp_path))
    with pytest.raises(ModelLoadError, match="gpt2") as err:
        make_llm(str(tmp_path))
    assert "llama" in str(err.value)  # and says what is supported


def _copy_with_tensors(source: str, dest: str, edit) -> str:
    shutil.copytree(source, dest)
    file = os.path.join(dest, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    return dest


def test_checkpoint_missing_a_tensor_is_refused(tmp_path, tiny_llama_dir):
    name = "model.layers.1.post_attention_layernorm.weight"
    path = _copy_with_tensors(tiny_llama_dir("llama_untied"), str(tmp_path / "ckpt"), lambda t: t.pop(name))
    with pytest.raises(ModelLoadError, match="lacks"):
        make_llm(path)


def test_checkpoint_with_a_foreign_tensor_is_refused(tmp_path, tiny_llama_dir):
    def add_foreign(tensors):
        tensors["model.layers.0.mlp.expert_gate.weight"] = torch.zeros(4, 64)

    path = _copy_with_tensors(tiny_llama_dir("llama_untied"), str(tmp_path / "ckpt"), add_foreign)
    with pytest.raises(ModelLoadError, match="expert_gate"):
        make_llm(path)


def test_mistral_sliding_window_is_capped_to_the_window(tiny_llama_dir, hf_tiny_model):
    """A checkpoint whose attention only sees the last ``sliding_window`` (16) positions.

    The engine's attention is full-context, which equals sliding-window attention only while
    the context fits the window: so a max_model_len past the window is refused (naming the
    field and why), the default context is the window, and within it the engine gives
    transformers' tokens -- including a request cut short by the 16-token context.
    """
    path, window = tiny_llama_dir("mistral_sliding_window"), 16
    for too_long in (512, window + 1):
        with pytest.raises(InvalidConfigError, match="sliding_window") as err:
            make_llm(path, max_model_len=too_long)
        assert err.value.field == "max_model_len", f"blamed field {err.value.field!r}: {err.value}"

    llm = make_llm(path, max_model_len=None)
    assert llm.engine.max_model_len == window
    hf = hf_tiny_model("mistral_sliding_window")
    # (prompt, max_tokens): prompt + output fill the window exactly, or would pass it and are cut.
    cases = [(PROMPTS[0], 15), (PROMPTS[2][:10], 6), (PROMPTS[1], 16)]
    outputs = llm.generate([{"prompt_token_ids": p} for p, _ in cases],
                           [SamplingParams(temperature=0.0, max_tokens=n) for _, n in cases])
    for (prompt, max_tokens), out in zip(cases, outputs):
        tokens = out.outputs[0].token_ids
        assert len(prompt) + len(tokens) == window, f"prompt of {len(prompt)}, max_tokens={max_tokens}"
        assert tokens == hf_greedy(hf, prompt, window - len(prompt)), f"prompt of {len(prompt)}"
    assert outputs[2].outputs[0].finish_reason == "length"
    with pytest.raises(InvalidRequestError, match="prompt"):
        llm.generate({"prompt_token_ids": PROMPTS[2]}, SamplingParams(temperature=0.0, max_tokens=1))
    assert_no_leak(llm)


def test_unsupported_rope_scaling_is_refused_naming_the_model(tiny_llama_dir):
    with pytest.raises(ModelLoadError, match="linear") as err:
        make_llm(tiny_llama_dir("llama_linear_rope"))
    # It is the checkpoint that is unsupported, not the tensor-parallel size.
    assert err.value.field == "model", f"blamed field {err.value.field!r}: {err.value}"


def _edit_config(**changes):
    def edit(path):
        config_file = os.path.join(path, "config.json")
        with open(config_file) as f:
            config = json.load(f)
        for key, value in changes.items():
            if value is None:
                config.pop(key)
            else:
                config[key] = value
        with open(config_file, "w") as f:
            json.dump(config, f)
    return edit


def _write(name: str, text: str):
    def edit(path):
        with open(os.path.join(path, name), "w") as f:
            f.write(text)
    return edit


def _truncate_weights(path):
    with open(os.path.join(path, "model.safetensors"), "r+b") as f:
        f.truncate(1000)


def _shrink_final_norm(path):
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    tensors["model.norm.weight"] = torch.ones(32)  # the config says hidden_size 64
    save_file(tensors, file, metadata={"format": "pt"})


def _remove_tokenizer(path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        os.remove(os.path.join(path, name))


@pytest.mark.parametrize("break_checkpoint", [
    pytest.param(_edit_config(hidden_size=None), id="config-missing-hidden_size"),
    pytest.param(_write("config.json", "{not json"), id="config-not-json"),
    pytest.param(_truncate_weights, id="truncated-safetensors"),
    pytest.param(_shrink_final_norm, id="tensor-shape-disagrees-with-config"),
    # The embedding and lm_head hold 49,152 rows; loading only the first 1,000 would be silent garbage.
    pytest.param(_edit_config(vocab_size=1000), id="config-vocab-smaller-than-checkpoint"),
    pytest.param(_remove_tokenizer, id="no-tokenizer"),
])
def test_broken_checkpoint_is_a_model_load_error(tmp_path, tiny_llama_dir, break_checkpoint):
    """errors.py: every user-facing failure is a typed error; a bad checkpoint is a ModelLoadError."""
    path = str(tmp_path / "ckpt")
    shutil.copytree(tiny_llama_dir("llama_untied"), path)
    break_checkpoint(path)
    with pytest.raises(ModelLoadError):
        make_llm(path)
