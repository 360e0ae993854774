"""The one place where wire formats meet the engine: gRPC messages and OpenAI JSON in,
``EngineRequest`` out; ``GenerationChunk``s in, responses out; typed errors to status codes.

The gRPC and HTTP layers (cluster/serving/ingress.py) only call these functions, so both
APIs accept the same parameters with the same checks and report errors the same way.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import grpc

from cluster.errors import (
    EngineDeadError,
    InvalidConfigError,
    InvalidRequestError,
    QueueFullError,
    RequestFailedError,
    UnauthenticatedError,
)
from cluster.request_limits import CHAT_ROLES, MAX_REQUEST_ID_CHARS, check_text
from cluster.sampling_params import SamplingParams
from cluster.serving.engine_request import EngineRequest
from cluster.structured_outputs import StructuredOutputs
from cluster.serving.generation_chunk import GenerationChunk
from cluster.v1 import generation_pb2 as pb

# ---- errors -------------------------------------------------------------------------------

def unwrap(err: BaseException) -> BaseException:
    """The user-facing error inside Ray's wrappers (a replica's exception arrives wrapped)."""
    for _ in range(5):
        inner = getattr(err, "cause", None) or getattr(err, "original_exception", None)  # RayTaskError, gRPCStatusError
        if inner is None or inner is err:
            break
        err = inner
    return err


def _is_backpressure(err: BaseException) -> bool:
    return type(err).__name__ == "BackPressureError"  # Serve's max_queued_requests


def _is_unavailable(err: BaseException) -> bool:
    names = {"ActorDiedError", "RayActorError", "ActorUnavailableError", "DeploymentUnavailableError"}
    return isinstance(err, EngineDeadError) or type(err).__name__ in names


def grpc_status(err: BaseException) -> tuple[grpc.StatusCode, str]:
    err = unwrap(err)
    if isinstance(err, (InvalidRequestError, InvalidConfigError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(err)
    if isinstance(err, UnauthenticatedError):
        return grpc.StatusCode.UNAUTHENTICATED, str(err)
    if isinstance(err, QueueFullError) or _is_backpressure(err):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"server busy, retry in {retry_after_s(err):g} s: {err}"
    if _is_unavailable(err):
        return grpc.StatusCode.UNAVAILABLE, f"model unavailable: {err}"
    if isinstance(err, RequestFailedError):
        return grpc.StatusCode.INTERNAL, f"internal error in request {err.request_id}: {err.message}"
    return grpc.StatusCode.INTERNAL, f"internal error: {type(err).__name__}: {err}"


def retry_after_s(err: BaseException) -> float:
    """When a refused request may be retried (the replica's estimate, else one second)."""
    hint = getattr(unwrap(err), "retry_after_s", None)  # Serve's BackPressureError has one, set to None
    return float(hint) if isinstance(hint, (int, float)) and not isinstance(hint, bool) and hint > 0 else 1.0


def grpc_trailers(err: BaseException) -> list[tuple[str, str]]:
    """Trailing metadata for an error: a retry hint in milliseconds for RESOURCE_EXHAUSTED."""
    code, _ = grpc_status(err)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return [("retry-after-ms", str(int(retry_after_s(err) * 1000)))]
    return []


_HTTP = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
         grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.INTERNAL: 500}
_HTTP_KIND = {400: "invalid_request_error", 401: "authentication_error", 413: "invalid_request_error",
              429: "rate_limit_error", 503: "service_unavailable"}


def http_error(err: BaseException) -> tuple[int, dict]:
    """(status, OpenAI-style error body)."""
    code, message = grpc_status(err)
    status = 413 if isinstance(unwrap(err), PayloadTooLargeError) else _HTTP[code]
    field = getattr(unwrap(err), "field", None)
    return status, {"error": {"message": message, "type": _HTTP_KIND.get(status, "internal_error"),
                              "param": field, "code": status}}


def http_error_headers(err: BaseException) -> dict[str, str]:
    """Headers that go with an error status: Retry-After for 429, WWW-Authenticate for 401."""
    code, _ = grpc_status(err)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return {"Retry-After": str(max(1, round(retry_after_s(err))))}
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return {"WWW-Authenticate": "Bearer"}
    return {}


