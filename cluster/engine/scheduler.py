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
        self.num_drafted_tokens = 0  # speculative: draft tokens verified, all requests
        self.num_accepted_tokens = 0  # of those, accepted

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
        budget = self._schedule_drafts(scheduled, budget)
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

    def _schedule_drafts(self, scheduled: list[ScheduledSequence], budget: int) -> int:
        """Add speculative drafts to the decodes, oldest first, from what the running sequences'
        own tokens left of the budget and the free blocks: drafts are optional work and never
        preempt anyone or take a block a scheduled token needs."""
        for i, step in enumerate(scheduled):
            if budget <= 0:
                break
            seq = self._requests[step.request_id]
            if not seq.draft_token_ids or step.num_tokens != 1 or not step.needs_sample or step.is_prefill:
                continue
            num_drafts = min(len(seq.draft_token_ids), budget)
            while num_drafts and not self.block_manager.can_append(seq, 1 + num_drafts):
                num_drafts -= 1
            if num_drafts:
                self.block_manager.append(seq, 1 + num_drafts)
                scheduled[i] = self._make_scheduled(seq, 1, num_drafts)
                budget -= num_drafts
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
        seq.draft_token_ids = []
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
    def _make_scheduled(seq: Sequence, num_new: int, num_drafts: int = 0) -> ScheduledSequence:
        start = seq.num_computed_tokens
        is_decode = num_new == 1 and start == seq.num_tokens - 1 and seq.num_output_tokens > 0
        token_ids = seq.token_ids_slice(start, start + num_new)
        if num_drafts:
            token_ids += seq.draft_token_ids[:num_drafts]
        return ScheduledSequence(
            request_id=seq.request_id,
            token_ids=token_ids,
            start_position=start,
            block_ids=list(seq.block_ids),
            needs_sample=start + num_new == seq.num_tokens,
            is_prefill=not is_decode,
            num_draft_tokens=num_drafts,
        )

    # -- after a step -------------------------------------------------------------

    def update(self, output: SchedulerOutput,
               sampled_token_ids: dict[str, list[int]]) -> list[tuple[Sequence, int]]:
        """Advance the scheduled sequences past the step; return those that got new tokens, each
        with how many (one, or with speculation the accepted drafts and one more).

        A verified sequence keeps the K/V of its accepted drafts; the rejected drafts' slots lie past
        ``num_computed_tokens`` and are simply written again by later tokens (the blocks holding them
        stay in the sequence's table, freed with it). The caller then checks the returned sequences
        for stop conditions and calls finish().
        """
        updated: list[tuple[Sequence, int]] = []
        for scheduled in output.sequences:
            seq = self._requests.get(scheduled.request_id)
            # Aborted (or aborted and re-added) since schedule(): the step's work is stale.
            if seq is None or seq.status is not SequenceStatus.RUNNING \
                    or seq.num_computed_tokens != scheduled.start_position:
                continue
            new_tokens = sampled_token_ids.get(scheduled.request_id) if scheduled.needs_sample else None
            num_accepted = len(new_tokens) - 1 if new_tokens else 0
            if num_accepted > scheduled.num_draft_tokens:
                raise RuntimeError(f"request {seq.request_id!r}: {num_accepted} drafts accepted of "
                                   f"{scheduled.num_draft_tokens}")
            seq.num_computed_tokens += scheduled.num_tokens - scheduled.num_draft_tokens + num_accepted
            seq.num_drafted += scheduled.num_draft_tokens
            seq.num_accepted += num_accepted
            self.num_drafted_tokens += scheduled.num_draft_tokens
            self.num_accepted_tokens += num_accepted
            seq.draft_token_ids = []
            self.block_manager.commit(seq)
            if new_tokens:
                seq.output_token_ids.extend(new_tokens)
                updated.append((seq, len(new_tokens)))
        return updated
