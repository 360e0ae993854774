"""Sampling through the whole engine: seeds, stop strings and tokens, min/max tokens, logprobs.

Seeded sampling runs on a tiny random checkpoint (its near-uniform distribution makes
any mix-up of random streams visible at once); stop conditions run on SmolLM2, whose
greedy text is real prose, against transformers' greedy reference.
"""

from __future__ import annotations

import pytest
import torch

from cluster import LLM, SamplingParams
from tests.conftest import NUM_THREADS, SMOLLM2_EOS_ID, SMOLLM2_MAX_TOKENS, assert_no_leak, hf_greedy, record_preemptions

SEEDED = SamplingParams(temperature=1.0, seed=1234, max_tokens=20, ignore_eos=True)
SEEDED_TRUNCATED = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.01, seed=99, max_tokens=20,
                                  ignore_eos=True)
PROMPT_A = {"prompt_token_ids": [1, 504, 3458, 282, 9000, 77]}
PROMPT_B = {"prompt_token_ids": list(range(1000, 1045))}


def tokens(output) -> list[int]:
    return output.outputs[0].token_ids


def other_requests(n: int) -> tuple[list[dict], list[SamplingParams]]:
    """Unseeded random, greedy and penalised requests of different lengths to share a batch."""
    prompts = [{"prompt_token_ids": list(range(2000 + 13 * i, 2000 + 13 * i + 5 + 9 * i))} for i in range(n)]
    kinds = [SamplingParams(temperature=1.0, max_tokens=7 + 5 * (i % 4), ignore_eos=True) for i in range(n)]
    kinds[0] = SamplingParams(temperature=0.0, max_tokens=15, ignore_eos=True)
    kinds[-1] = SamplingParams(temperature=0.7, repetition_penalty=1.3, frequency_penalty=0.5, max_tokens=30,
                               ignore_eos=True)
    return prompts, kinds


@pytest.fixture(scope="module")
def tiny_llm(tiny_llama_dir) -> LLM:
    return LLM(tiny_llama_dir("llama_untied"), num_threads=NUM_THREADS, num_blocks=256, max_model_len=512)


# ---- seeds ------------------------------------------------------------------------------------


def test_seeded_request_is_reproducible_across_batch_compositions(tiny_llm):
    alone = tokens(tiny_llm.generate(PROMPT_A, SEEDED)[0])
    alone_truncated = tokens(tiny_llm.generate(PROMPT_B, SEEDED_TRUNCATED)[0])
    assert tokens(tiny_llm.generate(PROMPT_A, SEEDED)[0]) == alone  # and across runs

    prompts, params = other_requests(6)
    batch = tiny_llm.generate(prompts[:2] + [PROMPT_A] + prompts[2:4] + [PROMPT_B] + prompts[4:],
                              params[:2] + [SEEDED] + params[2:4] + [SEEDED_TRUNCATED] + params[4:])
    assert tokens(batch[2]) == alone
    assert tokens(batch[5]) == alone_truncated
    # Reversed order, different neighbours.
    batch = tiny_llm.generate([PROMPT_B, PROMPT_A] + prompts[::-1], [SEEDED_TRUNCATED, SEEDED] + params[::-1])
    assert tokens(batch[0]) == alone_truncated and tokens(batch[1]) == alone
    assert_no_leak(tiny_llm)


def test_different_seeds_give_different_samples(tiny_llm):
    samples = [tokens(o) for o in tiny_llm.generate([PROMPT_A] * 3, [
        SamplingParams(temperature=1.0, seed=s, max_tokens=20, ignore_eos=True) for s in (1, 2, 3)])]
    assert len({tuple(s) for s in samples}) == 3
    # The same seed twice in one batch: identical, each has its own generator.
    twins = tiny_llm.generate([PROMPT_A, PROMPT_A], SEEDED)
    assert tokens(twins[0]) == tokens(twins[1])
    assert_no_leak(tiny_llm)


def test_seeded_request_joining_mid_flight_is_unchanged(tiny_llm):
    alone = tokens(tiny_llm.generate(PROMPT_A, SEEDED)[0])
    engine = tiny_llm.engine
    prompts, params = other_requests(4)
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(f"other-{i}", p, sp)
    for _ in range(3):
        engine.step()
    engine.add_request("seeded", PROMPT_A, SEEDED)
    finished = {}
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    assert tokens(finished["seeded"]) == alone
    assert_no_leak(tiny_llm)


