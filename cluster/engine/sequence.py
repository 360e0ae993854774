"""One request's state as the scheduler sees it (pure Python, no torch)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from cluster.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, no KV blocks held (new or preempted)
    RUNNING = "running"  # holds KV blocks; prefilling in chunks or decoding
    FINISHED = "finished"  # done; blocks released


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # aborted by the caller
    ERROR = "error"  # ended by an internal fault pinned on this request (the others go on)


@dataclass
class Sequence:
    """A request moving through the engine.

    ``num_computed_tokens`` counts tokens whose K/V is already in the paged cache;
    the tokens after it are the work left. A preempted sequence is reset to zero
    and recomputes prompt + output (preemption by recompute).
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time_s: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    num_computed_tokens: int = 0  # tokens with K/V in the cache
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at the last admission
    block_ids: list[int] = field(default_factory=list)  # the block table, in token order
    block_hashes: list[int] = field(default_factory=list)  # hash chain of this sequence's full blocks
    num_preemptions: int = 0
    draft_token_ids: list[int] = field(default_factory=list)  # speculative: proposed to follow the last token
    num_drafted: int = 0  # speculative: draft tokens verified so far
    num_accepted: int = 0  # speculative: of those, accepted

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def token_id_at(self, index: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[index] if index < n else self.output_token_ids[index - n]

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without joining the two (a decode step takes one)."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n]
