"""The engine core: scheduler + block manager + executor, stepping token ids.

It knows no text. It takes validated ``CoreRequest``s, runs schedule -> execute -> update, ends
requests on token-level conditions (EOS, a stop token, max_tokens, the context) and returns per
step only what is new for each request (``CoreOutput``). Detokenizing, stop strings and building
what callers see are the frontend's (``LLMEngine``); a request the frontend stops (a stop string,
a cancelled caller) is aborted here without an output.

A fault inside a step is pinned on the requests that cause it where the executor allows (they
end with finish reason "error", the others go on); otherwise the step raises ``EngineDeadError``
and the frontend rebuilds the core with ``restart()``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

from cluster.config import EngineConfig, ParallelConfig
from cluster.contracts.core_output import CoreOutput
from cluster.contracts.core_request import CoreRequest
from cluster.contracts.runner_output import RunnerOutput
from cluster.contracts.scheduler_output import NewRequest
from cluster.engine.block_manager import BlockManager
from cluster.engine.fault_isolation import isolate
from cluster.engine.plan import EnginePlan
from cluster.engine.scheduler import Scheduler
from cluster.engine.sequence import FinishReason, Sequence
from cluster.engine.stop_checker import StopChecker
from cluster.errors import EngineDeadError, InvalidRequestError
from cluster.parallel.executor import Executor
from cluster.spec.proposer import Proposer
from cluster.runner.worker_spec import WorkerSpec

logger = logging.getLogger(__name__)


class EngineCore:
    """Continuous batching over token ids for one model replica."""

    def __init__(self, config: EngineConfig, plan: EnginePlan,
                 executor_factory: Callable[[WorkerSpec, ParallelConfig], Executor] | None = None):
        self.config = config
        self.plan = plan
        # A sequence can never outgrow the whole cache: it would preempt itself forever.
        self.stop_checker = StopChecker(plan.eos_token_ids, min(plan.max_model_len, plan.max_num_cached_tokens))
        if executor_factory is None:
            from cluster.parallel.executors import create_executor as executor_factory
        self._executor_factory = executor_factory
        self._seed_rng = random.Random(config.model.seed)
        self.proposer = Proposer(config.speculative) if config.speculative is not None else None
        self._reset_requests()
        self.executor: Executor = self._executor_factory(plan.worker_spec(config), config.parallel)

    def _reset_requests(self) -> None:
        """Empty scheduler, block manager and request table (at start and on a restart)."""
        cache = self.config.cache
        self.block_manager = BlockManager(self.plan.num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.scheduler = Scheduler(self.config.scheduler, self.block_manager)
        self._requests: dict[str, Sequence] = {}
        self._unsent: list[NewRequest] = []  # admitted but not yet shown to the workers
        self._pending: list[CoreOutput] = []  # requests ended outside a step, reported on the next one
        if self.proposer is not None:
            self.proposer.reset()

    def restart(self) -> list[str]:
        """Rebuild the executor (workers, weights, KV cache) and forget every request. Returns the
        ids of the requests that were lost. Raises (and may be called again) if it cannot be built."""
        lost = list(self._requests)
        try:
            self.executor.shutdown()
        except Exception:  # noqa: BLE001 - the old executor is broken anyway
            logger.exception("shutting down the failed executor")
        self._reset_requests()
        self.executor = self._executor_factory(self.plan.worker_spec(self.config), self.config.parallel)
        return lost

    def is_healthy(self) -> bool:
        return self.executor.is_healthy()

    # ---- requests ---------------------------------------------------------------------------

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    def add(self, request: CoreRequest) -> None:
        rid = request.request_id
        if rid in self._requests:
            raise InvalidRequestError("request_id", f"{rid!r} is already in flight")
        seq = Sequence(rid, request.prompt_token_ids, request.sampling_params, arrival_time_s=request.arrival_time_s)
        self._requests[rid] = seq
        self.scheduler.add(seq)
        seed = request.sampling_params.seed
        self._unsent.append(NewRequest(rid, request.prompt_token_ids, request.sampling_params,
                                       seed if seed is not None else self._seed_rng.getrandbits(63)))

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> bool:
        """End a request in any state (its KV blocks are freed at once), without an output. False if unknown."""
        if self._requests.pop(request_id, None) is None:
            return False
        self.scheduler.finish(request_id, reason)
        self._unsent = [r for r in self._unsent if r.request_id != request_id]
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests) or bool(self._pending)

    # ---- the step ---------------------------------------------------------------------------

    def step(self) -> list[CoreOutput]:
        """Run one iteration; return a delta for every request that got a token or ended."""
        outputs, self._pending = self._pending, []
        sched = self.scheduler.schedule()
        if sched.is_empty and not sched.finished_request_ids:
            return outputs
        sched.new_requests, self._unsent = self._unsent, []
        result, failed = self._execute(sched)
        for request_id, error in failed.items():  # before update(): nothing of theirs is committed
            out = self._fail(request_id, error)
            if out is not None:
                outputs.append(out)
        for seq, num_new in self.scheduler.update(sched, result.sampled_token_ids):
            outputs.append(self._on_tokens(seq, num_new, result))
        if self.proposer is not None:
            self._propose(sched.finished_request_ids)
        return outputs

    def _propose(self, finished_request_ids: list[str]) -> None:
        """Draft for every running request that decodes next (speculative decoding)."""
        proposer = self.proposer
        for rid in finished_request_ids:
            proposer.finish(rid)
        proposer.begin_step()
        for seq in self.scheduler.running:
            if seq.num_computed_tokens != seq.num_tokens - 1 or not seq.output_token_ids:
                continue  # still prefilling
            # A verification emits up to drafts + 1 tokens: never past max_tokens or the context.
            room = min(seq.sampling_params.max_tokens - seq.num_output_tokens,
                       self.stop_checker.max_model_len - seq.num_tokens) - 1
            seq.draft_token_ids = proposer.propose(seq, room)

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

    def _fail(self, request_id: str, error: BaseException) -> CoreOutput | None:
        """End one request with an internal error (logged with its traceback); free its blocks."""
        seq = self._requests.pop(request_id, None)
        if seq is None:
            return None
        logger.error("request %r failed and was ended; the engine goes on", request_id, exc_info=error)
        self.scheduler.finish(request_id, FinishReason.ERROR)
        return CoreOutput(request_id, [], None, FinishReason.ERROR.value, seq.num_cached_tokens,
                          f"{type(error).__name__}: {error}")

    def _on_tokens(self, seq: Sequence, num_new: int, result: RunnerOutput) -> CoreOutput:
        """Check the step's new tokens in order; the first that ends the request drops the rest."""
        rid = seq.request_id
        new = seq.output_token_ids[-num_new:]
        reason = None
        if num_new == 1:
            reason = self.stop_checker.check_token(seq)
        else:
            del seq.output_token_ids[-num_new:]
            for kept, token in enumerate(new, 1):
                seq.output_token_ids.append(token)
                reason = self.stop_checker.check_token(seq)
                if reason is not None:
                    new = new[:kept]
                    break
        logprobs = None
        if seq.sampling_params.logprobs is not None and rid in result.logprobs:
            logprobs = result.logprobs[rid][: len(new)]
        if reason is not None:
            self.scheduler.finish(rid, reason)
            del self._requests[rid]
        return CoreOutput(rid, new, logprobs, reason.value if reason else None, seq.num_cached_tokens,
                          num_drafted_tokens=seq.num_drafted, num_accepted_tokens=seq.num_accepted)

    # ---- introspection ----------------------------------------------------------------------

    def stats(self) -> dict:
        """Queue lengths, KV usage and prefix-cache counters (for routing and metrics)."""
        bm = self.block_manager
        return {
            "num_running": self.scheduler.num_running, "num_waiting": self.scheduler.num_waiting,
            "kv_cache_usage": bm.usage, "num_free_blocks": bm.num_free_blocks, "num_blocks": bm.num_blocks,
            "prefix_cache_queries": bm.prefix_cache_queries, "prefix_cache_hits": bm.prefix_cache_hits,
            "spec_drafted_tokens": self.scheduler.num_drafted_tokens,
            "spec_accepted_tokens": self.scheduler.num_accepted_tokens,
        }

    def shutdown(self) -> None:
        self.executor.shutdown()
