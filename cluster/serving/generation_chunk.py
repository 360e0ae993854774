"""What a model-server replica streams back per engine step for one request: only what is new."""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.contracts.runner_output import TokenLogprobs


@dataclass
class GenerationChunk:
    request_id: str
    text: str  # text added since the previous chunk
    token_ids: list[int]  # token ids added since the previous chunk
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # for those tokens, when asked for
    finish_reason: str | None = None  # "stop" | "length" | "abort" on the last chunk, else None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # generated so far
    cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache
    token_texts: dict[int, str] = field(default_factory=dict)  # text of every token id in ``logprobs``
