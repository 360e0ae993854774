"""Per-request sampling parameters (the public ``SamplingParams``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.errors import InvalidRequestError
from cluster.request_limits import (
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    SAMPLING_LIMITS,
    TOKEN_ID_LIMIT,
    check_text,
    check_value,
)
from cluster.structured_outputs import StructuredOutputs

_GREEDY_EPS = 1e-5
_OPTIONAL = ("seed", "logprobs")  # None = not set


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
    # Constrain the output to a JSON schema, any JSON object, a regex, a choice or an EBNF grammar
    # (a StructuredOutputs or a dict of its fields); it then ends where its grammar does.
    structured_outputs: StructuredOutputs | dict | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def validate(self) -> None:
        """Raise InvalidRequestError naming the first field outside its range (``request_limits``).

        Limits that depend on the model (top_k and stop ids within the vocabulary, max_tokens within
        the context) are checked again by the engine, which knows them.
        """
        for name, limit in SAMPLING_LIMITS.items():
            value = getattr(self, name)
            if value is not None or name not in _OPTIONAL:
                check_value(name, value, limit)
        if self.min_tokens > self.max_tokens:
            raise InvalidRequestError(
                "min_tokens",
                f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}",
            )
        self.stop = _as_list("stop", self.stop, MAX_STOP_STRINGS)
        for s in self.stop:
            check_text("stop", s, max_chars=MAX_STOP_STRING_CHARS)
        self.stop_token_ids = _as_list("stop_token_ids", self.stop_token_ids, MAX_STOP_TOKEN_IDS)
        for t in self.stop_token_ids:
            check_value("stop_token_ids", t, TOKEN_ID_LIMIT)
        self.structured_outputs = StructuredOutputs.build(self.structured_outputs)
        if self.structured_outputs is not None:
            # The grammar ends the output with EOS once it is complete: neither may override that.
            if self.ignore_eos:
                raise InvalidRequestError("ignore_eos", "must be false with structured_outputs: a constrained "
                                                        "output ends where its grammar does")
            if self.min_tokens:
                raise InvalidRequestError("min_tokens", "must be 0 with structured_outputs: a constrained "
                                                        "output ends where its grammar does")


def _as_list(name: str, value, max_items: int) -> list:
    if not isinstance(value, (list, tuple)):
        raise InvalidRequestError(name, f"must be a list, got {type(value).__name__}")
    if len(value) > max_items:
        raise InvalidRequestError(name, f"must hold at most {max_items} items, got {len(value)}")
    return list(value)
