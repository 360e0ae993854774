"""Bad input is refused with a typed ValueError naming the field, and leaves the engine untouched.

A live engine (a tiny checkpoint, max_model_len=64) must reject each bad request
without queueing anything or holding a block, and serve the next good request.
Aborts free every block whatever state the request was in.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from cluster import LLM, InvalidConfigError, InvalidRequestError, ModelLoadError, SamplingParams
from tests.conftest import NUM_THREADS, assert_no_leak, copy_tokenizer

MAX_MODEL_LEN = 64
VOCAB_SIZE = 49152
GOOD_PROMPT = {"prompt_token_ids": [1, 504, 3458, 282]}


@pytest.fixture(scope="module")
def llm(tiny_llama_dir) -> LLM:
    return LLM(tiny_llama_dir("llama_tied"), num_threads=NUM_THREADS, max_model_len=MAX_MODEL_LEN, num_blocks=64)


def assert_engine_still_serves(llm: LLM) -> None:
    assert_no_leak(llm)
    [out] = llm.generate(GOOD_PROMPT, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    assert len(out.outputs[0].token_ids) == 3 and out.outputs[0].finish_reason == "length"
    assert_no_leak(llm)


# ---- bad prompts on a live engine --------------------------------------------------------------

BAD_PROMPTS = [
    pytest.param("", "prompt", "non-empty", id="empty-text"),
    pytest.param("word " * 200, "prompt", f"at most {MAX_MODEL_LEN}", id="text-over-max_model_len"),
    pytest.param({"prompt_token_ids": list(range(100, 101 + MAX_MODEL_LEN))}, "prompt",
                 f"at most {MAX_MODEL_LEN}", id="ids-one-past-max_model_len"),
    pytest.param({"prompt_token_ids": [5] * 10**6}, "prompt", f"at most {MAX_MODEL_LEN}", id="ids-a-million"),
    pytest.param("caf\ud800", "prompt", "lone surrogate", id="text-lone-surrogate"),
    pytest.param({"prompt_token_ids": [10**9]}, "prompt_token_ids", f"[0, {VOCAB_SIZE})", id="id-too-large"),
    pytest.param({"prompt_token_ids": [VOCAB_SIZE]}, "prompt_token_ids", f"[0, {VOCAB_SIZE})", id="id-vocab-size"),
    pytest.param({"prompt_token_ids": [5, -1]}, "prompt_token_ids", f"[0, {VOCAB_SIZE})", id="id-negative"),
    pytest.param({"prompt_token_ids": [5, 2.0]}, "prompt_token_ids", f"[0, {VOCAB_SIZE})", id="id-float"),
    pytest.param({"prompt_token_ids": [5, True]}, "prompt_token_ids", f"[0, {VOCAB_SIZE})", id="id-bool"),
    pytest.param({"prompt_token_ids": []}, "prompt_token_ids", "non-empty", id="ids-empty"),
    pytest.param({"prompt_token_ids": "1 2 3"}, "prompt_token_ids", "list", id="ids-not-a-list"),
    pytest.param({"text": "hi"}, "prompt", "prompt_token_ids", id="dict-without-prompt"),
    pytest.param([12345], "prompt", "string", id="not-a-prompt"),
    pytest.param(12345, "prompts", "list of prompts", id="not-a-prompt-list"),
]


@pytest.mark.parametrize(("prompt", "field", "allowed"), BAD_PROMPTS)
def test_bad_prompt_is_refused_and_changes_nothing(llm, prompt, field, allowed):
    free_before = llm.engine.num_free_blocks
    with pytest.raises(InvalidRequestError) as err:
        llm.generate(prompt, SamplingParams(max_tokens=4))
    assert isinstance(err.value, ValueError)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}:") and allowed in str(err.value)
    assert llm.engine.num_free_blocks == free_before
    assert_engine_still_serves(llm)


def test_prompt_at_exactly_max_model_len_is_served_with_one_token(llm):
    ids = list(range(100, 100 + MAX_MODEL_LEN))
    [out] = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    # The context is full: the last prompt position still yields one token, then the request ends.
    assert len(out.outputs[0].token_ids) == 1 and out.outputs[0].finish_reason == "length"
    assert_engine_still_serves(llm)


def test_prompt_one_below_max_model_len_is_accepted(llm):
    ids = list(range(100, 100 + MAX_MODEL_LEN - 1))
    [out] = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    # Only one position is left in the context: the request ends on length after one token.
    assert out.outputs[0].token_ids and len(out.outputs[0].token_ids) == 1
    assert out.outputs[0].finish_reason == "length"
    assert_no_leak(llm)


def test_output_stops_at_max_model_len(llm):
    ids = list(range(100, 140))
    [out] = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0.0, max_tokens=MAX_MODEL_LEN, ignore_eos=True))
    assert len(ids) + len(out.outputs[0].token_ids) == MAX_MODEL_LEN
    assert out.outputs[0].finish_reason == "length"
    assert_no_leak(llm)


# ---- bad sampling parameters ----------------------------------------------------------------------

BAD_PARAMS = [
    pytest.param({"max_tokens": 0}, "max_tokens", "in [1, ", id="max_tokens-0"),
    pytest.param({"max_tokens": -5}, "max_tokens", "in [1, ", id="max_tokens-negative"),
    pytest.param({"max_tokens": 2**64}, "max_tokens", "the context length", id="max_tokens-2**64"),
    pytest.param({"max_tokens": 1.0}, "max_tokens", "an integer", id="max_tokens-float"),
    pytest.param({"temperature": -1.0}, "temperature", "[0, 100]", id="temperature-negative"),
    pytest.param({"temperature": math.nan}, "temperature", "finite", id="temperature-nan"),
    pytest.param({"temperature": math.inf}, "temperature", "finite", id="temperature-inf"),
    pytest.param({"temperature": 10**400}, "temperature", "finite", id="temperature-huge-int"),
    pytest.param({"top_p": 0.0}, "top_p", "(0, 1]", id="top_p-0"),
    pytest.param({"top_p": 1.5}, "top_p", "(0, 1]", id="top_p-1.5"),
    pytest.param({"top_k": 0}, "top_k", "-1 or in [1, ", id="top_k-0"),
    pytest.param({"top_k": -2}, "top_k", "-1", id="top_k-minus-2"),
    pytest.param({"top_k": 2**63}, "top_k", "the vocabulary size", id="top_k-2**63"),
    pytest.param({"min_p": 1.5}, "min_p", "[0, 1]", id="min_p-1.5"),
    pytest.param({"repetition_penalty": 0.0}, "repetition_penalty", "[0.01, 100]", id="repetition_penalty-0"),
    pytest.param({"repetition_penalty": math.inf}, "repetition_penalty", "finite", id="repetition_penalty-inf"),
    pytest.param({"presence_penalty": 3.0}, "presence_penalty", "[-2, 2]", id="presence_penalty-3"),
    pytest.param({"frequency_penalty": -2.5}, "frequency_penalty", "[-2, 2]", id="frequency_penalty--2.5"),
    pytest.param({"seed": -1}, "seed", "[0, 9223372036854775807]", id="seed-negative"),
    pytest.param({"seed": 2**63}, "seed", "[0, 9223372036854775807]", id="seed-2**63"),
    pytest.param({"n": 2}, "n", "[1, 1]", id="n-2"),
    pytest.param({"logprobs": 21}, "logprobs", "[0, 20]", id="logprobs-21"),
    pytest.param({"min_tokens": 5, "max_tokens": 4}, "min_tokens", "<= max_tokens", id="min_tokens-over-max"),
    pytest.param({"stop": [""]}, "stop", "non-empty", id="stop-empty-string"),
    pytest.param({"stop": ["x\ud800"]}, "stop", "lone surrogate", id="stop-lone-surrogate"),
    pytest.param({"stop": ["a"] * 17}, "stop", "at most 16", id="stop-too-many"),
    pytest.param({"stop": [["nested"]]}, "stop", "must be a string", id="stop-nested-list"),
    pytest.param({"stop_token_ids": [-3]}, "stop_token_ids", "in [0, ", id="stop_token_ids-negative"),
    pytest.param({"stop_token_ids": -1}, "stop_token_ids", "must be a list", id="stop_token_ids-not-a-list"),
    pytest.param({"ignore_eos": "yes"}, "ignore_eos", "true or false", id="ignore_eos-string"),
    pytest.param({"ignore_eos": 1}, "ignore_eos", "true or false", id="ignore_eos-int"),
    pytest.param({"skip_special_tokens": "no"}, "skip_special_tokens", "true or false", id="skip_special_tokens-str"),
]

# Within the table's static ranges, but beyond this model: refused by the engine, which knows the model.
BAD_FOR_THE_MODEL = [
    pytest.param({"top_k": VOCAB_SIZE + 1}, "top_k", f"in [1, {VOCAB_SIZE}]", id="top_k-above-vocab"),
    pytest.param({"stop_token_ids": [VOCAB_SIZE]}, "stop_token_ids", f"in [0, {VOCAB_SIZE - 1}]",
                 id="stop_token_id-vocab-size"),
    pytest.param({"max_tokens": MAX_MODEL_LEN + 1}, "max_tokens", f"in [1, {MAX_MODEL_LEN}]",
                 id="max_tokens-above-context"),
    pytest.param({"min_tokens": MAX_MODEL_LEN + 1, "max_tokens": MAX_MODEL_LEN + 1}, "max_tokens",
                 f"in [1, {MAX_MODEL_LEN}]", id="min_tokens-above-context"),
]


@pytest.mark.parametrize(("options", "field", "allowed"), BAD_FOR_THE_MODEL)
def test_params_beyond_the_model_are_refused_by_the_engine(llm, options, field, allowed):
    params = SamplingParams(**options)  # legal in general
    with pytest.raises(InvalidRequestError) as err:
        llm.generate(GOOD_PROMPT, params)
    assert err.value.field == field and allowed in str(err.value), str(err.value)
    assert_engine_still_serves(llm)


def test_every_field_of_the_limits_table_has_a_refused_value():
    """The table is the contract: each field in it is exercised by BAD_PARAMS or BAD_FOR_THE_MODEL."""
    from cluster.request_limits import SAMPLING_LIMITS

    covered = {p.values[1] for p in BAD_PARAMS + BAD_FOR_THE_MODEL}
    assert set(SAMPLING_LIMITS) <= covered, set(SAMPLING_LIMITS) - covered


@pytest.mark.parametrize(("options", "field", "allowed"), BAD_PARAMS)
def test_bad_sampling_params_are_refused_at_construction(options, field, allowed):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**options)
    assert isinstance(err.value, ValueError)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}:") and allowed in str(err.value)


@pytest.mark.parametrize(("options", "field", "allowed"), BAD_PARAMS)
def test_bad_sampling_params_set_later_are_refused_by_the_engine(llm, options, field, allowed):
    params = SamplingParams()
    for name, value in options.items():
        setattr(params, name, value)
    free_before = llm.engine.num_free_blocks
    with pytest.raises(InvalidRequestError) as err:
        llm.generate(GOOD_PROMPT, params)
    assert err.value.field == field and allowed in str(err.value)
    assert llm.engine.num_free_blocks == free_before
    assert_engine_still_serves(llm)


def test_wrong_sampling_params_type_and_count(llm):
    with pytest.raises(InvalidRequestError, match="sampling_params"):
        llm.generate(GOOD_PROMPT, {"temperature": 0.0})
    with pytest.raises(InvalidRequestError, match="sampling_params"):
        llm.generate([GOOD_PROMPT, GOOD_PROMPT], [SamplingParams()])
    with pytest.raises(InvalidRequestError, match="prompts"):
        llm.generate([])
    assert_engine_still_serves(llm)


def test_one_bad_prompt_in_a_list_queues_nothing(llm):
    prompts = [GOOD_PROMPT, {"prompt_token_ids": [7, 8, 9]}, {"prompt_token_ids": [10**9]}, GOOD_PROMPT]
    free_before = llm.engine.num_free_blocks
    with pytest.raises(InvalidRequestError, match="prompt_token_ids"):
        llm.generate(prompts, SamplingParams(max_tokens=4))
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.scheduler.num_waiting == 0 and llm.engine.scheduler.num_running == 0
    assert llm.engine.num_free_blocks == free_before
    assert llm.engine.step() == []  # nothing was queued behind our back
    assert_engine_still_serves(llm)


def test_duplicate_request_id_is_refused(llm):
    engine = llm.engine
    engine.add_request("dup", GOOD_PROMPT, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    with pytest.raises(InvalidRequestError, match="request_id"):
        engine.add_request("dup", GOOD_PROMPT, SamplingParams())
    finished = _drain(engine)
    assert list(finished) == ["dup"] and len(finished["dup"].outputs[0].token_ids) == 2
    assert_engine_still_serves(llm)


# ---- abort ---------------------------------------------------------------------------------------


def _drain(engine, max_steps: int = 200) -> dict:
    finished = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return finished
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    raise AssertionError("the engine did not drain")


def test_abort_in_every_state_frees_all_blocks(tiny_llama_dir):
    # 16-token budget and 2 running sequences at most: one decodes, one is mid-prefill, one waits.
    llm = LLM(tiny_llama_dir("llama_tied"), num_threads=NUM_THREADS, max_model_len=256, num_blocks=64,
              block_size=4, max_num_batched_tokens=16, max_num_seqs=2)
    engine = llm.engine
    start_free = engine.num_free_blocks
    params = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
    engine.add_request("decoding", {"prompt_token_ids": list(range(10, 18))}, params)
    engine.add_request("prefilling", {"prompt_token_ids": list(range(200, 260))}, params)
    engine.add_request("waiting", {"prompt_token_ids": list(range(300, 310))}, params)
    for _ in range(3):
        engine.step()

    sched = engine.scheduler
    decoding, prefilling, waiting = (sched.get(r) for r in ("decoding", "prefilling", "waiting"))
    assert decoding.num_output_tokens >= 2
    assert 0 < prefilling.num_computed_tokens < prefilling.num_prompt_tokens
    assert waiting.status.value == "waiting" and not waiting.block_ids
    assert engine.num_free_blocks < start_free

    for rid in ("prefilling", "waiting", "decoding"):
        assert engine.abort(rid)
    assert engine.num_free_blocks == start_free
    assert not engine.abort("decoding")  # already gone
    assert not engine.abort("never-added")

    outputs = {o.request_id: o for o in engine.step()}
    assert set(outputs) == {"decoding", "prefilling", "waiting"}
    for out in outputs.values():
        assert out.finished and out.outputs[0].finish_reason == "abort"
    assert len(outputs["decoding"].outputs[0].token_ids) == decoding.num_output_tokens
    assert outputs["waiting"].outputs[0].token_ids == []
    assert_engine_still_serves(llm)


# ---- bad engine configuration (no model needed for most) -------------------------------------------

BAD_ENGINE_OPTIONS = [
    pytest.param({"foo": 1}, "foo", "unknown engine option", id="unknown-option"),
    pytest.param({"dtype": "int8"}, "dtype", "float32", id="dtype"),
    pytest.param({"dtype": "float16", "device": "cpu"}, "dtype", "bfloat16 or float32", id="float16-on-cpu"),
    pytest.param({"device": "tpu"}, "device", "cpu", id="device"),
    pytest.param({"block_size": 0}, "block_size", "[1, 1024]", id="block_size-0"),
    pytest.param({"num_blocks": 0}, "num_blocks", ">= 1", id="num_blocks-0"),
    pytest.param({"max_model_len": 0}, "max_model_len", ">= 1", id="max_model_len-0"),
    pytest.param({"max_num_seqs": 0}, "max_num_seqs", ">= 1", id="max_num_seqs-0"),
    pytest.param({"max_num_batched_tokens": 0}, "max_num_batched_tokens", ">= 1", id="max_num_batched_tokens-0"),
    pytest.param({"kv_cache_memory_bytes": 0}, "kv_cache_memory_bytes", "> 0", id="kv_cache_memory_bytes-0"),
    pytest.param({"enable_prefix_caching": "yes"}, "enable_prefix_caching", "bool", id="prefix-caching-str"),
    pytest.param({"num_threads": 0}, "num_threads", ">= 1", id="num_threads-0"),
]


@pytest.mark.parametrize(("options", "field", "allowed"), BAD_ENGINE_OPTIONS)
def test_bad_engine_option_is_refused_before_loading(options, field, allowed):
    # The model path does not exist: the option must be refused before anything is loaded.
    with pytest.raises(InvalidConfigError) as err:
        LLM("/nonexistent/model/dir", **options)
    assert isinstance(err.value, ValueError) and not isinstance(err.value, ModelLoadError)
    assert err.value.field == field and allowed in str(err.value)


def test_missing_model_path_is_a_model_load_error(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelLoadError) as err:
        LLM(missing)
    assert isinstance(err.value, ValueError)
    assert err.value.field == "model" and missing in str(err.value)


def test_directory_without_config_is_a_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        LLM(str(tmp_path))


def test_unsupported_architecture_is_a_model_load_error(tmp_path, tiny_llama_dir):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba", "vocab_size": 49152}))
    save_file({"backbone.embeddings.weight": torch.zeros(4, 4)}, str(tmp_path / "model.safetensors"))
    copy_tokenizer(tiny_llama_dir("llama_tied"), str(tmp_path))
    with pytest.raises(ModelLoadError, match="mamba") as err:
        LLM(str(tmp_path), num_threads=NUM_THREADS)
    assert err.value.field == "model"


def test_max_model_len_beyond_the_model_is_refused(tiny_llama_dir):
    with pytest.raises(InvalidConfigError, match="max_model_len") as err:
        LLM(tiny_llama_dir("llama_tied"), num_threads=NUM_THREADS, num_blocks=8, max_model_len=100_000)
    assert "512" in str(err.value)  # names the model's limit
