"""The ingress deployment: the gRPC service (through Serve's gRPC proxy) and the OpenAI-style
HTTP API (through Serve's HTTP proxy), both thin layers over ``cluster/serving/conversion.py``.

It holds no model: every request becomes an ``EngineRequest``, is tokenized here (the tokenizer
files come from a replica once; ``cluster/serving/prompt_tokenizer.py``) and goes to the
model-server deployment through its handle, so the prefix-affinity router sees its token ids.
Cancellation propagates: when a gRPC stream is cancelled, its deadline passes or an HTTP client
disconnects, Serve cancels this call, this call cancels its replica call (itself, not only through
Serve's recursive cancellation), and the engine aborts the request and frees its KV blocks.
"""


import asyncio
import contextlib
import importlib
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from grpc_health.v1 import health_pb2
from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.errors import QueueFullError
from cluster.serving import conversion
from cluster.serving.auth import ApiKeyAuth
from cluster.serving.config import ServingConfig
from cluster.serving.engine_request import EngineRequest
from cluster.serving.generation_chunk import GenerationChunk
from cluster.serving.prompt_tokenizer import PromptTokenizer, SharedTokenizer
from cluster.v1 import generation_pb2 as pb

logger = logging.getLogger(__name__)
MODEL_SERVER = "ModelServer"  # the model-server deployment's name (cluster/serving/app.py)
_HEALTH_CALL_TIMEOUT_S = 0.8  # health answers within 1 s even when it must ask a replica
_DRAIN_FACTOR = 16  # an oversized body up to this many times the limit is read (and dropped) to answer 413
_TOKENIZER_RETRY_S = 5.0  # after a failed fetch of the tokenizer, requests go untokenized this long


def _num_serving(app_name: str) -> int | None:
    """Serving model-server replicas, from the board the routers of this process keep. Looked up
    in the imported module at call time: Serve ships this class to its replica by value, and a
    board captured with it would be a copy the routers never write to."""
    return importlib.import_module("cluster.serving.router").ReplicaBoard.num_serving(app_name, MODEL_SERVER)


def _fail(grpc_context, err: BaseException):
    code, message = conversion.grpc_status(err)
    if grpc_context is not None:
        grpc_context.set_code(code)
        grpc_context.set_details(message)
        trailers = conversion.grpc_trailers(err)
        if trailers:
            grpc_context.set_trailing_metadata(list(grpc_context.trailing_metadata() or []) + trailers)
    raise err


def _http_error(err: BaseException) -> JSONResponse:
    status, body = conversion.http_error(err)
    return JSONResponse(body, status_code=status, headers=conversion.http_error_headers(err))


http_app = FastAPI(title="llm-cluster", description="OpenAI-compatible completions over llm-cluster")


