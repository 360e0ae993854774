"""Prompt lookup: propose what followed the latest earlier occurrence of the last n tokens."""

from __future__ import annotations


class NgramIndex:
    """Where each n-gram (n in [n_min, n_max]) of one request's tokens last ended, kept up to date
    as tokens are appended: O(n_max - n_min + 1) dictionary updates per token."""

    def __init__(self, n_min: int, n_max: int):
        self.n_min, self.n_max = n_min, n_max
        self.tokens: list[int] = []
        self._next_after: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token that followed it
        self._indexed = 0  # n-grams ending before tokens[_indexed - 1] are in the index

    def extend(self, tokens: list[int]) -> None:
        self.tokens.extend(tokens)

    def propose(self, max_tokens: int) -> tuple[list[int], int]:
        """The tokens that followed the longest matching n-gram (most recent occurrence), and the
        match length; ([], 0) when nothing matches."""
        tokens = self.tokens
        last = len(tokens) - 1
        # Index every n-gram that ends before the last token: the one ending at it is the pattern.
        for end in range(self._indexed, last):
            for n in range(self.n_min, min(self.n_max, end + 1) + 1):
                self._next_after[tuple(tokens[end + 1 - n: end + 1])] = end + 1
        self._indexed = max(self._indexed, last)
        if max_tokens < 1:
            return [], 0
        for n in range(min(self.n_max, last), self.n_min - 1, -1):
            start = self._next_after.get(tuple(tokens[last + 1 - n:]))
            if start is not None:
                return tokens[start: start + max_tokens], n
        return [], 0
