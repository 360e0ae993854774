"""The engine's frontend: text in, text out, over an ``EngineCore`` that steps token ids.

``add_request`` validates and tokenizes; ``step()`` runs one core step and turns each request's
new tokens into text (incremental detokenizing), applies stop strings (aborting the request in
the core when one matches) and builds what the caller asked for: cumulative outputs, deltas
(streaming servers), or only the final output. The work per step is per new token: nothing here
copies a request's whole output unless the caller asked for cumulative outputs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cluster.config import EngineConfig, ParallelConfig, cpu_has_native_bfloat16
from cluster.contracts.core_output import CoreOutput
from cluster.contracts.core_request import CoreRequest
from cluster.contracts.runner_output import TokenLogprobs
from cluster.engine.core import EngineCore
from cluster.engine.detokenizer import IncrementalDetokenizer
from cluster.engine.input_processor import InputProcessor, PromptType
from cluster.engine.plan import make_plan, resolve_source
from cluster.engine.sequence import FinishReason
from cluster.engine.stop_checker import find_stop_string, stop_holdback
from cluster.errors import InvalidRequestError, ModelLoadError, QueueFullError
from cluster.outputs import CompletionOutput, RequestOutput, RequestOutputKind
from cluster.parallel.executor import Executor
from cluster.runner.worker_spec import WorkerSpec
from cluster.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _RequestState:
    """Frontend bookkeeping for one live request."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    kind: RequestOutputKind
    arrival_time_s: float = field(default_factory=time.monotonic)
    token_ids: list[int] = field(default_factory=list)  # generated so far
    logprobs: list[TokenLogprobs] | None = None
    metrics: dict = field(default_factory=dict)
    num_cached_tokens: int = 0
    finish_reason: str | None = None
    final_text: str | None = None  # set once finished
    error: str | None = None  # why the request was ended by a fault (finish reason "error")
    sent_tokens: int = 0  # DELTA: what earlier outputs carried
    sent_chars: int = 0

    def __post_init__(self) -> None:
        self.metrics["arrival_time_s"] = self.arrival_time_s


