"""What the scheduler hands the executor each step (pure Python, no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.sampling_params import SamplingParams


@dataclass
class NewRequest:
    """A request the workers have not seen yet: what the sampling rank must remember."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    seed: int  # the request's seed, or one the engine drew for it: its sampling RNG starts here


@dataclass
class ScheduledSequence:
    """One sequence's slice of work in a step."""

    request_id: str
    token_ids: list[int]  # tokens to run through the model this step (a prefill chunk or 1 decode token)
    start_position: int  # position of token_ids[0]; equals num_computed_tokens before the step
    block_ids: list[int]  # the whole block table, covering start_position + len(token_ids) tokens
    needs_sample: bool  # True when this chunk reaches the sequence's last token: sample one
    is_prefill: bool  # True while the sequence is still computing its prompt (or recomputing)
    num_draft_tokens: int = 0  # speculative: the last this many of token_ids are drafts to verify

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_single_decode(self) -> bool:
        """One decode token, nothing to verify: the batched decode path takes it."""
        return not self.is_prefill and len(self.token_ids) == 1

    @property
    def num_sample_rows(self) -> int:
        """Logits rows this sequence needs: its last token's, and each draft's."""
        return 1 + self.num_draft_tokens if self.needs_sample else 0

    @property
    def context_length(self) -> int:
        """Tokens this chunk attends to (cached prefix + itself)."""
        return self.start_position + len(self.token_ids)


@dataclass
class SchedulerOutput:
    """The whole step: every scheduled sequence, decodes first, then prefill chunks."""

    sequences: list[ScheduledSequence] = field(default_factory=list)
    preempted_request_ids: list[str] = field(default_factory=list)  # preempted this step (recompute later)
    finished_request_ids: list[str] = field(default_factory=list)  # ended since the last step (workers drop state)
    new_requests: list[NewRequest] = field(default_factory=list)  # first scheduled this step (filled by the engine)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_tokens for s in self.sequences)

    @property
    def is_empty(self) -> bool:
        return not self.sequences
