"""The one conversion module: wire formats in, EngineRequest out, errors naming the field."""

from __future__ import annotations

import grpc
import pytest

from cluster.errors import (
    EngineDeadError,
    InvalidRequestError,
    QueueFullError,
    RequestFailedError,
    UnauthenticatedError,
)
from cluster.serving import conversion
from cluster.serving.generation_chunk import GenerationChunk
from cluster.v1 import generation_pb2 as pb


def test_proto_sampling_keeps_only_fields_that_were_set():
    request = pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParameters(temperature=0.7, top_k=5, stop=["\n"]))
    params = conversion.request_from_proto(request, 512).params
    assert params.temperature == 0.7 and params.top_k == 5 and params.stop == ["\n"]
    assert params.max_tokens == 16 and params.top_p == 1.0  # unset: the engine's defaults


def test_proto_inputs_and_chat_default_max_tokens():
    ids = conversion.request_from_proto(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3])), 512)
    assert ids.prompt_token_ids == [1, 2, 3] and ids.routing_tokens() == [1, 2, 3]
    chat = conversion.request_from_proto(pb.GenerateRequest(chat=pb.ChatMessages(
        messages=[pb.ChatMessage(role="user", content="hi")])), 512)
    assert chat.messages == [{"role": "user", "content": "hi"}] and chat.params.max_tokens == 512
    with pytest.raises(InvalidRequestError) as err:
        conversion.request_from_proto(pb.GenerateRequest(), 512)
    assert err.value.field == "input"


def test_proto_errors_are_prefixed_with_the_message_path():
    with pytest.raises(InvalidRequestError) as err:
        conversion.request_from_proto(pb.GenerateRequest(prompt="x", sampling=pb.SamplingParameters(top_p=2)), 1)
    assert err.value.field == "sampling.top_p"


def test_openai_completion_and_chat_requests():
    request = conversion.completion_request({"model": "m", "prompt": ["hi"], "max_tokens": 3, "stop": "\n",
                                             "top_k": 4, "stream": False})
    assert request.prompt == "hi" and request.params.stop == ["\n"] and request.params.top_k == 4
    chat = conversion.chat_request({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                              {"type": "text", "text": "b"}]}],
                                    "max_completion_tokens": 5, "stop": None, "ignore_eos": True}, 512)
    assert chat.messages == [{"role": "user", "content": "ab"}] and chat.params.max_tokens == 5


@pytest.mark.parametrize("body, field", [
    ({"prompt": "hi", "logit_bias": {"1": 2}}, "logit_bias"),
    ({"prompt": "hi", "nonsense": 1}, "nonsense"),
    ({"prompt": 3}, "prompt"),
    ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"prompt": "hi", "n": 2}, "n"),
])
def test_openai_completion_errors_name_the_field(body, field):
    with pytest.raises(InvalidRequestError) as err:
        conversion.completion_request(body)
    assert err.value.field == field


def test_chat_content_parts_other_than_text_are_refused():
    with pytest.raises(InvalidRequestError) as err:
        conversion.chat_request({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 8)
    assert err.value.field == "messages[0].content"


def _backpressure():
    from ray.serve.exceptions import BackPressureError

    return BackPressureError(num_queued_requests=32, max_queued_requests=32)  # its retry_after_s is None


@pytest.mark.parametrize("error, code, status", [
    (InvalidRequestError("top_p", "bad"), grpc.StatusCode.INVALID_ARGUMENT, 400),
    (QueueFullError("full", retry_after_s=7.4), grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    (_backpressure(), grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    (EngineDeadError("dead"), grpc.StatusCode.UNAVAILABLE, 503),
    (RequestFailedError("req-7", "RuntimeError: boom"), grpc.StatusCode.INTERNAL, 500),
    (UnauthenticatedError("no key"), grpc.StatusCode.UNAUTHENTICATED, 401),
    (conversion.PayloadTooLargeError(10, 5), grpc.StatusCode.INVALID_ARGUMENT, 413),
    (RuntimeError("bug"), grpc.StatusCode.INTERNAL, 500),
])
def test_error_mapping(error, code, status):
    assert conversion.grpc_status(error)[0] == code
    assert conversion.http_error(error)[0] == status
    headers, trailers = conversion.http_error_headers(error), dict(conversion.grpc_trailers(error))
    if status == 429:
        assert int(headers["Retry-After"]) >= 1 and int(trailers["retry-after-ms"]) >= 1000
    if isinstance(error, QueueFullError):
        assert headers["Retry-After"] == "7" and trailers["retry-after-ms"] == "7400"
    if isinstance(error, RequestFailedError):
        assert "req-7" in conversion.grpc_status(error)[1]
    if status == 401:
        assert headers["WWW-Authenticate"] == "Bearer"


def test_undecodable_grpc_bytes_become_invalid_argument():
    from cluster.v1 import generation_pb2 as pb

    decode = conversion.safe_deserializer(pb.GenerateRequest)
    good = pb.GenerateRequest(prompt="hi").SerializeToString()
    assert decode(good).prompt == "hi"
    bad_utf8 = b"\x0a\x02\xff\xfe"  # field 1 (prompt), 2 bytes, not UTF-8
    for data in (bad_utf8, b"\xff\xff\xff\xff", b"\x0a\x7f"):
        undecodable = decode(data)
        with pytest.raises(InvalidRequestError) as err:
            conversion.request_from_proto(undecodable, 8)
        assert err.value.field == "request" and "cluster.v1.GenerateRequest" in err.value.message


def test_stream_messages_carry_usage_only_at_the_end():
    middle = GenerationChunk("r", "Hel", [1], prompt_tokens=4, completion_tokens=1)
    last = GenerationChunk("r", "lo", [2], finish_reason="length", prompt_tokens=4, completion_tokens=2,
                           cached_prompt_tokens=0)
    assert not conversion.stream_message(middle).HasField("usage")
    final = conversion.stream_message(last)
    assert final.finish_reason == pb.FINISH_REASON_LENGTH and final.usage.completion_tokens == 2
    whole = conversion.unary_response([middle, last])
    assert whole.text == "Hello" and list(whole.token_ids) == [1, 2]