class PayloadTooLargeError(InvalidRequestError):
    """A request body or message above ``max_request_bytes`` (HTTP 413, gRPC INVALID_ARGUMENT)."""

    def __init__(self, size: int, limit: int):
        super().__init__("body", f"is {size} bytes; this server takes at most {limit}")
        self.size, self.limit = size, limit

    def __reduce__(self):
        return PayloadTooLargeError, (self.size, self.limit)


# ---- gRPC in ------------------------------------------------------------------------------

_SAMPLING_FIELDS = ("max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                    "presence_penalty", "frequency_penalty", "seed", "ignore_eos", "logprobs", "skip_special_tokens")


def sampling_from_proto(sampling: pb.SamplingParameters, default_max_tokens: int | None = None) -> SamplingParams:
    kwargs: dict[str, Any] = {}
    for name in _SAMPLING_FIELDS:
        if sampling.HasField(name):
            value = getattr(sampling, name)
            kwargs[name] = round(value, 6) if isinstance(value, float) else value  # float32 on the wire
    if sampling.stop:
        kwargs["stop"] = list(sampling.stop)
    if sampling.stop_token_ids:
        kwargs["stop_token_ids"] = list(sampling.stop_token_ids)
    if "max_tokens" not in kwargs and default_max_tokens is not None:
        kwargs["max_tokens"] = default_max_tokens
    kind = sampling.WhichOneof("structured_output")
    if kind is not None:  # built here, so its errors name the proto field
        value = getattr(sampling, kind)
        if kind == "choice":
            value = list(value.choices)
        if kind == "json_object" and not value:
            raise InvalidRequestError("sampling.json_object", "must be true, or left unset")
        so = {{"json_schema": "json"}.get(kind, kind): value}
        kwargs["structured_outputs"] = StructuredOutputs(**so, origin=f"sampling.{kind}")
    return _params(kwargs, prefix="sampling.")


def request_from_proto(request: pb.GenerateRequest, chat_max_tokens: int) -> EngineRequest:
    check_decoded(request)
    kind = request.WhichOneof("input")
    request_id = _checked_request_id(request.request_id or None)
    if kind is None:
        raise InvalidRequestError("input", "set one of prompt, token_ids or chat")
    if kind == "prompt":
        return EngineRequest(request_id, prompt=check_text("prompt", request.prompt),
                             params=sampling_from_proto(request.sampling))
    if kind == "token_ids":
        return EngineRequest(request_id, prompt_token_ids=list(request.token_ids.ids),
                             params=sampling_from_proto(request.sampling))
    messages = messages_from_proto(request.chat)
    defaulted = not request.sampling.HasField("max_tokens")
    return EngineRequest(request_id, messages=messages, params=sampling_from_proto(request.sampling, chat_max_tokens),
                         max_tokens_is_default=defaulted)


def messages_from_proto(chat: pb.ChatMessages) -> list[dict]:
    if not chat.messages:
        raise InvalidRequestError("chat.messages", "must hold at least one message")
    return [_message(m.role, m.content, f"chat.messages[{i}]") for i, m in enumerate(chat.messages)]


def _message(role: Any, content: Any, field: str) -> dict:
    if not isinstance(role, str) or role not in CHAT_ROLES:
        shown = repr(role[:40]) if isinstance(role, str) else type(role).__name__
        raise InvalidRequestError(f"{field}.role", f"must be one of {', '.join(CHAT_ROLES)}, got {shown}")
    return {"role": role, "content": check_text(f"{field}.content", content, allow_empty=True)}


class UndecodableMessage:
    """What the gRPC server hands a method whose request bytes are not a valid message (bad wire
    format, bad UTF-8 in a string field): the method refuses it as INVALID_ARGUMENT."""

    def __init__(self, type_name: str, error: str):
        self.type_name = type_name
        self.error = error


def safe_deserializer(message_class):
    """A request deserializer that never raises: gRPC would answer UNKNOWN for a raised DecodeError."""
    def deserialize(data: bytes):
        try:
            return message_class.FromString(data)
        except Exception as err:  # noqa: BLE001 - DecodeError, and whatever else bad bytes raise
            return UndecodableMessage(message_class.DESCRIPTOR.full_name, f"{type(err).__name__}: {err}")

    return deserialize


def check_decoded(request: Any) -> None:
    """Raise InvalidRequestError for a request the server could not decode."""
    if isinstance(request, UndecodableMessage):
        raise InvalidRequestError("request", f"is not a valid {request.type_name} message ({request.error})")


# ---- gRPC out -----------------------------------------------------------------------------

_FINISH = {None: pb.FINISH_REASON_UNSPECIFIED, "stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH,
           "abort": pb.FINISH_REASON_ABORT}


def _usage(chunk: GenerationChunk) -> pb.Usage:
    return pb.Usage(prompt_tokens=chunk.prompt_tokens, completion_tokens=chunk.completion_tokens,
                    cached_prompt_tokens=chunk.cached_prompt_tokens)


def _logprobs(chunk: GenerationChunk) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob, top_logprobs=lp.top) for lp in chunk.logprobs]


