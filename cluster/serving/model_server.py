"""The model-server deployment: each replica owns one engine and its tensor-parallel group.

At tp > 1 the deployment's placement group holds the replica's own bundle first and one
bundle per worker after it; the engine's Ray executor finds that group and places its workers
there, so nothing is reserved twice. The replica streams ``GenerationChunk``s (deltas only) and
reports queue length, KV usage and whether it is serving, for the router and the ingress's health.

Health has two readers. Serve's ``check_health`` replaces the replica, so it fails only when the
engine is beyond repair: stopped for good, or a step hung past ``step_timeout_s``. A busy engine
is healthy: finished steps prove it alive, and the one-token probe runs only while the engine is
idle, so it never waits behind user traffic. ``serving()`` (gRPC Health, HTTP /health, routing
stats) is stricter: it is False while the engine rebuilds itself after a fault.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from cluster.errors import EngineDeadError
from cluster.outputs import RequestOutput, RequestOutputKind
from cluster.sampling_params import SamplingParams
from cluster.serving.config import ServingConfig
from cluster.serving.engine_request import EngineRequest
from cluster.serving.generation_chunk import GenerationChunk
from cluster.serving.metrics import ServerMetrics

if TYPE_CHECKING:  # the engine (and torch) load in the replica, not where the app is built
    from cluster.engine.async_engine import AsyncLLMEngine

logger = logging.getLogger(__name__)

_PROBE = SamplingParams(max_tokens=1, temperature=0.0)


def _replica_id() -> str | None:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a Serve replica
        return None


class ModelServer:
    """One replica: an AsyncLLMEngine, its health, its routing stats."""

    def __init__(self, config: ServingConfig, engine: AsyncLLMEngine | None = None):
        self.config = config
        engine_config = config.engine_config()
        if engine is None:
            from cluster.engine.async_engine import AsyncLLMEngine
            from cluster.engine.llm_engine import LLMEngine

            engine = AsyncLLMEngine(LLMEngine(engine_config, core_process=config.uses_core_process),
                                    stream_messages_per_s=config.stream_messages_per_s)
        self.engine = engine
        # Structured outputs' compiler (xgrammar's import, the vocabulary's token table), built now:
        # built on the first constrained request it held this process's GIL long enough for a
        # routing-stats report to miss and health to read NOT_SERVING once (the fuzz test, cold).
        processor = getattr(getattr(engine, "engine", None), "input_processor", None)
        if processor is not None:
            processor.warm_grammars()
        self.model_name = config.model_name or os.path.basename(engine_config.model.model.rstrip("/"))
        self.metrics = ServerMetrics(self.model_name)
        self.step_timeout_s = engine_config.parallel.step_timeout_s
        self._last_probe_s = time.monotonic()
        self._stop = threading.Event()
        threading.Thread(target=self._probe_loop, name="health-probe", daemon=True).start()

    # ---- requests -------------------------------------------------------------------------

    async def generate(self, request: EngineRequest) -> AsyncIterator[GenerationChunk]:
        """Stream one request's deltas; the engine aborts it (freeing its KV blocks) if we are cancelled."""
        engine = self.engine.engine
        if request.prompt_token_ids is None and request.messages is not None:  # not tokenized by an ingress
            prompt = {"prompt_token_ids": engine.input_processor.chat_token_ids(request.messages)}
        else:
            prompt = request.engine_prompt()
        params = request.params
        if request.max_tokens_is_default and params.max_tokens > engine.max_model_len:
            params = dataclasses.replace(params, max_tokens=engine.max_model_len)
        # closed with us (cancelled or dropped), not whenever the garbage collector reaches it: its
        # close is what aborts the request in the engine
        async with contextlib.aclosing(self.engine.generate(prompt, params, request_id=request.request_id,
                                                            coalesce=True, kind=RequestOutputKind.DELTA)) as outs:
            async for out in outs:
                completion = out.outputs[0]
                chunk = GenerationChunk(
                    request_id=request.request_id, text=completion.text, token_ids=completion.token_ids,
                    logprobs=completion.logprobs or [],
                    finish_reason=completion.finish_reason if out.finished else None,
                    prompt_tokens=len(out.prompt_token_ids), completion_tokens=completion.num_generated_tokens,
                    cached_prompt_tokens=out.num_cached_tokens)
                if chunk.logprobs:
                    ids = {i for lp in chunk.logprobs for i in (lp.token_id, *lp.top)}
                    chunk.token_texts = {i: engine.tokenizer.decode([i]) for i in ids}
                if out.finished:
                    self.metrics.on_finished(out)
                yield chunk

    def tokenize(self, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]:
        return self.engine.engine.input_processor.prompt_token_ids(prompt, messages)

    def tokenizer_files(self) -> dict[str, bytes]:
        """The checkpoint's tokenizer files, so the ingress can tokenize without the model's directory."""
        from cluster.serving.prompt_tokenizer import tokenizer_files

        return tokenizer_files(self.engine.engine.source.path)

    def model_info(self) -> dict:
        engine = self.engine.engine
        processor = engine.input_processor
        return {"model": self.model_name, "max_model_len": engine.max_model_len,
                "tensor_parallel_size": engine.config.parallel.tensor_parallel_size,
                "dtype": engine.config.model.resolved_dtype(), "vocab_size": engine.arch.vocab_size,
                "block_size": engine.config.cache.block_size, "max_cache_tokens": processor.max_cache_tokens}

    def engine_stats(self) -> dict:
        """The engine's counters (block usage, prefix-cache hits), tagged with this replica's id."""
        return {**self.engine.engine.stats(), "replica": _replica_id()}

    def record_routing_stats(self) -> dict:
        """Called by Serve every routing_stats_period_s; read by the prefix-affinity router (load)
        and, through it, by the ingress's health answers (``serving``)."""
        stats = self.engine.engine.stats()
        return {"num_running": stats["num_running"], "num_waiting": stats["num_waiting"],
                "kv_cache_usage": stats["kv_cache_usage"], "serving": self.serving()}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Called by Serve on each replica; the engine-load autoscaling policy reads these."""
        return {k: float(v) for k, v in self.record_routing_stats().items() if k != "serving"}

    # ---- health ---------------------------------------------------------------------------

    def serving(self) -> bool:
        """Whether a request sent now would be served (False while the engine rebuilds itself)."""
        return self._why_unhealthy() is None and self.engine.is_serving

    healthy = serving  # the handle method the ingress falls back on

    async def check_health(self) -> None:
        """Serve's replica health check: raising makes Serve replace this replica, so only an
        engine beyond repair fails it (a busy or restarting one does not)."""
        reason = self._why_unhealthy()
        if reason is not None:
            raise EngineDeadError(f"replica unhealthy: {reason}")

    def _why_unhealthy(self) -> str | None:
        if not self.engine.is_running:
            return self.engine.why_not_serving or "the engine stopped"
        running_for = self.engine.step_running_for_s()
        if running_for > self.step_timeout_s:
            return f"one engine step has run for {running_for:.0f} s (step_timeout_s={self.step_timeout_s:g})"
        return None

    def _probe_loop(self) -> None:
        """Every second refresh the metrics gauges; when the engine has been idle for a probe interval,
        generate one token to prove the model still works. A failed probe restarts the engine."""
        while not self._stop.wait(min(1.0, self.config.health_probe_interval_s)):
            try:
                self.metrics.on_stats(self.engine.engine.stats())
            except Exception:  # noqa: BLE001 - metrics must never take the replica down
                logger.exception("metrics update failed")
            if self._should_probe():
                self._probe()

    def _should_probe(self) -> bool:
        now = time.monotonic()
        idle = self.engine.num_in_flight == 0 and self.engine.is_serving
        recent = max(self._last_probe_s, self.engine.last_step_end_s)
        return idle and now - recent >= self.config.health_probe_interval_s

    def _probe(self) -> None:
        started = time.monotonic()
        self._last_probe_s = started
        try:
            asyncio.run(asyncio.wait_for(self._probe_once(), self.config.health_probe_timeout_s))
        except EngineDeadError:
            return  # restarting already, or stopped: reported by serving() / check_health
        except Exception as err:  # noqa: BLE001 - the model cannot generate: rebuild the engine
            if isinstance(err, asyncio.TimeoutError) and self.engine.last_step_end_s > started:
                return  # traffic arrived behind the probe and the engine is stepping: alive
            logger.error("health probe failed (%r): restarting the engine", err)
            self.engine.request_restart(f"a one-token health probe failed: {err!r}")

    async def _probe_once(self) -> RequestOutput | None:
        last = None
        async for last in self.engine.generate({"prompt_token_ids": [self._probe_token()]}, _PROBE,
                                                request_id=f"health-probe-{uuid.uuid4().hex[:8]}",
                                                bypass_admission=True):
            pass
        return last

    def _probe_token(self) -> int:
        arch = self.engine.engine.arch
        return arch.bos_token_id if arch.bos_token_id is not None else 0

    def __del__(self):
        try:
            self._stop.set()
            self.engine.shutdown()
        except Exception:  # noqa: BLE001 - best effort at teardown
            pass
