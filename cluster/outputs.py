"""What the engine returns to callers: one RequestOutput per request, cumulative."""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.contracts.runner_output import TokenLogprobs


@dataclass
class CompletionOutput:
    """One completion of a prompt, as far as it has got."""

    index: int  # which completion (always 0: n=1)
    text: str  # generated text so far; stop strings and a trailing partial stop string excluded
    token_ids: list[int]  # generated token ids so far (an EOS / stop token included)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"; None while running
    logprobs: list[TokenLogprobs] | None = None  # per token, when the request asked for them

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A request's state after a step; ``finished`` is True exactly once, on the last one."""

    request_id: str
    prompt: str | None  # the prompt text, when it was given as text
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    metrics: dict = field(default_factory=dict)  # arrival / first-token / finish times (monotonic s)
    error: str | None = None  # finish_reason "error": what failed (logged with its traceback)
