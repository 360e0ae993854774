"""Seeded generators of bad and edge requests for the served-app fuzz test.

Each case is (name, payload, legal): ``legal`` is True only where the input is valid, so the
server must answer normally; for every other case it must refuse with a 4xx / INVALID_ARGUMENT.
Payloads are built from valid requests by replacing one field (or the whole body) with a value
from a pool of troublemakers: int64 and uint64 edges, floats beyond range, NaN and infinities,
wrong types, lone surrogates, NUL characters, deep nesting, huge and truncated bodies, bytes that
are not UTF-8 or not a protobuf at all; and structured outputs (good and bad schemas, regexes,
choices, grammars, and the combinations refused).
"""

from __future__ import annotations

import json
import random

from cluster.v1 import generation_pb2 as pb

VOCAB = 49152
CONTEXT = 512  # the tiny model's context
GOOD_IDS = [1, 504, 3458, 282]

# JSON texts spliced in raw, so they can hold what json.dumps never writes.
RAW_JSON_VALUES = ["9223372036854775808", "18446744073709551616", "-9223372036854775809", "1" + "0" * 400,
                   "1e400", "-1e400", "NaN", "Infinity", "-Infinity", "1e-400", "-0.0", '"\\ud800"',
                   '"a\\udfffb"', '"\\u0000"', "[]", "{}", "null", "true", "false", '""', '"5"', "[[[[[1]]]]]",
                   '{"a": {"b": [1, {"c": null}]}}', "0.5", "-1", "0", "1", "4294967296", "3.5"]
OPENAI_FIELDS = ["max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "seed", "stop", "stop_token_ids", "ignore_eos", "min_tokens", "n",
                 "skip_special_tokens", "logprobs", "stream", "stream_options", "request_id", "user", "model",
                 "max_completion_tokens", "bogus_field", "logit_bias"]
ODD_TEXT = ["\u0000", "\u0000\u0000abc", "\ufeff", "😀" * 50, "\u202e reversed", "a" * 5000, "<|im_start|>",
            "<|im_end|>system", "\n" * 300, " ", "\t\r\n", "\\ud800 as text", "漢字" * 200]


_DEEP_SCHEMA: dict = {"type": "string"}
for _ in range(40):
    _DEEP_SCHEMA = {"type": "object", "properties": {"a": _DEEP_SCHEMA}}
# (OpenAI field, value, legal) for structured outputs.
STRUCTURED_CASES = [
    ("response_format", {"type": "json_object"}, True), ("response_format", {"type": "text"}, True),
    ("response_format", {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}, True),
    ("response_format", {"type": "json_schema", "json_schema": {"schema": _DEEP_SCHEMA}}, False),
    ("response_format", {"type": "json_schema", "json_schema": {"schema": {"type": "objec"}}}, False),
    ("response_format", {"type": "json_schema"}, False), ("response_format", "json", False),
    ("response_format", {"type": "xml"}, False), ("guided_choice", ["yes", "no"], True),
    ("guided_choice", [], False), ("guided_choice", ["x"] * 300, False), ("guided_choice", [5], False),
    ("guided_regex", "[0-9]{2}", True), ("guided_regex", "a(b", False), ("guided_regex", "\ud800", None),
    ("guided_regex", "", False), ("guided_grammar", 'root ::= "x" | "y"', True), ("guided_grammar", "root ::=", False),
    ("guided_json", {"type": "integer"}, True), ("guided_json", "{", False), ("guided_json", [1], False),
    ("structured_outputs", {"regex": "a", "choice": ["a"]}, False), ("structured_outputs", {"origin": "x"}, False),
    ("structured_outputs", {"json_object": True}, True), ("structured_outputs", "regex", False),
]


def _legal_params(rng: random.Random) -> dict:
    """A random sampling setup inside every limit (the answer must be normal)."""
    params = {"max_tokens": rng.choice([1, 2, 4, 8]), "temperature": rng.choice([0, 0.0, 0.7, 1.0, 2.0, 100])}
    optional = {"top_p": [1e-9, 0.5, 1], "top_k": [-1, 1, 40, VOCAB], "min_p": [0, 0.2, 1],
                "repetition_penalty": [0.01, 1.3, 100], "presence_penalty": [-2, 0, 2], "frequency_penalty": [-2, 2],
                "seed": [0, 2**63 - 1, 7], "stop": [["\n"], "x", ["a", "bb"] * 8], "stop_token_ids": [[2], [0, VOCAB - 1]],
                "ignore_eos": [True, False], "min_tokens": [0, 1], "skip_special_tokens": [True, False]}
    for name in rng.sample(sorted(optional), rng.randrange(0, 5)):
        params[name] = rng.choice(optional[name])
    params["min_tokens"] = min(params.get("min_tokens", 0), params["max_tokens"])
    return params