def test_seeded_request_survives_preemption(tiny_llama_dir, tiny_llm):
    alone = [tokens(tiny_llm.generate(PROMPT_A, SEEDED)[0]), tokens(tiny_llm.generate(PROMPT_B, SEEDED_TRUNCATED)[0])]
    # 20 blocks of 4 tokens: the batch cannot all fit, so sequences are preempted and recomputed.
    llm = LLM(tiny_llama_dir("llama_untied"), num_threads=NUM_THREADS, num_blocks=20, block_size=4,
              max_model_len=512)
    preempted = record_preemptions(llm)
    prompts, params = other_requests(3)
    outputs = llm.generate([PROMPT_A] + prompts + [PROMPT_B], [SEEDED] + params + [SEEDED_TRUNCATED])
    assert preempted, "the KV budget was meant to force a preemption"
    assert [tokens(outputs[0]), tokens(outputs[-1])] == alone
    assert_no_leak(llm)


def test_engine_seed_makes_unseeded_requests_reproducible(tiny_llama_dir):
    params = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    runs = []
    for _ in range(2):
        llm = LLM(tiny_llama_dir("llama_untied"), num_threads=NUM_THREADS, num_blocks=32, max_model_len=512, seed=7)
        runs.append([tokens(o) for o in llm.generate([PROMPT_A, PROMPT_B], params)])
    assert runs[0] == runs[1]
    assert runs[0][0] != runs[0][1]


def test_logprobs_zero_returns_only_the_sampled_token(tiny_llm):
    [out] = tiny_llm.generate(PROMPT_A, SamplingParams(temperature=1.0, seed=5, max_tokens=6, logprobs=0))
    completion = out.outputs[0]
    assert len(completion.logprobs) == len(completion.token_ids) == 6
    for token, entry in zip(completion.token_ids, completion.logprobs):
        assert entry.token_id == token and entry.top == {} and entry.logprob <= 0.0


