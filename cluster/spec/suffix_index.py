"""Suffix decoding's lookups: the longest earlier match of a request's recent tokens, and the most
frequent continuation of its occurrences.

A suffix tree answers both, but one node per (position, depth) costs hundreds of bytes per token in
Python. ``SuffixIndex`` keeps the token sequences themselves and where each bigram occurs; a match
extends each recent occurrence of the request's last bigram backwards (up to ``max_depth``
tokens) and keeps those of the longest match, the occurrences a suffix tree's matched node would
hold. Drafting then follows, token by token, the continuation most of the surviving occurrences
share, with the share as its probability estimate: O(tokens) memory, O(candidates x depth) time.
"""

from __future__ import annotations

from collections import Counter, deque

_MAX_CANDIDATES = 64  # most recent occurrences of the bigram examined per lookup


class SuffixIndex:
    """Token sequences (keyed by an id) and, for every bigram, where in them it ends."""

    def __init__(self) -> None:
        self.sequences: dict[int, list[int]] = {}
        # bigram -> {sequence id -> indices just past each occurrence}, ids in insertion order
        self._where: dict[tuple[int, int], dict[int, list[int]]] = {}

    def extend(self, seq_id: int, tokens: list[int]) -> None:
        """Append tokens to a sequence (created empty if new) and index its new bigrams."""
        seq = self.sequences.setdefault(seq_id, [])
        start = len(seq)
        seq.extend(tokens)
        for end in range(max(2, start + 1), len(seq) + 1):
            self._where.setdefault((seq[end - 2], seq[end - 1]), {}).setdefault(seq_id, []).append(end)

    def remove(self, seq_id: int) -> None:
        seq = self.sequences.pop(seq_id, None)
        if seq is None:
            return
        for end in range(2, len(seq) + 1):
            key = (seq[end - 2], seq[end - 1])
            places = self._where.get(key)
            if places is not None and places.pop(seq_id, None) is not None and not places:
                del self._where[key]

    def match(self, pattern: list[int]) -> tuple[int, list[tuple[int, int]]]:
        """The longest suffix of ``pattern`` (>= 2 tokens) that occurs with something after it, and
        those occurrences as (sequence id, index just past the match)."""
        if len(pattern) < 2:
            return 0, []
        places = self._where.get((pattern[-2], pattern[-1]))
        if not places:
            return 0, []
        best_len, best = 0, []
        seen = 0
        for seq_id in reversed(places):
            seq = self.sequences[seq_id]
            for end in reversed(places[seq_id]):
                if end >= len(seq):
                    continue  # the pattern itself, or an occurrence nothing follows yet
                length = 2
                while length < len(pattern) and end - length > 0 \
                        and seq[end - length - 1] == pattern[-length - 1]:
                    length += 1
                if length > best_len:
                    best_len, best = length, [(seq_id, end)]
                elif length == best_len:
                    best.append((seq_id, end))
                seen += 1
                if seen == _MAX_CANDIDATES:
                    return best_len, best
        return best_len, best

    def draft(self, occurrences: list[tuple[int, int]], max_tokens: int,
              min_prob: float) -> tuple[list[int], float]:
        """Follow the continuation most occurrences share while its estimated probability stays
        >= ``min_prob``; return the tokens and their score (expected number accepted)."""
        tokens: list[int] = []
        prob, score = 1.0, 0.0
        alive = occurrences
        while len(tokens) < max_tokens:
            j = len(tokens)
            nexts = Counter(self.sequences[s][e + j] for s, e in alive if e + j < len(self.sequences[s]))
            if not nexts:
                break
            token, count = nexts.most_common(1)[0]
            prob *= count / sum(nexts.values())
            if prob < min_prob:
                break
            tokens.append(token)
            score += prob
            alive = [(s, e) for s, e in alive if e + j < len(self.sequences[s]) and self.sequences[s][e + j] == token]
        return tokens, score


class RecentOutputs:
    """The outputs of the last ``capacity`` finished requests, indexed for matching."""

    def __init__(self, capacity: int):
        self.index = SuffixIndex()
        self.capacity = capacity
        self._order: deque[int] = deque()
        self._next_id = 0

    def add(self, tokens: list[int]) -> None:
        if self.capacity == 0 or len(tokens) < 3:
            return
        self.index.extend(self._next_id, list(tokens))
        self._order.append(self._next_id)
        self._next_id += 1
        while len(self._order) > self.capacity:
            self.index.remove(self._order.popleft())

    def __len__(self) -> int:
        return len(self._order)