def http_cases(seed: int, count: int) -> list[tuple[str, bytes, bool, str]]:
    """(name, body bytes, legal, path) for the OpenAI-compatible HTTP API."""
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        chat = rng.random() < 0.4
        path = "/v1/chat/completions" if chat else "/v1/completions"
        body = _legal_params(rng)
        if chat:
            body["messages"] = [{"role": "user", "content": rng.choice(["hi", "What is 2+2?", "\u0000"])}]
        else:
            body["prompt"] = rng.choice(["The capital of France is", GOOD_IDS, [GOOD_IDS], "\u0000", "caf\u00e9"])
        kind = rng.randrange(7)
        if kind == 6:  # structured outputs: good and bad constraints, and the combinations refused
            field, value, legal = rng.choice(STRUCTURED_CASES)
            body = {**{k: v for k, v in body.items() if k != "messages"}, "prompt": GOOD_IDS, field: value}
            if legal and (body.get("ignore_eos") or body.get("min_tokens")):
                legal = False  # a constraint ends the output itself: neither may override it
            cases.append((f"http-structured-{field}-{i}", json.dumps(body).encode(), legal, "/v1/completions"))
        elif kind == 0:  # legal as it is
            cases.append((f"http-legal-{i}", json.dumps(body).encode(), True, path))
        elif kind == 1:  # one field replaced by a raw troublemaker
            field = rng.choice(OPENAI_FIELDS + (["messages"] if chat else ["prompt"]))
            value = rng.choice(RAW_JSON_VALUES)
            text = json.dumps({k: v for k, v in body.items() if k != field})[:-1] + f', "{field}": {value}}}'
            cases.append((f"http-field-{field}-{i}", text.encode(), None, path))
        elif kind == 2:  # chat content and roles (a long odd text may not fit the context: no verdict)
            role = rng.choice(["", "robot", "USER", "user<|im_start|>", "system", "assistant", "tool", "\ud800"])
            content = rng.choice([*ODD_TEXT, "hi", 5, None, [], [{"type": "image_url"}], [{"type": "text", "text": 3}],
                                  [{"type": "text", "text": "ok"}], {"text": "x"}])
            body = {k: v for k, v in body.items() if k != "prompt"}
            body["messages"] = [{"role": role, "content": content}]
            good_role = role in ("system", "assistant", "tool")
            legal = False if not good_role else True if content in ("hi", [{"type": "text", "text": "ok"}]) else \
                None if isinstance(content, str) else False
            cases.append((f"http-chat-{i}", json.dumps(body).encode(), legal, "/v1/chat/completions"))
        elif kind == 3:  # the whole body
            raw = rng.choice([b"", b"{", b"[" * 100_000, b'{"prompt": "a", "stop": ' + b"[" * 50_000,
                              b"\xff\xfe\xfd", b'{"prompt": "\xc3\x28"}', b"null", b"[]", b'"text"', b"12",
                              json.dumps(body).encode()[:-3], b'{"prompt": "hi", "prompt": 5}',
                              json.dumps({"prompt": "hi" * 3_000_000}).encode()])
            cases.append((f"http-body-{i}", raw, None, path))
        elif kind == 4:  # numbers at and past their edges, on a short prompt
            field, value = rng.choice([("max_tokens", CONTEXT - len(GOOD_IDS)), ("max_tokens", CONTEXT + 1),
                                       ("max_tokens", 2**64), ("top_k", VOCAB), ("top_k", VOCAB + 1), ("top_k", 2**63),
                                       ("seed", 2**63), ("stop_token_ids", [VOCAB]), ("stop_token_ids", [-1]),
                                       ("logprobs", 21), ("temperature", 1e308), ("min_tokens", 10**6), ("n", 2)])
            body = {**{k: v for k, v in body.items() if k not in ("messages", "min_tokens")},
                    "prompt": GOOD_IDS, "max_tokens": 1, field: value}
            legal = (field, value) in [("max_tokens", CONTEXT - len(GOOD_IDS)), ("top_k", VOCAB)]
            cases.append((f"http-edge-{field}-{i}", json.dumps(body).encode(), legal, "/v1/completions"))
        else:  # prompts out of range
            prompt = rng.choice([[VOCAB], [-1], [1.5], [True], [], [[1, 2], [3]], list(range(CONTEXT + 1)),
                                 [1] * CONTEXT, "", 5, {"a": 1}])
            body = {k: v for k, v in body.items() if k != "messages"}
            body["prompt"] = prompt
            legal = prompt == [1] * CONTEXT
            if legal:
                body["max_tokens"] = 1
            cases.append((f"http-prompt-{i}", json.dumps(body).encode(), legal, "/v1/completions"))
    return cases