class LLMEngine:
    """Continuous-batching engine for one model replica: the frontend of an in-process core."""

    def __init__(self, config: EngineConfig,
                 executor_factory: Callable[[WorkerSpec, ParallelConfig], Executor] | None = None,
                 core_process: bool = False):
        self.config = config
        self.source, self.arch = resolve_source(config)
        self.tokenizer = _load_tokenizer(self.source.path)
        self.plan = make_plan(config, self.source, self.arch, _tokenizer_eos(self.tokenizer))
        self.max_model_len = self.plan.max_model_len
        self.eos_token_ids = self.plan.eos_token_ids
        self.num_blocks = self.plan.num_blocks
        self.input_processor = InputProcessor(self.tokenizer, self.arch.vocab_size, self.max_model_len,
                                              self.max_num_cached_tokens)
        self._requests: dict[str, _RequestState] = {}
        self._pending_outputs: list[RequestOutput] = []  # aborts to report on the next step
        if core_process:  # the core in a child process: a crash or hang there leaves this process up
            from cluster.engine.core_client import CoreClient

            self.core = CoreClient(config, self.plan)
        else:
            self.core = EngineCore(config, self.plan, executor_factory)
        dtype = config.model.resolved_dtype()
        if dtype == "bfloat16" and config.model.resolved_device() == "cpu" and not cpu_has_native_bfloat16():
            logger.warning("dtype bfloat16 on a CPU that does not compute it natively (no AVX-512/AMX): the "
                           "linears widen it to float32 (the native kernels) or emulate it (slower); everything "
                           "else is emulated; dtype='auto' picks float32")
        logger.info("%s (%s): KV cache of %d blocks x %d tokens = %d tokens; context %d",
                    self.source.name, dtype, self.num_blocks, config.cache.block_size,
                    self.max_num_cached_tokens, self.max_model_len)

    def is_healthy(self) -> bool:
        """False once the core (its process, or a tensor-parallel worker) has died."""
        return self.core.is_healthy()

    # The in-process core's parts, for tests, benchmarks and introspection.
    @property
    def scheduler(self):
        return self.core.scheduler

    @property
    def block_manager(self):
        return self.core.block_manager

    @property
    def executor(self) -> Executor:
        return self.core.executor

    def restart(self) -> list[str]:
        """Rebuild the core's executor (workers, weights, KV cache) and forget every request: the way
        back from a fault no request can be blamed for. Returns the ids of the requests that were lost.
        Raises (and may be called again) if the new executor cannot be built."""
        lost = list(self._requests)
        self._requests.clear()
        self._pending_outputs.clear()
        self.core.restart()
        return lost

    def worker_spec(self) -> WorkerSpec:
        """What each worker needs to build its rank."""
        return self.plan.worker_spec(self.config)

    @property
    def max_num_cached_tokens(self) -> int:
        """How many tokens the KV cache holds in all."""
        return self.plan.max_num_cached_tokens

    @property
    def num_free_blocks(self) -> int:
        return self.core.stats()["num_free_blocks"]

    # ---- requests ---------------------------------------------------------------------------

    def prepare_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None,
                        kind: RequestOutputKind = RequestOutputKind.CUMULATIVE) -> _RequestState:
        """Validate and tokenize without touching engine state (safe off the engine thread)."""
        params = params if params is not None else SamplingParams()
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError("request_id", "must be a non-empty string")
        text, token_ids = self.input_processor.process(prompt, params)
        detok = IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens)
        return _RequestState(request_id, text, token_ids, params, detok, kind,
                             logprobs=[] if params.logprobs is not None else None)

    def add_prepared(self, state: _RequestState) -> None:
        """Queue a prepared request (engine thread only)."""
        rid = state.request_id
        if rid in self._requests:
            raise InvalidRequestError("request_id", f"{rid!r} is already in flight")
        sched = self.config.scheduler
        if sched.max_waiting_requests is not None:
            # Requests not yet running wait in the queue: at most max_waiting_requests beyond a full batch.
            capacity = sched.max_num_seqs + sched.max_waiting_requests
            if len(self._requests) >= capacity:
                raise QueueFullError(f"{len(self._requests)} requests are in the engine, the most it takes "
                                     f"(max_num_seqs + max_waiting_requests = {capacity})")
        self.core.add(CoreRequest(rid, state.prompt_token_ids, state.params, state.arrival_time_s))
        self._requests[rid] = state

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None,
                    kind: RequestOutputKind = RequestOutputKind.CUMULATIVE) -> None:
        """Validate, tokenize and queue a request."""
        self.add_prepared(self.prepare_request(request_id, prompt, params, kind))

    def abort(self, request_id: str) -> bool:
        """Abort a request in any state; its KV blocks are freed at once. False if unknown."""
        state = self._requests.pop(request_id, None)
        if state is None:
            return False
        self.core.abort(request_id)
        state.final_text = state.detokenizer.text
        state.finish_reason = FinishReason.ABORT.value
        state.metrics["finish_time_s"] = time.monotonic()
        self._pending_outputs.append(self._output(state))
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests) or bool(self._pending_outputs) or self.core.has_unfinished_requests()

    # ---- the step loop ----------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one core step; return the outputs of every request that progressed or ended
        (FINAL_ONLY requests: only when they end)."""
        outputs, self._pending_outputs = self._pending_outputs, []
        for core_out in self.core.step():
            state = self._requests.get(core_out.request_id)
            if state is None:  # stopped here already (a stop string, an abort): the core's token is late
                continue
            try:
                out = self._on_core_output(state, core_out)
            except Exception as err:  # noqa: BLE001 - detokenizing / stop checks of one request
                out = self._fail(state, err)
            if out is not None:
                outputs.append(out)
        return outputs

    def _on_core_output(self, state: _RequestState, core_out: CoreOutput) -> RequestOutput | None:
        state.num_cached_tokens = core_out.num_cached_tokens
        if core_out.num_drafted_tokens:
            state.metrics["spec_drafted_tokens"] = core_out.num_drafted_tokens
            state.metrics["spec_accepted_tokens"] = core_out.num_accepted_tokens
        if core_out.error is not None:
            return self._finish(state, core_out.finish_reason, state.detokenizer.text, core_out.error)
        if core_out.new_token_ids:
            state.metrics.setdefault("first_token_time_s", time.monotonic())
            state.token_ids.extend(core_out.new_token_ids)
            if state.logprobs is not None and core_out.new_logprobs:
                state.logprobs.extend(core_out.new_logprobs)
        det = state.detokenizer
        delta = det.add_tokens(core_out.new_token_ids)
        params = state.params
        reason, cut = core_out.finish_reason, None
        if reason != FinishReason.STOP.value and params.stop and len(state.token_ids) >= params.min_tokens:
            longest = max(len(s) for s in params.stop)
            tail_start = det.num_chars - len(delta) - longest + 1
            found = find_stop_string(det.text_slice(tail_start), len(delta), params.stop)
            if found is not None:
                reason, cut = FinishReason.STOP.value, max(0, tail_start) + found
                self.core.abort(state.request_id, FinishReason.STOP)  # the core does not know stop strings
        if reason is None:
            return self._output(state) if state.kind is not RequestOutputKind.FINAL_ONLY else None
        if cut is None and state.token_ids and state.token_ids[-1] in params.stop_token_ids:
            cut = det.num_chars - len(delta)  # like a stop string, a stop token's text is left out
        text = det.text[:cut] if cut is not None else det.text + det.flush()
        return self._finish(state, reason, text)

    def _fail(self, state: _RequestState, error: BaseException) -> RequestOutput:
        """End one request on a frontend fault (logged with its traceback); the core drops it too."""
        logger.error("request %r failed and was ended; the engine goes on", state.request_id, exc_info=error)
        self.core.abort(state.request_id, FinishReason.ERROR)
        return self._finish(state, FinishReason.ERROR.value, state.detokenizer.text,
                            f"{type(error).__name__}: {error}")

    def _finish(self, state: _RequestState, reason: str, text: str, error: str | None = None) -> RequestOutput:
        state.finish_reason, state.final_text, state.error = reason, text, error
        state.metrics["finish_time_s"] = time.monotonic()
        self._requests.pop(state.request_id, None)
        return self._output(state)

    def _visible_text_len(self, state: _RequestState) -> int:
        """How much of the text a caller may see now: a trailing partial stop string is held back."""
        det = state.detokenizer
        stops = state.params.stop
        if not stops:
            return det.num_chars
        longest = max(len(s) for s in stops)
        return det.num_chars - stop_holdback(det.text_slice(det.num_chars - longest), stops)

    def _visible_text(self, state: _RequestState) -> str:
        return state.detokenizer.text[: self._visible_text_len(state)]

    def _output(self, state: _RequestState) -> RequestOutput:
        finished = state.finish_reason is not None
        if state.kind is RequestOutputKind.DELTA:
            if finished:
                text = state.final_text[state.sent_chars:]
                state.sent_chars = len(state.final_text)
            else:
                end = self._visible_text_len(state)
                text = state.detokenizer.text_slice(state.sent_chars, end)
                state.sent_chars = max(state.sent_chars, end)
            token_ids = state.token_ids[state.sent_tokens:]
            logprobs = state.logprobs[state.sent_tokens:] if state.logprobs is not None else None
            state.sent_tokens = len(state.token_ids)
        else:
            text = state.final_text if finished else self._visible_text(state)
            token_ids = list(state.token_ids)
            logprobs = list(state.logprobs) if state.logprobs is not None else None
        completion = CompletionOutput(0, text, token_ids, state.finish_reason, logprobs, len(state.token_ids))
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, [completion], finished,
                             state.num_cached_tokens, dict(state.metrics), state.error)

    # ---- introspection ----------------------------------------------------------------------

    def stats(self) -> dict:
        """Queue lengths, KV usage and prefix-cache counters (for routing and metrics)."""
        return self.core.stats()

    def shutdown(self) -> None:
        self.core.shutdown()


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as err:  # no / broken tokenizer files
        raise ModelLoadError(f"cannot load a tokenizer from {path!r}: {err}") from err


def _tokenizer_eos(tokenizer) -> frozenset[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return frozenset([eos]) if eos is not None else frozenset()
