"""Structured outputs at the door: the constraint's shape, the three APIs' fields, compile errors
naming the field, and the matcher's masks on the SmolLM2 tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from cluster.errors import InvalidRequestError
from cluster.sampling.grammar import GrammarCompiler, allocate_bitmask, apply_bitmask
from cluster.sampling_params import SamplingParams
from cluster.serving import conversion
from cluster.structured_outputs import StructuredOutputs
from cluster.v1 import generation_pb2 as pb

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


@pytest.mark.parametrize("value, field", [
    ({}, "structured_outputs"),
    ({"regex": "a", "choice": ["b"]}, "structured_outputs"),
    ({"json": "{not json"}, "structured_outputs.json"),
    ({"json": [1, 2]}, "structured_outputs.json"),
    ({"json": {"x": float("nan")}}, "structured_outputs.json"),
    ({"json_object": "yes"}, "structured_outputs.json_object"),
    ({"regex": ""}, "structured_outputs.regex"),
    ({"regex": 5}, "structured_outputs.regex"),
    ({"regex": "\ud800"}, "structured_outputs.regex"),
    ({"choice": []}, "structured_outputs.choice"),
    ({"choice": "yes"}, "structured_outputs.choice"),
    ({"choice": ["a", ""]}, "structured_outputs.choice"),
    ({"choice": ["x"] * 257}, "structured_outputs.choice"),
    ({"grammar": "x" * 70000}, "structured_outputs.grammar"),
    ({"schema": SCHEMA}, "structured_outputs.schema"),
    ({"origin": "x", "regex": "a"}, "structured_outputs.origin"),
    ("json", "structured_outputs"),
])
def test_a_malformed_constraint_is_refused_naming_the_field(value, field):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(structured_outputs=value)
    assert err.value.field == field, err.value


def test_a_constraint_may_not_be_overridden_by_ignore_eos_or_min_tokens():
    for kwargs, field in (({"ignore_eos": True}, "ignore_eos"), ({"min_tokens": 2}, "min_tokens")):
        with pytest.raises(InvalidRequestError) as err:
            SamplingParams(structured_outputs={"choice": ["a"]}, **kwargs)
        assert err.value.field == field


def test_a_schema_keeps_its_property_order_and_text_and_dict_forms_share_a_key():
    as_dict = StructuredOutputs(json={"type": "object", "properties": {"b": {}, "a": {}}})
    as_text = StructuredOutputs(json='{"type": "object", "properties": {"b": {}, "a": {}}}')
    assert as_dict.key == as_text.key == ("json", '{"type":"object","properties":{"b":{},"a":{}}}')
    assert StructuredOutputs(choice=["x", "y"]).key != StructuredOutputs(choice=["y", "x"]).key


def test_grpc_oneof_becomes_the_constraint_and_errors_name_the_proto_field():
    cases = {"json_schema": (json.dumps(SCHEMA), "json"), "regex": ("[0-9]+", "regex"),
             "grammar": ('root ::= "a"', "grammar"), "json_object": (True, "json_object")}
    for name, (value, kind) in cases.items():
        params = conversion.sampling_from_proto(pb.SamplingParameters(**{name: value}))
        assert params.structured_outputs.kind == kind
        assert params.structured_outputs.field_name() == f"sampling.{name}"
    params = conversion.sampling_from_proto(pb.SamplingParameters(choice=pb.Choices(choices=["yes", "no"])))
    assert params.structured_outputs.choice == ("yes", "no")
    assert conversion.sampling_from_proto(pb.SamplingParameters()).structured_outputs is None
    for sampling, field in ((pb.SamplingParameters(json_schema="{"), "sampling.json_schema"),
                            (pb.SamplingParameters(json_object=False), "sampling.json_object"),
                            (pb.SamplingParameters(choice=pb.Choices()), "sampling.choice"),
                            (pb.SamplingParameters(regex="a", ignore_eos=True), "sampling.ignore_eos")):
        with pytest.raises(InvalidRequestError) as err:
            conversion.sampling_from_proto(sampling)
        assert err.value.field == field


def test_openai_fields_become_the_constraint():
    def so(**extra):
        body = {"prompt": "hi", **extra}
        return conversion.completion_request(body).params.structured_outputs

    assert so() is None and so(response_format={"type": "text"}) is None
    assert so(response_format={"type": "json_object"}).kind == "json_object"
    schema = so(response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}})
    assert schema.kind == "json" and json.loads(schema.json) == SCHEMA
    assert schema.field_name() == "response_format.json_schema.schema"
    assert so(guided_json=SCHEMA).kind == "json" and so(guided_regex="a+").regex == "a+"
    assert so(guided_choice=["a", "b"]).choice == ("a", "b") and so(guided_grammar='root ::= "a"').kind == "grammar"
    assert so(structured_outputs={"regex": "b"}).regex == "b"
    chat = conversion.chat_request({"messages": [{"role": "user", "content": "hi"}],
                                    "response_format": {"type": "json_object"}}, 64)
    assert chat.params.structured_outputs.kind == "json_object"


@pytest.mark.parametrize("body, field", [
    ({"response_format": "json"}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": 3}}}, "response_format.json_schema.schema"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"response_format": {"type": "json_object"}, "guided_json": SCHEMA}, "guided_json"),
    ({"structured_outputs": {"regex": "a", "origin": "x"}}, "structured_outputs.origin"),
])
def test_openai_structured_errors_name_the_field(body, field):
    with pytest.raises(InvalidRequestError) as err:
        conversion.completion_request({"prompt": "hi", **body})
    assert err.value.field == field, err.value


@pytest.fixture(scope="module")
def compiler(smollm2_tokenizer):
    return GrammarCompiler(smollm2_tokenizer, 49152, [smollm2_tokenizer.eos_token_id])


@pytest.mark.parametrize("so, field", [
    (StructuredOutputs(json={"type": "objec"}), "structured_outputs.json"),
    (StructuredOutputs(regex="a(b"), "structured_outputs.regex"),
    (StructuredOutputs(grammar="root ::= "), "structured_outputs.grammar"),
    (StructuredOutputs(grammar='start ::= "a"'), "structured_outputs.grammar"),  # no root rule
    (StructuredOutputs(regex="(", origin="guided_regex"), "guided_regex"),
])
def test_a_constraint_that_does_not_compile_names_its_field(compiler, so, field):
    with pytest.raises(InvalidRequestError) as err:
        compiler.compile(so)
    assert err.value.field == field and "must be" in err.value.message and ".cc:" not in err.value.message


def _allowed(compiler, grammar) -> set[int]:
    bitmask = allocate_bitmask(1, 49152)
    grammar.fill_bitmask(bitmask, 0)
    logits = torch.zeros(1, 49152)
    apply_bitmask(logits, bitmask, [0])
    return set(torch.isfinite(logits[0]).nonzero().flatten().tolist())


def test_masks_follow_the_constraint_token_by_token(compiler, smollm2_tokenizer):
    tok, eos = smollm2_tokenizer, smollm2_tokenizer.eos_token_id
    grammar = compiler.matcher(StructuredOutputs(choice=["yes", "no", "yes, \"quoted\"\n"]))
    first = _allowed(compiler, grammar)
    assert tok.encode("yes")[0] in first and tok.encode("no")[0] in first and eos not in first
    assert tok.encode("maybe")[0] not in first
    for t in tok.encode("no"):
        assert grammar.accept(t)
    assert _allowed(compiler, grammar) == {eos}  # complete: only EOS may follow
    assert grammar.accept(eos) and grammar.is_terminated
    quoted = compiler.matcher(StructuredOutputs(choice=["yes, \"quoted\"\n"]))
    assert all(quoted.accept(t) for t in tok.encode("yes, \"quoted\"\n"))
    # Drafts are checked ahead and rolled back: the matcher is where it was.
    regex = compiler.matcher(StructuredOutputs(regex="[0-9]{3}"))
    before = _allowed(compiler, regex)
    ids = tok.encode("12")
    assert all(regex.accept(t) for t in ids)
    regex.rollback(len(ids))
    assert _allowed(compiler, regex) == before
    assert not regex.accept(tok.encode("x")[0])


def test_bitmask_rows_only_touch_the_rows_named(compiler):
    grammar = compiler.matcher(StructuredOutputs(regex="a"))
    bitmask = allocate_bitmask(3, 49152)
    grammar.fill_bitmask(bitmask, 1)
    logits = torch.zeros(3, 49152)
    apply_bitmask(logits, bitmask, [1])
    assert torch.isfinite(logits[0]).all() and torch.isfinite(logits[2]).all()
    assert 0 < int(torch.isfinite(logits[1]).sum()) < 100


def test_a_deeply_nested_schema_is_refused_at_the_door():
    schema = {"type": "string"}
    for _ in range(40):  # 80 dict levels: a 400-level schema took 9.3 s to compile (measured)
        schema = {"type": "object", "properties": {"a": schema}}
    with pytest.raises(InvalidRequestError) as err:
        StructuredOutputs(json=schema)
    assert err.value.field == "structured_outputs.json" and "deep" in err.value.message
    StructuredOutputs(json={"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"}}}})


def test_a_constraint_past_the_compile_budget_is_refused_without_waiting_for_it(compiler):
    import time

    from cluster.errors import QueueFullError

    slow = StructuredOutputs(regex="[^\\x00]{0,65536}", origin="guided_regex")  # ~2 s to compile here
    started = time.monotonic()
    with pytest.raises(InvalidRequestError) as err:
        compiler.check(slow, budget_s=0.2)
    assert err.value.field == "guided_regex" and "too complex" in err.value.message
    assert time.monotonic() - started < 1.5  # answered at the budget, not at the compile's end
    with pytest.raises(QueueFullError):  # the runaway compile still holds the compiler
        compiler.check(StructuredOutputs(regex="[a-c]{2,5}"), budget_s=0.2)
    started = time.monotonic()
    with pytest.raises(InvalidRequestError):  # refused for good, at once
        compiler.check(slow, budget_s=60)
    assert time.monotonic() - started < 0.1
    compiler.check(StructuredOutputs(regex="[a-c]{2,5}"), budget_s=120)  # once the runaway is done
    started = time.monotonic()
    compiler.check(StructuredOutputs(regex="[a-c]{2,5}"), budget_s=0.001)  # cached: no compile
    assert time.monotonic() - started < 0.1
