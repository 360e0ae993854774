"""Structured outputs end to end: outputs follow their constraint (JSON schema, JSON object, regex,
choice, grammar), batched with each other and with free requests, with speculative decoding on and
off; and SmolLM2 answers 50 JSON schemas with output that parses and validates."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest

from cluster import LLM, SamplingParams
from cluster.sampling.grammar import GrammarCompiler
from cluster.structured_outputs import StructuredOutputs
from tests.conftest import NUM_THREADS, assert_no_leak

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
          "required": ["name", "age", "tags"], "additionalProperties": False}
CONSTRAINTS = {
    "schema": {"json": PERSON},
    "object": {"json_object": True},
    "regex": {"regex": r"[0-9]{3}-[A-Z]{2}"},
    "choice": {"choice": ["red", "green", "blue, maybe \"teal\""]},
    "grammar": {"grammar": 'root ::= "(" item ("," item){0,2} ")"\nitem ::= [a-z] | [0-9]'},
}


def _follows(kind: str, text: str) -> bool:
    if kind == "schema":
        try:
            jsonschema.validate(json.loads(text), PERSON)
        except (ValueError, jsonschema.ValidationError):
            return False
        return True
    if kind == "object":
        try:
            return isinstance(json.loads(text), dict)
        except ValueError:
            return False
    if kind == "regex":
        return re.fullmatch(CONSTRAINTS["regex"]["regex"], text) is not None
    if kind == "choice":
        return text in CONSTRAINTS["choice"]["choice"]
    return re.fullmatch(r"\([a-z0-9](,[a-z0-9]){0,2}\)", text) is not None


def _prefix_is_allowed(compiler: GrammarCompiler, kind: str, token_ids: list[int]) -> bool:
    grammar = compiler.matcher(StructuredOutputs(**CONSTRAINTS[kind]))
    return all(grammar.accept(t) for t in token_ids)


@pytest.mark.parametrize("speculative", [None, {"method": "ngram", "num_tokens": 4, "prompt_lookup_min": 1}],
                         ids=["plain", "ngram"])
def test_constrained_and_free_requests_batched_on_a_random_model(speculative, tiny_llama_dir):
    """A random-weight model writes nonsense, so every token of a constrained output is the mask's
    doing: each finished output follows its constraint, a cut one is still a prefix the constraint
    allows, and the free requests' tokens are those they get alone."""
    model = tiny_llama_dir("llama_deep")
    llm = LLM(model, dtype="float32", num_threads=NUM_THREADS, block_size=4, num_blocks=512,
              max_num_batched_tokens=64, speculative=speculative)
    tokenizer = llm.get_tokenizer()
    compiler = GrammarCompiler(tokenizer, llm.engine.arch.vocab_size, llm.engine.eos_token_ids)
    rng = random.Random(0)
    prompts, params, kinds = [], [], []
    for i in range(3):
        for kind, constraint in CONSTRAINTS.items():
            prompts.append([rng.randrange(100, 40000) for _ in range(rng.randint(3, 30))])
            greedy = i != 1  # one round sampled, seeded
            params.append(SamplingParams(temperature=0.0 if greedy else 0.9, seed=i, max_tokens=48,
                                         structured_outputs=constraint, logprobs=1 if i == 2 else None))
            kinds.append(kind)
    free = [[rng.randrange(100, 40000) for _ in range(12)] for _ in range(2)]
    free_params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts + free], params + [free_params] * 2)
    finished = {"stop": 0, "length": 0}
    for kind, out in zip(kinds, outs):
        completion = out.outputs[0]
        finished[completion.finish_reason] += 1
        if completion.finish_reason == "stop":
            assert _follows(kind, completion.text), (kind, completion.text)
        else:  # cut by max_tokens: still a prefix the constraint allows
            assert completion.finish_reason == "length" and len(completion.token_ids) == 48
            assert _prefix_is_allowed(compiler, kind, completion.token_ids), (kind, completion.text)
        if kind in ("regex", "choice", "grammar"):  # short languages: these always end
            assert completion.finish_reason == "stop", (kind, completion.text)
        if completion.logprobs:
            assert [lp.token_id for lp in completion.logprobs] == completion.token_ids
    alone = llm.generate([{"prompt_token_ids": p} for p in free], free_params)
    assert [o.outputs[0].token_ids for o in outs[-2:]] == [o.outputs[0].token_ids for o in alone]
    if speculative:
        assert llm.engine.stats()["spec_drafted_tokens"] > 0
    assert_no_leak(llm)


