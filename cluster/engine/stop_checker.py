"""Decides after each new token whether a sequence is finished, and why."""

from __future__ import annotations

from cluster.engine.sequence import FinishReason, Sequence


class StopChecker:
    """Checks stop tokens, stop strings and length limits, in that order."""

    def __init__(self, eos_token_ids: frozenset[int], max_model_len: int):
        self.eos_token_ids = frozenset(eos_token_ids)  # the model's end-of-sequence ids
        self.max_model_len = max_model_len  # prompt + output tokens at most

    def check(self, seq: Sequence, text: str, num_new_chars: int) -> tuple[FinishReason | None, int | None]:
        """Call after each new token is appended to ``seq.output_token_ids`` and its text to ``text``.

        ``text`` is the whole output text; its last ``num_new_chars`` characters
        are new. Returns ``(reason, truncate_at)``: reason is None while the
        sequence goes on; truncate_at is set only for a stop string, as the index
        to cut ``text`` at (the stop string itself excluded).
        """
        params = seq.sampling_params
        num_output = len(seq.output_token_ids)
        if num_output >= params.min_tokens:
            if self._is_stop_token(seq):
                return FinishReason.STOP, None
            truncate_at = find_stop_string(text, num_new_chars, params.stop)
            if truncate_at is not None:
                return FinishReason.STOP, truncate_at
        if num_output >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH, None
        return None, None

    def check_token(self, seq: Sequence) -> FinishReason | None:
        """The token-level part of ``check`` (the engine core's): stop tokens, then length limits.
        The frontend then looks for stop strings, which outrank a length stop on the same token."""
        params = seq.sampling_params
        num_output = len(seq.output_token_ids)
        if num_output >= params.min_tokens and self._is_stop_token(seq):
            return FinishReason.STOP
        if num_output >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _is_stop_token(self, seq: Sequence) -> bool:
        if not seq.output_token_ids:
            return False
        last = seq.output_token_ids[-1]
        params = seq.sampling_params
        return (last in self.eos_token_ids and not params.ignore_eos) or last in params.stop_token_ids


def find_stop_string(text: str, num_new_chars: int, stop_strings: list[str]) -> int | None:
    """Index of the earliest stop string that the new characters complete, or None.

    Only a match that includes a new character counts, so each stop string is
    searched from ``len(stop) - 1`` characters before the new ones: older text was
    checked on earlier steps (or was still under min_tokens and must not stop now).
    """
    if num_new_chars <= 0:
        return None
    new_start = len(text) - num_new_chars
    matches = [text.find(s, max(0, new_start - len(s) + 1)) for s in stop_strings]
    found = [i for i in matches if i != -1]
    return min(found) if found else None


def stop_holdback(text: str, stop_strings: list[str]) -> int:
    """How many trailing characters of ``text`` a streaming caller should hold back.

    They are the longest suffix that is a proper prefix of some stop string: the
    next token may complete the stop string, which must never be shown.
    """
    holdback = 0
    for stop in stop_strings:
        for length in range(min(len(stop) - 1, len(text)), holdback, -1):
            if text.endswith(stop[:length]):
                holdback = length
                break
    return holdback
