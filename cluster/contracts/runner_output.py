"""What the model runner hands back to the engine each step."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprobs:
    """Logprob of the sampled token and the top-N alternatives, from the model's raw distribution."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)  # token id -> logprob, N most likely


@dataclass
class RunnerOutput:
    """Sampled tokens for the sequences whose ScheduledSequence.needs_sample was True."""

    sampled_token_ids: dict[str, int] = field(default_factory=dict)  # request_id -> new token
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)  # only for requests that asked
