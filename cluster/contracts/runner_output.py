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

    # request_id -> its new tokens: one, or after verifying drafts the accepted ones and one more
    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)  # per new token, for requests that asked
