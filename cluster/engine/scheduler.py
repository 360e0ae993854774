"""Iteration-level scheduling: which tokens of which sequences run in the next step.

Each step spends a token budget: running sequences first (oldest first; a decode costs
one token, an unfinished prompt costs a chunk of what is left), then waiting sequences
in strict FCFS order. When KV blocks run out, the newest running sequence is preempted
and later recomputed from scratch (its prefix blocks are often still cached).
"""

from __future__ import annotations

from collections import deque

from cluster.config import SchedulerConfig
from cluster.engine.block_manager import BlockManager
from cluster.contracts.scheduler_output import ScheduledSequence, SchedulerOutput
from cluster.engine.sequence import FinishReason, Sequence, SequenceStatus
from cluster.errors import InvalidRequestError


class Scheduler:
    """Continuous batching with chunked prefill, FCFS admission and preemption by recompute."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: oldest first, preemption victim last
        self._requests: dict[str, Sequence] = {}  # every unfinished request, waiting or running
        self._finished_ids: list[str] = []  # ended since the last schedule()

    # -- request lifecycle --------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queue a new request behind every earlier one."""
        if seq.request_id in self._requests:
            raise InvalidRequestError("request_id", f"{seq.request_id!r} is already in flight")
        seq.status = SequenceStatus.WAITING
        self._requests[seq.request_id] = seq
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        """Stop a request wherever it is and free its blocks now; None if it is unknown."""
        return self.finish(request_id, FinishReason.ABORT)

    def finish(self, request_id: str, reason: FinishReason) -> Sequence | None:
        """End a request (stop, length or abort): release its blocks, report it next step."""
        seq = self._requests.pop(request_id, None)
        if seq is None:
            return None
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self._finished_ids.append(request_id)
        return seq

    def get(self, request_id: str) -> Sequence | None:
        """The unfinished request with this id, if any."""
        return self._requests.get(request_id)

    def has_unfinished(self) -> bool:
        """Whether any request is waiting or running."""
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # -- one step ---------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Pick the work for the next step under the token and sequence budgets."""
        output = SchedulerOutput(finished_request_ids=self._finished_ids)
        self._finished_ids = []
        scheduled: list[ScheduledSequence] = []
        budget = self._schedule_running(scheduled, output, self.config.max_num_batched_tokens)
        # After a preemption memory is tight: admitting now would only cause more of them.
        if not output.preempted_request_ids:
            self._schedule_waiting(scheduled, budget)
        output.sequences = sorted(scheduled, key=lambda s: s.is_prefill)  # stable: decodes first
        return output

    def _schedule_running(self, scheduled: list[ScheduledSequence], output: SchedulerOutput,
                          budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if num_new > 0:
                if not self._reserve_blocks(seq, num_new, output):
                    break  # seq was itself the newest, so it was preempted; nothing is left after it
                scheduled.append(self._make_scheduled(seq, num_new))
                budget -= num_new
            i += 1
        return budget

    def _reserve_blocks(self, seq: Sequence, num_new: int, output: SchedulerOutput) -> bool:
        while not self.block_manager.can_append(seq, num_new):
            victim = self.running[-1]
            self._preempt(victim, output)
            if victim is seq:
                return False
        self.block_manager.append(seq, num_new)
        return True

    def _preempt(self, seq: Sequence, output: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)  # it arrived before everything still waiting
        output.preempted_request_ids.append(seq.request_id)

    def _schedule_waiting(self, scheduled: list[ScheduledSequence], budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            self.block_manager.allocate_prefix(seq)
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.block_manager.can_append(seq, num_new):
                self.block_manager.cancel_prefix(seq)
                return  # strict FCFS: later requests never jump ahead of this one
            self.block_manager.append(seq, num_new)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(self._make_scheduled(seq, num_new))
            budget -= num_new

    @staticmethod
    def _make_scheduled(seq: Sequence, num_new: int) -> ScheduledSequence:
        start = seq.num_computed_tokens
        is_decode = num_new == 1 and start == seq.num_tokens - 1 and seq.num_output_tokens > 0
        return ScheduledSequence(
            request_id=seq.request_id,
            token_ids=seq.token_ids_slice(start, start + num_new),
            start_position=start,
            block_ids=list(seq.block_ids),
            needs_sample=start + num_new == seq.num_tokens,
            is_prefill=not is_decode,
        )

    # -- after a step -------------------------------------------------------------

    def update(self, output: SchedulerOutput, sampled_token_ids: dict[str, int]) -> list[Sequence]:
        """Advance the scheduled sequences past the step; return those that got a new token.

        The caller then checks the returned sequences for stop conditions and calls finish().
        """
        updated: list[Sequence] = []
        for scheduled in output.sequences:
            seq = self._requests.get(scheduled.request_id)
            # Aborted (or aborted and re-added) since schedule(): the step's work is stale.
            if seq is None or seq.status is not SequenceStatus.RUNNING \
                    or seq.num_computed_tokens != scheduled.start_position:
                continue
            seq.num_computed_tokens += scheduled.num_tokens
            self.block_manager.commit(seq)
            if scheduled.needs_sample and scheduled.request_id in sampled_token_ids:
                seq.output_token_ids.append(sampled_token_ids[scheduled.request_id])
                updated.append(seq)
        return updated
