"""Per-request sampling parameters (the public ``SamplingParams``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cluster.errors import InvalidRequestError

_GREEDY_EPS = 1e-5


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop.

    Defaults follow vLLM: temperature 1.0 samples from the full distribution;
    temperature 0 means greedy.
    """

    n: int = 1  # completions per prompt; only 1 is supported
    temperature: float = 1.0  # 0 = greedy; higher flattens the distribution
    top_p: float = 1.0  # nucleus: keep the smallest set whose mass >= top_p, in (0, 1]
    top_k: int = -1  # keep the k most likely tokens; -1 = all
    min_p: float = 0.0  # drop tokens with p < min_p * p_max, in [0, 1]
    repetition_penalty: float = 1.0  # > 1 discourages tokens seen in prompt or output
    presence_penalty: float = 0.0  # subtracted once from logits of tokens in the output, [-2, 2]
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output, [-2, 2]
    seed: int | None = None  # same seed -> same text, whatever else is batched
    max_tokens: int = 16  # new tokens at most
    min_tokens: int = 0  # EOS / stop tokens are masked until this many are generated
    stop: list[str] = field(default_factory=list)  # stop strings, excluded from the text
    stop_token_ids: list[int] = field(default_factory=list)  # extra token ids that end generation
    ignore_eos: bool = False  # keep generating past EOS (benchmarks)
    logprobs: int | None = None  # return the top-N logprobs per generated token (0 = sampled only)
    skip_special_tokens: bool = True  # drop special tokens from the returned text

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        self.validate()

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def validate(self) -> None:
        """Raise InvalidRequestError naming the first field out of range."""
        _check_int("n", self.n, lo=1, hi=1, allowed="exactly 1")
        _check_float("temperature", self.temperature, lo=0.0, allowed=">= 0")
        _check_float("top_p", self.top_p, allowed="in (0, 1]")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {self.top_p}")
        _check_int("top_k", self.top_k, allowed="-1 (disabled) or >= 1")
        if self.top_k == 0 or self.top_k < -1:
            raise InvalidRequestError("top_k", f"must be -1 (disabled) or >= 1, got {self.top_k}")
        _check_float("min_p", self.min_p, lo=0.0, hi=1.0, allowed="in [0, 1]")
        _check_float("repetition_penalty", self.repetition_penalty, allowed="> 0")
        if self.repetition_penalty <= 0.0:
            raise InvalidRequestError(
                "repetition_penalty", f"must be > 0, got {self.repetition_penalty}"
            )
        _check_float("presence_penalty", self.presence_penalty, lo=-2.0, hi=2.0, allowed="in [-2, 2]")
        _check_float("frequency_penalty", self.frequency_penalty, lo=-2.0, hi=2.0, allowed="in [-2, 2]")
        if self.seed is not None:
            _check_int("seed", self.seed, lo=0, hi=2**63 - 1, allowed="in [0, 2**63)")
        _check_int("max_tokens", self.max_tokens, lo=1, allowed=">= 1")
        _check_int("min_tokens", self.min_tokens, lo=0, allowed=">= 0")
        if self.min_tokens > self.max_tokens:
            raise InvalidRequestError(
                "min_tokens",
                f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}",
            )
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequestError("stop", f"each stop string must be non-empty text, got {s!r}")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t, lo=0, allowed="token ids >= 0")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, lo=0, hi=20, allowed="in [0, 20]")


def _check_int(name: str, value, *, lo=None, hi=None, allowed: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(name, f"must be an integer {allowed}, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise InvalidRequestError(name, f"must be {allowed}, got {value}")


def _check_float(name: str, value, *, lo=None, hi=None, allowed: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise InvalidRequestError(name, f"must be a number {allowed}, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise InvalidRequestError(name, f"must be {allowed}, got {value}")
