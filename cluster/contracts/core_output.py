"""What the engine core sends back per step for one request: only what is new (a delta)."""

from __future__ import annotations

from dataclasses import dataclass

from cluster.contracts.runner_output import TokenLogprobs


@dataclass
class CoreOutput:
    request_id: str
    new_token_ids: list[int]  # sampled this step (empty when the request ended without a token)
    new_logprobs: list[TokenLogprobs] | None = None  # for those tokens, when the request asked
    finish_reason: str | None = None  # "stop" (EOS / stop token) | "length" | "error"; None while running
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (at the last admission)
    error: str | None = None  # finish_reason "error": what failed (the core logged its traceback)
    num_drafted_tokens: int = 0  # speculative: draft tokens verified for this request so far
    num_accepted_tokens: int = 0  # speculative: of those, accepted