def test_streamed_text_never_shows_a_stop_string(tiny_llm):
    """Every intermediate output is a prefix of the final text: a partial stop string is held back."""
    params = dict(temperature=1.0, seed=21, max_tokens=40, ignore_eos=True)
    reference = tiny_llm.generate(PROMPT_B, SamplingParams(**params))[0].outputs[0].text
    stop = reference[len(reference) // 2: len(reference) // 2 + 3]
    assert len(stop) == 3
    engine = tiny_llm.engine
    engine.add_request("streamed", PROMPT_B, SamplingParams(stop=[stop], **params))
    streamed = []
    while engine.has_unfinished_requests():
        streamed += [o for o in engine.step() if o.request_id == "streamed"]
    final = streamed[-1].outputs[0]
    assert final.finish_reason == "stop" and final.text == reference[: reference.index(stop)]
    for out in streamed:
        assert final.text.startswith(out.outputs[0].text) and stop not in out.outputs[0].text
    assert_no_leak(tiny_llm)


# ---- stop conditions and logprobs on SmolLM2 ------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_llm(smollm2_path) -> LLM:
    return LLM(smollm2_path, num_threads=NUM_THREADS, num_blocks=128)


@pytest.fixture(scope="module")
def reference_texts(smollm2_references, smollm2_tokenizer) -> dict[str, str]:
    return {name: smollm2_tokenizer.decode(ref, skip_special_tokens=True) for name, ref in smollm2_references.items()}


def greedy(**options) -> SamplingParams:
    return SamplingParams(temperature=0.0, **{"max_tokens": SMOLLM2_MAX_TOKENS, **options})


@pytest.mark.slow
@pytest.mark.parametrize(("stop", "expected_cut"), [
    pytest.param(["Rayleigh"], "Rayleigh", id="whole-word"),
    pytest.param(["cause of a pro"], "cause of a pro", id="spans-tokens-mid-word"),
    pytest.param(["scattering", "blue"], "blue", id="earliest-of-two"),
])
def test_stop_string_ends_generation_and_is_excluded(smollm2_llm, smollm2_prompts, smollm2_references,
                                                     reference_texts, stop, expected_cut):
    reference_text = reference_texts["question"]
    assert expected_cut in reference_text, "precondition: the stop string occurs in the greedy reference"
    [out] = smollm2_llm.generate({"prompt_token_ids": smollm2_prompts["question"]}, greedy(stop=stop))
    completion = out.outputs[0]
    assert completion.text == reference_text[: reference_text.index(expected_cut)]
    assert completion.finish_reason == "stop"
    # Generation ended on the token that completed the stop string, not later.
    reference = smollm2_references["question"]
    assert completion.token_ids == reference[: len(completion.token_ids)]
    assert len(completion.token_ids) < len(reference)
    assert_no_leak(smollm2_llm)


@pytest.mark.slow
def test_stop_string_that_never_appears_changes_nothing(smollm2_llm, smollm2_prompts, smollm2_references,
                                                         reference_texts):
    [out] = smollm2_llm.generate({"prompt_token_ids": smollm2_prompts["question"]}, greedy(stop=["zebra crossing"]))
    assert out.outputs[0].token_ids == smollm2_references["question"]
    assert out.outputs[0].text == reference_texts["question"]
    assert out.outputs[0].finish_reason == "length"


@pytest.mark.slow
def test_stop_token_id_ends_generation_and_is_kept_in_token_ids(smollm2_llm, smollm2_prompts, smollm2_references):
    reference = smollm2_references["code"]
    index = next(i for i in range(4, len(reference)) if reference[i] not in reference[:i])
    [out] = smollm2_llm.generate({"prompt_token_ids": smollm2_prompts["code"]},
                                 greedy(stop_token_ids=[reference[index]]))
    assert out.outputs[0].token_ids == reference[: index + 1]
    assert out.outputs[0].finish_reason == "stop"
    assert_no_leak(smollm2_llm)


@pytest.mark.slow
def test_min_tokens_masks_eos_like_transformers(smollm2_llm, smollm2_prompts, hf_smollm2):
    ids = smollm2_prompts["eos_first"]  # greedy decoding would stop at once
    min_tokens = 6
    [out] = smollm2_llm.generate({"prompt_token_ids": ids}, greedy(max_tokens=16, min_tokens=min_tokens))
    completion = out.outputs[0]
    assert len(completion.token_ids) >= min_tokens
    assert SMOLLM2_EOS_ID not in completion.token_ids[:min_tokens]
    expected = hf_greedy(hf_smollm2, ids, 16, min_new_tokens=min_tokens)
    assert completion.token_ids == expected
    assert completion.finish_reason == ("stop" if expected[-1] == SMOLLM2_EOS_ID else "length")
    assert_no_leak(smollm2_llm)


@pytest.mark.slow
def test_ignore_eos_generates_past_eos(smollm2_llm, smollm2_prompts, smollm2_references):
    reference = smollm2_references["quiz"]
    assert reference[-1] == SMOLLM2_EOS_ID and len(reference) < 20
    [out] = smollm2_llm.generate({"prompt_token_ids": smollm2_prompts["quiz"]}, greedy(max_tokens=20, ignore_eos=True))
    assert len(out.outputs[0].token_ids) == 20 and out.outputs[0].finish_reason == "length"
    assert out.outputs[0].token_ids[: len(reference)] == reference


@pytest.mark.slow
def test_max_tokens_ends_with_length(smollm2_llm, smollm2_prompts, smollm2_references, reference_texts,
                                     smollm2_tokenizer):
    [out] = smollm2_llm.generate({"prompt_token_ids": smollm2_prompts["code"]}, greedy(max_tokens=5))
    assert out.outputs[0].token_ids == smollm2_references["code"][:5]
    assert out.outputs[0].finish_reason == "length"
    assert out.outputs[0].text == smollm2_tokenizer.decode(smollm2_references["code"][:5])


@pytest.mark.slow
def test_logprobs_have_n_entries_and_match_transformers(smollm2_llm, smollm2_prompts, hf_smollm2):
    ids = smollm2_prompts["list"]
    [out] = smollm2_llm.generate({"prompt_token_ids": ids}, greedy(max_tokens=8, logprobs=4))
    completion = out.outputs[0]
    assert len(completion.logprobs) == len(completion.token_ids) == 8
    with torch.no_grad():
        logits = hf_smollm2(torch.tensor([ids + completion.token_ids])).logits[0]
    hf_logprobs = torch.log_softmax(logits[len(ids) - 1:-1].float(), dim=-1)
    for i, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
        assert len(entry.top) == 4
        assert list(entry.top)[0] == token  # greedy: the sampled token is the most likely one
        values = list(entry.top.values())
        assert values == sorted(values, reverse=True)
        assert entry.logprob == pytest.approx(hf_logprobs[i, token].item(), abs=1e-3)
        top_values, top_ids = hf_logprobs[i].topk(4)
        assert list(entry.top) == top_ids.tolist()
        assert values == pytest.approx(top_values.tolist(), abs=1e-3)
    assert_no_leak(smollm2_llm)


@pytest.mark.slow
def test_repetition_penalty_matches_transformers(smollm2_llm, smollm2_prompts, smollm2_references, hf_smollm2):
    ids = smollm2_prompts["list"]  # its plain greedy output repeats itself
    [out] = smollm2_llm.generate({"prompt_token_ids": ids}, greedy(max_tokens=16, repetition_penalty=1.3))
    expected = hf_greedy(hf_smollm2, ids, 16, repetition_penalty=1.3)
    assert out.outputs[0].token_ids == expected
    assert expected != smollm2_references["list"][:16]  # the penalty really changed something
    assert_no_leak(smollm2_llm)
