"""Streaming token ids -> text, one short decode window per step (vLLM's offsets scheme)."""

from __future__ import annotations

# Prompt tokens decoded as context before the first output token, so that token's
# leading space (or merge with the prompt) renders as a whole-text decode would.
_NUM_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into text deltas.

    Keeps a window ``ids[prefix_offset:]``: ``ids[prefix_offset:read_offset]`` is
    context already emitted, the rest is new. Each step decodes only that window,
    so the cost per token stays constant. Text is held back while the window
    decodes to a trailing U+FFFD, i.e. a multi-byte UTF-8 character is split over
    byte-level tokens that have not all arrived.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        context_ids = list(prompt_token_ids[-_NUM_CONTEXT_TOKENS:])
        self._window_ids = context_ids  # ids[prefix_offset:], prompt context first
        self._num_read = len(context_ids)  # read_offset - prefix_offset
        self._prefix_text = self._decode(context_ids)
        self.token_ids: list[int] = []  # every output token id added so far
        self._pieces: list[str] = []  # the emitted deltas; joined only when the whole text is asked for
        self.num_chars = 0  # length of the text emitted so far

    @property
    def text(self) -> str:
        """The output text emitted so far (the concatenated deltas)."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def text_slice(self, start: int, end: int | None = None) -> str:
        """``text[start:end]``, at a cost that grows with ``num_chars - start``, not with the text."""
        end = self.num_chars if end is None else end
        start = max(0, start)
        if start >= end:
            return ""
        parts, pos = [], self.num_chars
        for piece in reversed(self._pieces):
            if pos <= start:
                break
            parts.append(piece)
            pos -= len(piece)
        joined = "".join(reversed(parts))
        return joined[start - pos:end - pos]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def add_tokens(self, token_ids: list[int]) -> str:
        """Append output tokens and return the newly readable text (may be "")."""
        self.token_ids.extend(token_ids)
        self._window_ids.extend(token_ids)
        window_text = self._decode(self._window_ids)
        if len(window_text) <= len(self._prefix_text) or window_text.endswith(_REPLACEMENT_CHAR):
            return ""
        return self._emit(window_text)

    def flush(self) -> str:
        """Emit whatever is held back (e.g. an incomplete character when generation ends).

        After this, ``text`` equals ``tokenizer.decode(token_ids)`` even if the
        output stopped mid-character.
        """
        window_text = self._decode(self._window_ids)
        if len(window_text) <= len(self._prefix_text):
            return ""
        return self._emit(window_text)

    def _emit(self, window_text: str) -> str:
        delta = window_text[len(self._prefix_text):]
        # Slide the window: what was new becomes the context for the next step.
        self._window_ids = self._window_ids[self._num_read:]
        self._num_read = len(self._window_ids)
        self._prefix_text = self._decode(self._window_ids)
        if delta:
            self._pieces.append(delta)
            self.num_chars += len(delta)
        return delta