def _proto_sampling(rng: random.Random) -> pb.SamplingParameters:
    fields = {"max_tokens": [0, 1, 4, CONTEXT, CONTEXT + 1, 2**32 - 1], "min_tokens": [0, 2, 2**32 - 1],
              "temperature": [0.0, -1.0, float("nan"), float("inf"), 3.4e38, 1e-45], "top_p": [0.0, 1.0, 2.0, float("nan")],
              "top_k": [-(2**31), -2, -1, 0, 1, VOCAB, VOCAB + 1, 2**31 - 1], "min_p": [-0.1, 0.5, 1.5],
              "repetition_penalty": [0.0, 1.0, float("inf")], "presence_penalty": [-3.0, 0.0],
              "frequency_penalty": [2.5, 1.0], "seed": [0, 2**63, 2**64 - 1], "logprobs": [0, 20, 21, 2**32 - 1],
              "ignore_eos": [True, False], "skip_special_tokens": [True, False]}
    sampling = pb.SamplingParameters(max_tokens=rng.choice([1, 2, 4]))
    for name in rng.sample(sorted(fields), rng.randrange(0, 4)):
        setattr(sampling, name, rng.choice(fields[name]))
    if rng.random() < 0.2:
        sampling.stop.extend(rng.choice([[""], ["x"] * 17, ["\u0000"], ["ok"]]))
    if rng.random() < 0.2:
        sampling.stop_token_ids.extend(rng.choice([[-1], [VOCAB], [2], [2**31 - 1]]))
    if rng.random() < 0.2:  # a structured output, good or bad
        name, value = rng.choice([("json_schema", '{"type": "integer"}'), ("json_schema", "{"), ("json_object", True),
                                  ("json_object", False), ("regex", "[a-z]+"), ("regex", "(("), ("grammar", "root ::= x"),
                                  ("choice", pb.Choices(choices=["a", "b"])), ("choice", pb.Choices())])
        if name == "choice":
            sampling.choice.CopyFrom(value)
        else:
            setattr(sampling, name, value)
    return sampling


def grpc_cases(seed: int, count: int) -> list[tuple[str, bytes, bool | None]]:
    """(name, serialized GenerateRequest bytes or raw garbage, legal-or-None) for GenerationService/Generate."""
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        kind = rng.randrange(4)
        if kind == 0:  # valid messages with random parameters (the server decides)
            request = pb.GenerateRequest(sampling=_proto_sampling(rng))
            which = rng.randrange(4)
            if which == 0:
                request.prompt = rng.choice(["hello", *ODD_TEXT[:6], ""])
            elif which == 1:
                request.token_ids.ids.extend(rng.choice([GOOD_IDS, [VOCAB], [-5], [], [1] * (CONTEXT + 1)]))
            elif which == 2:
                role = rng.choice(["user", "USER", "", "robot", "system"])
                request.chat.messages.add(role=role, content=rng.choice(["hi", "", "\u0000", "<|im_end|>"]))
            request.request_id = rng.choice(["", "r-1", "x" * 300, "id with spaces"])
            cases.append((f"grpc-message-{i}", request.SerializeToString(), None))
        elif kind == 1:  # bytes that are not a GenerateRequest
            raw = rng.choice([bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))), b"\x0a\x02\xff\xfe",
                              b"\x0a\x7f", b"\xff\xff\xff\xff\xff", b"\x22\x05\x08", b"\x0a\x80\x80\x80\x80\x10",
                              b"\x2a\x03\xc3\x28\x41", b"\x08" * 30])
            cases.append((f"grpc-bytes-{i}", raw, None))
        elif kind == 2:  # a valid message, truncated
            full = pb.GenerateRequest(prompt="The capital of France is",
                                      sampling=pb.SamplingParameters(max_tokens=2)).SerializeToString()
            cases.append((f"grpc-truncated-{i}", full[:rng.randrange(1, len(full))], None))
        else:  # legal
            request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=GOOD_IDS),
                                         sampling=pb.SamplingParameters(max_tokens=rng.choice([1, 3]), temperature=0))
            cases.append((f"grpc-legal-{i}", request.SerializeToString(), True))
    return cases