def test_greedy_constrained_output_is_the_same_with_speculation(tiny_llama_dir):
    model = tiny_llama_dir("llama_deep")
    options = dict(dtype="float32", num_threads=NUM_THREADS, block_size=4, num_blocks=512)
    prompts = [{"prompt_token_ids": [300 + i % 7 for i in range(n)]} for n in (5, 17, 29, 40, 9)]
    params = [SamplingParams(temperature=0.0, max_tokens=40, structured_outputs=c) for c in CONSTRAINTS.values()]
    plain = [o.outputs[0].token_ids for o in LLM(model, **options).generate(prompts, params)]
    llm = LLM(model, speculative={"method": "suffix", "num_tokens": 4, "min_token_prob": 0.0}, **options)
    for _ in range(2):  # the second round drafts from the first's outputs
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == plain
    stats = llm.engine.stats()
    assert stats["spec_accepted_tokens"] > 0, stats
    assert_no_leak(llm)


def _schemas(count: int, seed: int) -> list[tuple[str, dict]]:
    """Seeded record schemas: strings (bounded, enums, dates), bounded integers, booleans, enum arrays
    and one nested object, every property required."""
    rng = random.Random(seed)
    topics = ("a book", "a city", "a customer invoice", "a car", "a recipe", "a laptop", "a hotel stay",
              "a football match", "a job offer", "a flight")
    kinds = [
        lambda: {"type": "string", "maxLength": rng.randint(4, 24)},
        lambda: {"type": "string", "enum": rng.sample(["low", "medium", "high", "unknown", "n/a"], 3)},
        lambda: {"type": "string", "format": "date"},
        lambda: {"type": "integer", "minimum": 0, "maximum": rng.choice([10, 100, 5000])},
        lambda: {"type": "boolean"},
        lambda: {"type": "array", "items": {"type": "string", "enum": ["x", "y", "z"]}, "maxItems": 3},
        lambda: {"type": "object", "properties": {"code": {"type": "string", "maxLength": 6},
                                                  "ok": {"type": "boolean"}},
                 "required": ["code", "ok"], "additionalProperties": False},
    ]
    names = ("title", "name", "status", "year", "price", "count", "valid", "labels", "owner", "date", "rank", "meta")
    out = []
    for _ in range(count):
        props = {name: rng.choice(kinds)() for name in rng.sample(names, rng.randint(1, 4))}
        out.append((rng.choice(topics), {"type": "object", "properties": props, "required": list(props),
                                          "additionalProperties": False}))
    return out


def test_smollm2_answers_50_json_schemas_with_valid_json(smollm2_path):
    llm = LLM(smollm2_path, dtype="auto", num_threads=NUM_THREADS, num_blocks=512)
    tokenizer = llm.get_tokenizer()
    cases = _schemas(50, seed=7)
    prompts = [tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Describe {topic} as JSON with the fields {', '.join(schema['properties'])}."}],
        tokenize=False, add_generation_prompt=True) for topic, schema in cases]
    params = [SamplingParams(temperature=0.0 if i % 2 else 0.7, seed=i, max_tokens=128,
                             structured_outputs={"json": schema}) for i, (_, schema) in enumerate(cases)]
    outs = llm.generate(prompts, params)
    stopped = 0
    for (topic, schema), out in zip(cases, outs):
        completion = out.outputs[0]
        if completion.finish_reason == "length":
            continue  # max_tokens cut it: reported as such
        assert completion.finish_reason == "stop"
        jsonschema.validate(json.loads(completion.text), schema)
        stopped += 1
    assert stopped >= 45, f"only {stopped} of 50 outputs ended within 128 tokens"
    assert_no_leak(llm)