def stream_message(chunk: GenerationChunk) -> pb.GenerateStreamResponse:
    message = pb.GenerateStreamResponse(request_id=chunk.request_id, text=chunk.text, token_ids=chunk.token_ids,
                                        finish_reason=_FINISH[chunk.finish_reason], logprobs=_logprobs(chunk))
    if chunk.finish_reason is not None:
        message.usage.CopyFrom(_usage(chunk))
    return message


def unary_response(chunks: list[GenerationChunk]) -> pb.GenerateResponse:
    last = chunks[-1]
    return pb.GenerateResponse(
        request_id=last.request_id, text="".join(c.text for c in chunks),
        token_ids=[t for c in chunks for t in c.token_ids], finish_reason=_FINISH[last.finish_reason],
        usage=_usage(last), logprobs=[lp for c in chunks for lp in _logprobs(c)])


def model_info_message(info: dict) -> pb.ModelInfo:
    """The replica's ``model_info()`` as the API's message (keys the message lacks stay internal)."""
    fields = pb.ModelInfo.DESCRIPTOR.fields_by_name
    return pb.ModelInfo(**{key: value for key, value in info.items() if key in fields})


# ---- OpenAI in ----------------------------------------------------------------------------

# Accepted request keys: OpenAI's, plus vLLM's sampling extensions. Anything else is an error.
_OPENAI_SAMPLING = {"max_tokens": "max_tokens", "max_completion_tokens": "max_tokens", "temperature": "temperature",
                    "top_p": "top_p", "seed": "seed", "presence_penalty": "presence_penalty",
                    "frequency_penalty": "frequency_penalty", "stop": "stop", "top_k": "top_k", "min_p": "min_p",
                    "repetition_penalty": "repetition_penalty", "min_tokens": "min_tokens",
                    "ignore_eos": "ignore_eos", "stop_token_ids": "stop_token_ids",
                    "skip_special_tokens": "skip_special_tokens", "n": "n"}
_OPENAI_COMMON = {"model", "stream", "stream_options", "user", "request_id"}
# Structured outputs: OpenAI's response_format, and vLLM's guided_* and structured_outputs.
_OPENAI_STRUCTURED = {"response_format": None, "guided_json": "json", "guided_regex": "regex",
                      "guided_choice": "choice", "guided_grammar": "grammar", "structured_outputs": None}
_UNSUPPORTED = {"logit_bias", "best_of", "echo", "suffix", "tools", "tool_choice", "functions", "function_call",
                "parallel_tool_calls", "audio", "modalities", "prediction"}


def parse_json_body(data: bytes) -> Any:
    """The request body as JSON, or InvalidRequestError("body") (never a 500: not for bad UTF-8,
    numbers of thousands of digits or arrays nested thousands deep)."""
    try:
        return json.loads(data)
    except RecursionError:
        raise InvalidRequestError("body", "is nested too deeply") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, int digit limit
        raise InvalidRequestError("body", f"must be valid JSON: {str(err)[:200]}") from None


