"""What changed since the last step: the message the driver sends every worker.

The scheduler describes a step in full (``SchedulerOutput``: whole block tables, chunk
tokens). Sending that to every rank each step would grow with context length, so the
driver's ``StepEncoder`` turns it into a ``StepDelta`` (new requests once, then only the
tokens and blocks each sequence gained) and each worker's ``StepDecoder`` keeps a mirror of
every live request and rebuilds the full ``SchedulerOutput`` the model runner consumes.
Both ends are pure Python and apply messages in one fixed order: finished, new, preempted,
then the scheduled chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.contracts.scheduler_output import NewRequest, ScheduledSequence, SchedulerOutput


@dataclass
class SequenceDelta:
    """One scheduled sequence, as far as the workers have not seen it yet."""

    request_id: str
    start_position: int  # first position computed this step
    num_tokens: int  # tokens computed this step, drafts not counted
    new_token_ids: list[int]  # tokens appended to the request since the workers last saw it
    new_block_ids: list[int]  # blocks appended to its table (the whole table after a (re)admission)
    needs_sample: bool
    is_prefill: bool
    draft_token_ids: list[int] = field(default_factory=list)  # speculative: run after the step's tokens


@dataclass
class StepDelta:
    """One step for every rank: apply, then run ``sequences``."""

    new_requests: list[NewRequest] = field(default_factory=list)
    finished_request_ids: list[str] = field(default_factory=list)
    preempted_request_ids: list[str] = field(default_factory=list)
    sequences: list[SequenceDelta] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not (self.new_requests or self.finished_request_ids or self.preempted_request_ids
                    or self.sequences)


@dataclass
class _SentState:
    num_tokens: int  # tokens [0, num_tokens) are known to the workers
    num_blocks: int  # block_ids[:num_blocks] are known to the workers
    drafts: list[int] = field(default_factory=list)  # the drafts of the last step that ran it


class StepEncoder:
    """Driver side: remembers what the workers already hold and sends only the rest."""

    def __init__(self) -> None:
        self._sent: dict[str, _SentState] = {}

    def encode(self, out: SchedulerOutput) -> StepDelta:
        for rid in out.finished_request_ids:
            self._sent.pop(rid, None)
        for new in out.new_requests:
            self._sent[new.request_id] = _SentState(len(new.prompt_token_ids), 0)
        for rid in out.preempted_request_ids:
            if rid in self._sent:
                self._sent[rid].num_blocks = 0  # its blocks were freed; the next table is new
                self._sent[rid].drafts = []
        return StepDelta(list(out.new_requests), list(out.finished_request_ids),
                         list(out.preempted_request_ids), [self._encode(s) for s in out.sequences])

    def _encode(self, seq: ScheduledSequence) -> SequenceDelta:
        sent = self._sent.get(seq.request_id)
        if sent is None:
            raise RuntimeError(f"request {seq.request_id!r} was scheduled before the workers were told of it")
        # Tokens between what the workers hold and this step's start can only be drafts they ran
        # last step and the engine accepted: they are sent again as the request's own tokens.
        gap = seq.start_position - sent.num_tokens
        if gap > len(sent.drafts):
            raise RuntimeError(f"request {seq.request_id!r}: workers hold {sent.num_tokens} tokens, "
                               f"the step starts at {seq.start_position}")
        accepted = sent.drafts[:gap] if gap > 0 else []
        sent.num_tokens += len(accepted)
        num_real = seq.num_tokens - seq.num_draft_tokens
        end = seq.start_position + num_real
        new_tokens = accepted + (seq.token_ids[sent.num_tokens - seq.start_position:num_real]
                                 if end > sent.num_tokens else [])
        new_blocks = seq.block_ids[sent.num_blocks:]
        sent.num_tokens = max(sent.num_tokens, end)
        sent.num_blocks = len(seq.block_ids)
        sent.drafts = seq.token_ids[num_real:]
        return SequenceDelta(seq.request_id, seq.start_position, num_real, new_tokens, new_blocks,
                             seq.needs_sample, seq.is_prefill, list(sent.drafts))


@dataclass
class _Mirror:
    token_ids: list[int]
    block_ids: list[int]


class StepDecoder:
    """Worker side: a mirror of every live request, updated by deltas."""

    def __init__(self) -> None:
        self._requests: dict[str, _Mirror] = {}

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    def decode(self, delta: StepDelta) -> SchedulerOutput:
        for rid in delta.finished_request_ids:
            self._requests.pop(rid, None)
        for new in delta.new_requests:
            self._requests[new.request_id] = _Mirror(list(new.prompt_token_ids), [])
        for rid in delta.preempted_request_ids:
            if rid in self._requests:
                self._requests[rid].block_ids = []
        return SchedulerOutput(
            sequences=[self._decode(s) for s in delta.sequences],
            preempted_request_ids=list(delta.preempted_request_ids),
            finished_request_ids=list(delta.finished_request_ids),
            new_requests=list(delta.new_requests),
        )

    def _decode(self, seq: SequenceDelta) -> ScheduledSequence:
        mirror = self._requests.get(seq.request_id)
        if mirror is None:
            raise RuntimeError(f"step for unknown request {seq.request_id!r}: driver and worker disagree")
        mirror.token_ids += seq.new_token_ids
        mirror.block_ids += seq.new_block_ids
        end = seq.start_position + seq.num_tokens
        if end > len(mirror.token_ids):
            raise RuntimeError(f"request {seq.request_id!r}: step needs {end} tokens, mirror has "
                               f"{len(mirror.token_ids)}")
        return ScheduledSequence(
            request_id=seq.request_id,
            token_ids=mirror.token_ids[seq.start_position:end] + seq.draft_token_ids,
            start_position=seq.start_position,
            block_ids=list(mirror.block_ids),
            needs_sample=seq.needs_sample,
            is_prefill=seq.is_prefill,
            num_draft_tokens=len(seq.draft_token_ids),
        )
