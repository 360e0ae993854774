"""The one table of request limits: every field a client sets, its type and its range.

gRPC, HTTP and the offline API all end in ``SamplingParams.validate`` and the engine's
``InputProcessor``, which check against this table, so a value is refused the same way (a typed
``InvalidRequestError`` naming the field) whichever door it came through. Ranges are real ranges:
int64 overflow, NaN, infinities, negatives, ids outside the vocabulary and lengths beyond the
context are all refused before anything reaches the engine.

Limits that depend on the model (vocabulary size, context length) are marked ``"vocab"`` or
``"context"`` and checked by ``check_model_limits`` once the engine knows them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cluster.errors import InvalidRequestError

INT64_MAX = 2**63 - 1
MAX_STOP_STRINGS = 16  # each is searched for after every token: the count bounds per-step work
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_LOGPROBS = 20
MAX_REQUEST_ID_CHARS = 256
CHAT_ROLES = ("system", "user", "assistant", "tool")
ModelBound = str  # "vocab" or "context": resolved per model by check_model_limits
_MODEL_BOUNDS = {"vocab": "the vocabulary size", "context": "the context length"}


@dataclass(frozen=True)
class Limit:
    """One numeric field: its kind and inclusive range (``hi`` may be a model bound)."""

    kind: type  # int, float or bool
    lo: float | None = None
    hi: float | ModelBound | None = None
    lo_exclusive: bool = False  # (lo, ...] instead of [lo, ...]
    also: tuple = ()  # extra values allowed outside the range (top_k's -1)

    def describe(self, hi_value=None) -> str:
        if self.kind is bool:
            return "true or false"
        hi = self.hi if hi_value is None else hi_value
        left = "(" if self.lo_exclusive else "["
        lo = "-inf" if self.lo is None else _fmt(self.lo)
        text = f"in {left}{lo}, {'inf' if hi is None else _MODEL_BOUNDS.get(hi) or _fmt(hi)}]"
        return " or ".join([*(str(v) for v in self.also), text])


SAMPLING_LIMITS: dict[str, Limit] = {
    "n": Limit(int, 1, 1),
    "temperature": Limit(float, 0.0, 100.0),
    "top_p": Limit(float, 0.0, 1.0, lo_exclusive=True),
    "top_k": Limit(int, 1, "vocab", also=(-1,)),
    "min_p": Limit(float, 0.0, 1.0),
    "repetition_penalty": Limit(float, 0.01, 100.0),
    "presence_penalty": Limit(float, -2.0, 2.0),
    "frequency_penalty": Limit(float, -2.0, 2.0),
    "seed": Limit(int, 0, INT64_MAX),
    "max_tokens": Limit(int, 1, "context"),
    "min_tokens": Limit(int, 0, "context"),
    "logprobs": Limit(int, 0, MAX_LOGPROBS),
    "ignore_eos": Limit(bool),
    "skip_special_tokens": Limit(bool),
}
TOKEN_ID_LIMIT = Limit(int, 0, "vocab")  # prompt_token_ids and stop_token_ids (vocab exclusive: hi - 1)


def check_value(name: str, value, limit: Limit, hi_value=None) -> None:
    """Raise InvalidRequestError naming ``name`` unless ``value`` fits ``limit``."""
    if limit.kind is bool:
        if not isinstance(value, bool):
            raise InvalidRequestError(name, f"must be true or false, got {_show(value)}")
        return
    hi = limit.hi if hi_value is None else hi_value
    hi = INT64_MAX if isinstance(hi, str) else hi  # a model bound not known yet: the int64 range
    if not _is_kind(value, limit.kind):
        kind = "an integer" if limit.kind is int else "a finite number"
        raise InvalidRequestError(name, f"must be {kind} {limit.describe(hi_value)}, got {_show(value)}")
    if value in limit.also:
        return
    too_low = limit.lo is not None and (value <= limit.lo if limit.lo_exclusive else value < limit.lo)
    if too_low or (hi is not None and value > hi):
        raise InvalidRequestError(name, f"must be {limit.describe(hi_value)}, got {_show(value)}")


def check_text(name: str, value, *, allow_empty: bool = False, max_chars: int | None = None) -> str:
    """A string a client sent: really text (no lone surrogates: it must encode as UTF-8), bounded."""
    if not isinstance(value, str):
        raise InvalidRequestError(name, f"must be a string, got {type(value).__name__}")
    if not value and not allow_empty:
        raise InvalidRequestError(name, "must be non-empty text")
    if max_chars is not None and len(value) > max_chars:
        raise InvalidRequestError(name, f"must be at most {max_chars} characters, got {len(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidRequestError(name, f"is not valid Unicode text (character {err.start} is a lone "
                                        f"surrogate {value[err.start]!r})") from None
    return value


def check_model_limits(params, vocab_size: int, max_model_len: int) -> None:
    """The limits that depend on the model: top_k and token ids within the vocabulary, lengths
    within the context."""
    bounds = {"vocab": vocab_size, "context": max_model_len}
    for name, limit in SAMPLING_LIMITS.items():
        if isinstance(limit.hi, str):
            check_value(name, getattr(params, name), limit, bounds[limit.hi])
    for token_id in params.stop_token_ids:
        check_value("stop_token_ids", token_id, TOKEN_ID_LIMIT, vocab_size - 1)


def _is_kind(value, kind: type) -> bool:
    if isinstance(value, bool):
        return False
    if kind is int:
        return isinstance(value, int)
    if not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond any float
        return False


def _fmt(x) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