def _check_keys(body: Any, allowed: set[str]) -> dict:
    if not isinstance(body, dict):
        raise InvalidRequestError("body", "must be a JSON object")
    for key in body:
        if key in _UNSUPPORTED:
            raise InvalidRequestError(key, "is not supported by this server")
        if key not in allowed:
            raise InvalidRequestError(check_text("body", key, allow_empty=True)[:64], "unknown field")
    for key in ("model", "user"):
        if body.get(key) is not None:
            check_text(key, body[key], allow_empty=True, max_chars=MAX_REQUEST_ID_CHARS)
    return body


def _openai_structured(body: dict) -> StructuredOutputs | None:
    """At most one structured-output field of an OpenAI body, as StructuredOutputs naming it."""
    given = [k for k in _OPENAI_STRUCTURED if body.get(k) is not None]
    if len(given) > 1:
        raise InvalidRequestError(given[1], f"cannot be combined with {given[0]}: one structured output per request")
    if not given:
        return None
    key, value = given[0], body[given[0]]
    if key == "structured_outputs":
        return StructuredOutputs.build(value)
    if key != "response_format":
        return StructuredOutputs(**{_OPENAI_STRUCTURED[key]: value}, origin=key)
    if not isinstance(value, dict):
        raise InvalidRequestError("response_format", f"must be an object, got {type(value).__name__}")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputs(json_object=True, origin="response_format")
    if kind != "json_schema":
        raise InvalidRequestError("response_format.type", f"must be text, json_object or json_schema, got {kind!r:.80}")
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or "schema" not in spec:
        raise InvalidRequestError("response_format.json_schema", "must be an object with a \"schema\"")
    return StructuredOutputs(json=spec["schema"], origin="response_format.json_schema.schema")


def _openai_params(body: dict, extra: dict, default_max_tokens: int | None) -> SamplingParams:
    kwargs = {_OPENAI_SAMPLING[k]: v for k, v in body.items() if k in _OPENAI_SAMPLING and v is not None}
    kwargs.update(extra)
    structured = _openai_structured(body)
    if structured is not None:
        kwargs["structured_outputs"] = structured
    if "max_tokens" not in kwargs and default_max_tokens is not None:
        kwargs["max_tokens"] = default_max_tokens
    if isinstance(kwargs.get("stop"), str):
        kwargs["stop"] = [kwargs["stop"]]
    return _params(kwargs)


def completion_request(body: Any) -> EngineRequest:
    body = _check_keys(body, set(_OPENAI_SAMPLING) | _OPENAI_COMMON | set(_OPENAI_STRUCTURED) | {"prompt", "logprobs"})
    extra = {}
    if body.get("logprobs") is not None:
        extra["logprobs"] = body["logprobs"]
    params = _openai_params(body, extra, None)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # one prompt in a list (batches of prompts are one request each here)
    rid = _request_id(body)
    if isinstance(prompt, str):
        return EngineRequest(rid, prompt=check_text("prompt", prompt), params=params)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return EngineRequest(rid, prompt_token_ids=prompt, params=params)
    raise InvalidRequestError("prompt", "must be a string, a list of token ids, or a list holding one of those")


def chat_request(body: Any, chat_max_tokens: int) -> EngineRequest:
    body = _check_keys(body, set(_OPENAI_SAMPLING) | _OPENAI_COMMON | set(_OPENAI_STRUCTURED)
                       | {"messages", "logprobs", "top_logprobs"})
    extra = {}
    if body.get("logprobs"):
        extra["logprobs"] = body.get("top_logprobs") or 0
    elif body.get("top_logprobs") is not None:
        raise InvalidRequestError("top_logprobs", "needs logprobs: true")
    params = _openai_params(body, extra, chat_max_tokens)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages", "must be a non-empty list of {role, content} objects")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidRequestError(f"messages[{i}]", "must be an object with a string role and content")
        turns.append(_message(m.get("role"), _message_text(m.get("content"), f"messages[{i}].content"),
                              f"messages[{i}]"))
    return EngineRequest(_request_id(body), messages=turns, params=params,
                         max_tokens_is_default=body.get("max_tokens") is None
                         and body.get("max_completion_tokens") is None)


