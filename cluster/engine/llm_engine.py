"""The synchronous engine: add_request / step / abort over scheduler + executor.

One ``step()`` is schedule -> execute -> update: the scheduler picks this
iteration's work, the executor runs it on the tensor-parallel group, and the
engine turns sampled tokens into text, checks stop conditions and frees what
finished.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field, replace

from collections.abc import Callable

from cluster.config import EngineConfig, ParallelConfig
from cluster.engine.block_manager import BlockManager
from cluster.engine.detokenizer import IncrementalDetokenizer
from cluster.engine.input_processor import InputProcessor, PromptType
from cluster.contracts.runner_output import RunnerOutput, TokenLogprobs
from cluster.engine.scheduler import Scheduler
from cluster.contracts.scheduler_output import NewRequest
from cluster.engine.sequence import FinishReason, Sequence
from cluster.engine.stop_checker import StopChecker, stop_holdback
from cluster.engine.fault_isolation import isolate
from cluster.errors import EngineDeadError, InvalidConfigError, InvalidRequestError, ModelLoadError, QueueFullError
from cluster.model.arch import ModelArch
from cluster.model.loader import torch_dtype
from cluster.model.source import resolve_model
from cluster.swiftkv import checkpoint as swiftkv_checkpoint
from cluster.outputs import CompletionOutput, RequestOutput
from cluster.parallel.executor import Executor
from cluster.parallel.executors import create_executor
from cluster.runner.worker_spec import WorkerSpec
from cluster.runner.kv_cache import num_blocks_for
from cluster.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _RequestState:
    """Engine-side bookkeeping for one live request."""

    seq: Sequence
    prompt: str | None
    detokenizer: IncrementalDetokenizer
    logprobs: list[TokenLogprobs] | None
    final_text: str | None = None  # set once finished
    metrics: dict = field(default_factory=dict)
    error: str | None = None  # why the request was ended by a fault (finish reason "error")


class LLMEngine:
    """Continuous-batching engine for one model replica (driver side)."""

    def __init__(self, config: EngineConfig,
                 executor_factory: Callable[[WorkerSpec, ParallelConfig], Executor] | None = None):
        self.config = config
        self.source = resolve_model(config.model.model, config.model.resolved_cache_dir())
        path = swiftkv_checkpoint.resolve(self.source.path, config.model.model, config.model.swiftkv,
                                          config.model.swiftkv_params, config.model.resolved_cache_dir())
        self.source = replace(self.source, path=path)
        self.arch = ModelArch.from_dir(self.source.path)
        if config.model.swiftkv is not None:
            self.arch = self.arch.with_swiftkv(config.model.swiftkv)
        self.tokenizer = _load_tokenizer(self.source.path)
        self.max_model_len = self._max_model_len()
        self.eos_token_ids = frozenset(self.arch.eos_token_ids) | _tokenizer_eos(self.tokenizer)
        dtype = torch_dtype(config.model.dtype)
        self.num_blocks = num_blocks_for(config.cache, self.arch, dtype, config.parallel.tensor_parallel_size)
        self.input_processor = InputProcessor(self.tokenizer, self.arch.vocab_size, self.max_model_len,
                                              self.max_num_cached_tokens)
        # A sequence can never outgrow the whole cache: it would preempt itself forever.
        self.stop_checker = StopChecker(self.eos_token_ids, min(self.max_model_len, self.max_num_cached_tokens))
        self.arch.check_tensor_parallel(config.parallel.tensor_parallel_size)
        self._executor_factory = executor_factory or create_executor
        self._seed_rng = random.Random(config.model.seed)
        self._reset_requests()
        self.executor: Executor = self._executor_factory(self.worker_spec(), config.parallel)
        logger.info("%s (%s): KV cache of %d blocks x %d tokens = %d tokens; context %d",
                    self.source.name, config.model.dtype, self.num_blocks, config.cache.block_size,
                    self.max_num_cached_tokens, self.max_model_len)

    def _reset_requests(self) -> None:
        """Empty scheduler, block manager and request table (at start and on a restart)."""
        cache = self.config.cache
        self.block_manager = BlockManager(self.num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.scheduler = Scheduler(self.config.scheduler, self.block_manager)
        self._requests: dict[str, _RequestState] = {}
        self._unsent: list[NewRequest] = []  # admitted but not yet shown to the workers
        self._pending_outputs: list[RequestOutput] = []  # aborts and failures to report on the next step

    def restart(self) -> list[str]:
        """Rebuild the executor (workers, weights, KV cache) and forget every request: the way back
        from a fault no request can be blamed for. Returns the ids of the requests that were lost.
        Raises (and may be called again) if the new executor cannot be built."""
        lost = list(self._requests)
        try:
            self.executor.shutdown()
        except Exception:  # noqa: BLE001 - the old executor is broken anyway
            logger.exception("shutting down the failed executor")
        self._reset_requests()
        self.executor = self._executor_factory(self.worker_spec(), self.config.parallel)
        return lost

    # ---- set-up -----------------------------------------------------------------------------

    def worker_spec(self) -> WorkerSpec:
        """What each worker needs to build its rank."""
        return WorkerSpec(
            model_path=self.source.path, arch=self.arch, dtype=self.config.model.dtype,
            max_model_len=self.max_model_len, num_blocks=self.num_blocks,
            block_size=self.config.cache.block_size, tp_size=self.config.parallel.tensor_parallel_size,
            eos_token_ids=self.eos_token_ids, device=self.config.model.resolved_device(),
            num_threads=self.config.parallel.num_threads, use_native_kernels=self.config.model.use_native_kernels,
            onednn_cache_capacity=self.config.model.onednn_cache_capacity,
        )

    def _max_model_len(self) -> int:
        limit = self.arch.max_position_embeddings
        asked = self.config.model.max_model_len
        if asked is not None and asked > limit:
            why = " (its sliding_window; full attention is exact only within it)" if self.arch.sliding_window else ""
            raise InvalidConfigError("max_model_len", f"must be <= the model's {limit} positions{why}, got {asked}")
        return asked or limit

    @property
    def max_num_cached_tokens(self) -> int:
        """How many tokens the KV cache holds in all."""
        return self.num_blocks * self.config.cache.block_size

    @property
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    # ---- requests ---------------------------------------------------------------------------

    def prepare_request(self, request_id: str, prompt: PromptType,
                        params: SamplingParams | None = None) -> _RequestState:
        """Validate and tokenize without touching engine state (safe off the engine thread)."""
        params = params if params is not None else SamplingParams()
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError("request_id", "must be a non-empty string")
        text, token_ids = self.input_processor.process(prompt, params)
        seq = Sequence(request_id, token_ids, params)
        detok = IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens)
        logprobs = [] if params.logprobs is not None else None
        return _RequestState(seq, text, detok, logprobs, metrics={"arrival_time_s": seq.arrival_time_s})

    def add_prepared(self, state: _RequestState) -> None:
        """Queue a prepared request (engine thread only)."""
        rid = state.seq.request_id
        if rid in self._requests:
            raise InvalidRequestError("request_id", f"{rid!r} is already in flight")
        sched = self.config.scheduler
        if sched.max_waiting_requests is not None:
            # Requests not yet running wait in the queue: at most max_waiting_requests beyond a full batch.
            capacity = sched.max_num_seqs + sched.max_waiting_requests
            if len(self._requests) >= capacity:
                raise QueueFullError(f"{len(self._requests)} requests are in the engine, the most it takes "
                                     f"(max_num_seqs + max_waiting_requests = {capacity})")
        self._requests[rid] = state
        self.scheduler.add(state.seq)
        seed = state.seq.sampling_params.seed
        self._unsent.append(NewRequest(rid, state.seq.prompt_token_ids, state.seq.sampling_params,
                                       seed if seed is not None else self._seed_rng.getrandbits(63)))

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None) -> None:
        """Validate, tokenize and queue a request."""
        self.add_prepared(self.prepare_request(request_id, prompt, params))

    def abort(self, request_id: str) -> bool:
        """Abort a request in any state; its KV blocks are freed at once. False if unknown."""
        state = self._requests.pop(request_id, None)
        if state is None:
            return False
        self.scheduler.abort(request_id)
        self._unsent = [r for r in self._unsent if r.request_id != request_id]
        state.final_text = state.detokenizer.text
        self._pending_outputs.append(self._output(state, finished=True))
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests) or bool(self._pending_outputs)

    # ---- the step loop ----------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one iteration; return the outputs of every request that progressed or ended."""
        outputs, self._pending_outputs = self._pending_outputs, []
        sched = self.scheduler.schedule()
        if sched.is_empty and not sched.finished_request_ids:
            return outputs
        sched.new_requests, self._unsent = self._unsent, []
        result, failed = self._execute(sched)
        for request_id, error in failed.items():  # before update(): nothing of theirs is committed
            outputs.append(self._fail(request_id, error))
        for seq in self.scheduler.update(sched, result.sampled_token_ids):
            state = self._requests[seq.request_id]
            try:
                outputs.append(self._on_token(state, result))
            except Exception as err:  # noqa: BLE001 - detokenizing / stop checks of one request
                outputs.append(self._fail(seq.request_id, err))
        return outputs

    def _execute(self, sched) -> tuple[RunnerOutput, dict[str, BaseException]]:
        """Run the step; if it raises, pin the fault on the requests that cause it (the others'
        tokens are kept) or, where that is impossible, raise EngineDeadError."""
        try:
            return self.executor.execute(sched), {}
        except Exception as err:
            if isinstance(err, EngineDeadError) or not self.executor.can_rerun_steps:
                raise EngineDeadError(f"a step failed and the executor cannot go on: {err!r}") from err
            isolated = isolate(self.executor.execute, sched, err)
            return isolated.output, isolated.failed

    def _fail(self, request_id: str, error: BaseException) -> RequestOutput | None:
        """End one request with an internal error (logged with its traceback); free its blocks."""
        state = self._requests.get(request_id)
        if state is None:
            return None
        logger.error("request %r failed and was ended; the engine goes on", request_id, exc_info=error)
        state.error = f"{type(error).__name__}: {error}"
        state.final_text = state.detokenizer.text
        self._finish(state, FinishReason.ERROR)
        return self._output(state, finished=True)

    def _on_token(self, state: _RequestState, result: RunnerOutput) -> RequestOutput:
        seq = state.seq
        state.metrics.setdefault("first_token_time_s", time.monotonic())
        if state.logprobs is not None and seq.request_id in result.logprobs:
            state.logprobs.append(result.logprobs[seq.request_id])
        delta = state.detokenizer.add_tokens(seq.output_token_ids[-1:])
        reason, cut = self.stop_checker.check(seq, state.detokenizer.text, len(delta))
        if reason is None:
            return self._output(state, finished=False)
        text = state.detokenizer.text
        if cut is None and seq.output_token_ids[-1] in seq.sampling_params.stop_token_ids:
            cut = len(text) - len(delta)  # like a stop string, a stop token's text is left out
        state.final_text = text[:cut] if cut is not None else text + state.detokenizer.flush()
        self._finish(state, reason)
        return self._output(state, finished=True)

    def _finish(self, state: _RequestState, reason: FinishReason) -> None:
        self.scheduler.finish(state.seq.request_id, reason)
        state.metrics["finish_time_s"] = time.monotonic()
        del self._requests[state.seq.request_id]

    def _output(self, state: _RequestState, finished: bool) -> RequestOutput:
        seq = state.seq
        if state.final_text is not None:
            text = state.final_text
        else:
            text = state.detokenizer.text
            text = text[: len(text) - stop_holdback(text, seq.sampling_params.stop)]
        reason = seq.finish_reason.value if finished and seq.finish_reason else ("abort" if finished else None)
        completion = CompletionOutput(0, text, list(seq.output_token_ids), reason,
                                      list(state.logprobs) if state.logprobs is not None else None)
        return RequestOutput(seq.request_id, state.prompt, seq.prompt_token_ids, [completion], finished,
                             seq.num_cached_tokens, dict(state.metrics), state.error)

    # ---- introspection ----------------------------------------------------------------------

    def stats(self) -> dict:
        """Queue lengths, KV usage and prefix-cache counters (for routing and metrics)."""
        bm = self.block_manager
        return {
            "num_running": self.scheduler.num_running, "num_waiting": self.scheduler.num_waiting,
            "kv_cache_usage": bm.usage, "num_free_blocks": bm.num_free_blocks, "num_blocks": bm.num_blocks,
            "prefix_cache_queries": bm.prefix_cache_queries, "prefix_cache_hits": bm.prefix_cache_hits,
        }

    def shutdown(self) -> None:
        self.executor.shutdown()


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as err:  # no / broken tokenizer files
        raise ModelLoadError(f"cannot load a tokenizer from {path!r}: {err}") from err


def _tokenizer_eos(tokenizer) -> frozenset[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return frozenset([eos]) if eos is not None else frozenset()