@serve.ingress(http_app)
class Ingress:
    def __init__(self, model_server: DeploymentHandle, config: ServingConfig):
        self.server = model_server
        self.config = config
        self.auth = ApiKeyAuth.from_sources(config.api_key_file, config.api_key_env)
        scheduler = config.engine_config().scheduler
        self.replica_capacity = scheduler.max_num_seqs + scheduler.max_waiting_requests  # what one engine admits
        self._in_flight = 0  # generate calls this ingress has open to the model servers
        self._info: dict | None = None
        self._tokenizer = SharedTokenizer(self._fetch_tokenizer, _TOKENIZER_RETRY_S)

    async def _model_info(self) -> dict:
        if self._info is None:
            self._info = await self.server.model_info.remote()
        return self._info

    async def _fetch_tokenizer(self) -> PromptTokenizer:
        # One call after the other: awaited together (asyncio.gather), model_info never reached
        # the replica and the request hung (Ray Serve 2.60, measured).
        info = await self._model_info()
        files = await self.server.tokenizer_files.remote()
        return await asyncio.to_thread(PromptTokenizer.from_files, files, info, True)

    async def _tokenized(self, request: EngineRequest) -> EngineRequest:
        if request.prompt_token_ids is not None:
            return request
        tokenizer = await self._tokenizer.get()
        return request if tokenizer is None else tokenizer.tokenize(request)

    async def _stream(self, request: EngineRequest) -> AsyncIterator[GenerationChunk]:
        """The replica's chunks, admitted here first: when the serving replicas' engines are full
        with this ingress's own calls alone, a new request is refused without a round trip (the
        replica, which sees every caller, stays the authority)."""
        self._admit()
        request = await self._tokenized(request)
        self._in_flight += 1
        responses = self.server.options(stream=True).generate.remote(request)
        try:
            async for chunk in responses:
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            # Our caller went away (a client cancelled or disconnected): cancel the replica call
            # here rather than trust Serve's recursive cancellation alone (Ray 2.60 cancels a child
            # still awaiting assignment from outside the router's event loop, and an assigned one
            # through Ray's recursive task cancellation). Once, 10 of 100 cancelled streams ran
            # on to max_tokens with nobody listening.
            try:
                responses.cancel()
            except Exception:  # noqa: BLE001 - best effort; the caller's own cancellation goes on
                logger.warning("cancelling an abandoned model-server call failed", exc_info=True)
            raise
        finally:
            self._in_flight -= 1

    def _admit(self) -> None:
        serving = _num_serving(self.config.app_name)
        if serving is None and self.config.autoscaling is None:  # no replica has reported yet
            serving = self.config.num_replicas
        if serving and self._in_flight >= serving * self.replica_capacity:
            raise QueueFullError(f"{self._in_flight} requests are in flight to {serving} replica(s) taking "
                                 f"{self.replica_capacity} each", retry_after_s=1.0)

    async def _collect(self, request: EngineRequest) -> list[GenerationChunk]:
        return [chunk async for chunk in self._stream(request)]

    def _grpc_request(self, request, grpc_context):
        """Authenticate a gRPC call and check its message decoded and fits the size limit."""
        if grpc_context is not None:
            self.auth.check(grpc_context.invocation_metadata() or [])
        conversion.check_decoded(request)
        size = request.ByteSize()
        if size > self.config.max_request_bytes:
            raise conversion.PayloadTooLargeError(size, self.config.max_request_bytes)
        return request

    # ---- gRPC: cluster.v1.GenerationService ----------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, grpc_context=None) -> pb.GenerateResponse:
        try:
            self._grpc_request(request, grpc_context)
            engine_request = conversion.request_from_proto(request, self.config.chat_max_tokens)
            return conversion.unary_response(await self._collect(engine_request))
        except Exception as err:
            _fail(grpc_context, err)

    async def GenerateStream(self, request: pb.GenerateRequest, grpc_context=None):
        try:
            self._grpc_request(request, grpc_context)
            engine_request = conversion.request_from_proto(request, self.config.chat_max_tokens)
            async with contextlib.aclosing(self._stream(engine_request)) as chunks:
                async for chunk in chunks:  # closed with this call, so the replica call is cancelled
                    yield conversion.stream_message(chunk)
        except Exception as err:
            _fail(grpc_context, err)

    async def Tokenize(self, request: pb.TokenizeRequest, grpc_context=None) -> pb.TokenizeResponse:
        try:
            self._grpc_request(request, grpc_context)
            kind = request.WhichOneof("input")
            if kind is None:
                raise conversion.InvalidRequestError("input", "set one of prompt or chat")
            if kind == "chat":
                prompt, messages = None, conversion.messages_from_proto(request.chat)
            else:
                prompt, messages = conversion.check_text("prompt", request.prompt), None
            tokenizer = await self._tokenizer.get()
            ids = tokenizer.token_ids(prompt, messages) if tokenizer is not None else \
                await self.server.tokenize.remote(prompt=prompt, messages=messages)
            return pb.TokenizeResponse(token_ids=ids, count=len(ids))
        except Exception as err:
            _fail(grpc_context, err)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, grpc_context=None) -> pb.ModelInfo:
        try:
            self._grpc_request(request, grpc_context)
            return conversion.model_info_message(await self._model_info())
        except Exception as err:
            _fail(grpc_context, err)

    # ---- gRPC: grpc.health.v1.Health -------------------------------------------------------

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context=None) -> health_pb2.HealthCheckResponse:
        """SERVING while some model-server replica is serving; answered at once, in every state."""
        serving = await self._serving()
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)

    async def _serving(self) -> bool:
        """From what the router last heard from the replicas (no call that could queue behind traffic
        or wait for a replacement); before the router has heard anything, ask one replica, briefly."""
        num = _num_serving(self.config.app_name)
        if num is not None:
            return num > 0
        try:
            return bool(await asyncio.wait_for(self.server.healthy.remote(), _HEALTH_CALL_TIMEOUT_S))
        except Exception:  # noqa: BLE001 - no replica answers in time: not serving
            return False

    # ---- HTTP: OpenAI-compatible -----------------------------------------------------------

    @http_app.get("/v1/models")
    async def models(self, request: Request):
        try:
            self.auth.check(request.headers.items())
            info = await self._model_info()
        except Exception as err:
            return _http_error(err)
        return conversion.models_response(info["model"], info["max_model_len"])

    @http_app.get("/health")
    async def health(self):
        healthy = await self._serving()
        return JSONResponse({"healthy": healthy}, status_code=200 if healthy else 503)

    @http_app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._openai(request, chat=False)

    @http_app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._openai(request, chat=True)

    async def _read_json(self, request: Request):
        """The body as JSON. One larger than ``max_request_bytes`` is refused (413) without being kept:
        it is read to its end and dropped, so the client, still sending, gets the answer, unless it
        declares or sends more than _DRAIN_FACTOR times the limit (then the connection just closes)."""
        limit = self.config.max_request_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > _DRAIN_FACTOR * limit:
            raise conversion.PayloadTooLargeError(int(declared), limit)
        data, size = bytearray(), 0
        async for piece in request.stream():
            size += len(piece)
            if size > _DRAIN_FACTOR * limit:
                break
            if size <= limit:
                data += piece
        if size > limit:
            raise conversion.PayloadTooLargeError(size, limit)
        return conversion.parse_json_body(bytes(data))

    async def _openai(self, request: Request, chat: bool):
        try:
            self.auth.check(request.headers.items())
            body = await self._read_json(request)
            engine_request = (conversion.chat_request(body, self.config.chat_max_tokens) if chat
                              else conversion.completion_request(body))
            stream, include_usage = conversion.wants_stream(body)
            model = (await self._model_info())["model"]
            if stream:
                chunks = self._stream(engine_request)
                first = await chunks.__anext__()  # errors (bad prompt, queue full) surface as a status code
                return StreamingResponse(self._sse(first, chunks, model, chat, include_usage),
                                         media_type="text/event-stream")
            collected = await self._collect(engine_request)
            return conversion.chat_response(collected, model) if chat else \
                conversion.completion_response(collected, model)
        except Exception as err:
            return _http_error(err)
    async def _sse(self, first: GenerationChunk, rest, model: str, chat: bool, include_usage: bool):
        created, last = int(time.time()), first
        try:
            yield conversion.chat_sse(first, model, created, True) if chat else \
                conversion.completion_sse(first, model, created)
            async for chunk in rest:
                last = chunk
                yield conversion.chat_sse(chunk, model, created, False) if chat else \
                    conversion.completion_sse(chunk, model, created)
            if include_usage:
                yield conversion.usage_sse(last, model, created, chat)
        except Exception as err:  # the stream has started: report in-band, as OpenAI does
            yield conversion.sse(conversion.http_error(err)[1])
        finally:
            await rest.aclose()  # a client gone mid-stream: the replica call is cancelled now
        yield conversion.sse("[DONE]")