def _message_text(content: Any, field: str) -> str:
    """A message's content: a string, or OpenAI's list of text parts ({"type": "text", "text": ...})."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequestError(field, "only text parts ({'type': 'text', 'text': ...}) are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise InvalidRequestError(field, "must be a string or a non-empty list of text parts")


def wants_stream(body: dict) -> tuple[bool, bool]:
    """(stream, include usage in the stream)."""
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequestError("stream", f"must be a boolean, got {stream!r}")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise InvalidRequestError("stream_options", "must be an object")
    return stream, bool(options.get("include_usage", False))


# ---- OpenAI out ---------------------------------------------------------------------------

def _openai_usage(chunk: GenerationChunk) -> dict:
    return {"prompt_tokens": chunk.prompt_tokens, "completion_tokens": chunk.completion_tokens,
            "total_tokens": chunk.prompt_tokens + chunk.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": chunk.cached_prompt_tokens}}


def _token_text(chunks: list[GenerationChunk]):
    texts = {t: s for c in chunks for t, s in c.token_texts.items()}
    return lambda token_id: texts.get(token_id, "")


def _completion_logprobs(chunks: list[GenerationChunk]) -> dict | None:
    entries, text = [lp for c in chunks for lp in c.logprobs], _token_text(chunks)
    if not entries:
        return None
    return {"tokens": [text(lp.token_id) for lp in entries], "token_logprobs": [lp.logprob for lp in entries],
            "top_logprobs": [{text(t): v for t, v in lp.top.items()} for lp in entries], "text_offset": []}


def completion_response(chunks: list[GenerationChunk], model: str) -> dict:
    last = chunks[-1]
    return {"id": f"cmpl-{last.request_id}", "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": "".join(c.text for c in chunks), "finish_reason": last.finish_reason,
                         "logprobs": _completion_logprobs(chunks)}],
            "usage": _openai_usage(last)}


def chat_response(chunks: list[GenerationChunk], model: str) -> dict:
    last = chunks[-1]
    choice = {"index": 0, "message": {"role": "assistant", "content": "".join(c.text for c in chunks)},
              "finish_reason": last.finish_reason, "logprobs": _chat_logprobs(chunks)}
    return {"id": f"chatcmpl-{last.request_id}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": _openai_usage(last)}


def _chat_logprobs(chunks: list[GenerationChunk]) -> dict | None:
    entries, text = [lp for c in chunks for lp in c.logprobs], _token_text(chunks)
    if not entries:
        return None
    return {"content": [{"token": text(lp.token_id), "logprob": lp.logprob,
                         "top_logprobs": [{"token": text(t), "logprob": v} for t, v in lp.top.items()]}
                        for lp in entries]}


def completion_sse(chunk: GenerationChunk, model: str, created: int) -> str:
    body = {"id": f"cmpl-{chunk.request_id}", "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": chunk.text, "finish_reason": chunk.finish_reason, "logprobs": None}]}
    return sse(body)


def chat_sse(chunk: GenerationChunk, model: str, created: int, first: bool) -> str:
    delta = {"role": "assistant", "content": chunk.text} if first else {"content": chunk.text}
    body = {"id": f"chatcmpl-{chunk.request_id}", "object": "chat.completion.chunk", "created": created,
            "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": chunk.finish_reason,
                                         "logprobs": None}]}
    return sse(body)


def usage_sse(chunk: GenerationChunk, model: str, created: int, chat: bool) -> str:
    prefix, kind = ("chatcmpl", "chat.completion.chunk") if chat else ("cmpl", "text_completion")
    return sse({"id": f"{prefix}-{chunk.request_id}", "object": kind, "created": created, "model": model,
                "choices": [], "usage": _openai_usage(chunk)})


def sse(body: dict | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


def models_response(model: str, max_model_len: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "llm-cluster",
                                        "max_model_len": max_model_len}]}


# ---- helpers ------------------------------------------------------------------------------

def _params(kwargs: dict, prefix: str = "") -> SamplingParams:
    try:
        return SamplingParams(**kwargs)
    except InvalidRequestError as err:
        raise InvalidRequestError(prefix + err.field, err.message) from None


def _request_id(body: dict) -> str:
    return _checked_request_id(body.get("request_id"))


def _checked_request_id(rid: Any) -> str:
    if rid is None:
        return _new_id()
    return check_text("request_id", rid, max_chars=MAX_REQUEST_ID_CHARS)


def _new_id() -> str:
    return uuid.uuid4().hex
