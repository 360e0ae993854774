"""What the engine returns to callers: RequestOutputs, cumulative, as deltas or only the final one."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from cluster.contracts.runner_output import TokenLogprobs


class RequestOutputKind(enum.Enum):
    CUMULATIVE = "cumulative"  # every output holds everything generated so far
    DELTA = "delta"  # every output holds only what is new since the last one (streaming servers)
    FINAL_ONLY = "final_only"  # one output, when the request ends (offline batches)


@dataclass
class CompletionOutput:
    """One completion of a prompt: as far as it has got, or (DELTA) what the last step added."""

    index: int  # which completion (always 0: n=1)
    text: str  # generated text; stop strings and a trailing partial stop string excluded
    token_ids: list[int]  # generated token ids (an EOS / stop token included)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"; None while running
    logprobs: list[TokenLogprobs] | None = None  # per token, when the request asked for them
    num_generated_tokens: int = 0  # tokens generated so far, in every output kind

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


def merge_deltas(older: RequestOutput, newer: RequestOutput) -> RequestOutput:
    """One DELTA output covering two consecutive ones (a slow consumer gets fewer, larger messages)."""
    a, b = older.outputs[0], newer.outputs[0]
    logprobs = None if a.logprobs is None and b.logprobs is None else (a.logprobs or []) + (b.logprobs or [])
    merged = CompletionOutput(b.index, a.text + b.text, a.token_ids + b.token_ids, b.finish_reason, logprobs,
                              b.num_generated_tokens)
    return RequestOutput(newer.request_id, newer.prompt, newer.prompt_token_ids, [merged], newer.finished,
                         newer.num_cached_tokens, newer.metrics, newer.error)
