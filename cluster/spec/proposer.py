"""Which drafts each decoding request verifies next, and when it is not worth drafting.

The engine core calls ``propose`` for every request about to decode (pure Python, between steps).
Each request keeps its drafter state (an n-gram index, or a suffix index of its own tokens; suffix
decoding also matches in the outputs of recent requests), fed incrementally with the tokens it
gained. Acceptance is tracked per request as a
moving average; when it falls below ``backoff_acceptance`` the request stops drafting for
``backoff_steps`` steps, doubled on each further pause, so text that does not repeat costs a
lookup per token and a rejected draft now and then.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.config import SpeculativeConfig
from cluster.engine.sequence import Sequence
from cluster.spec.ngram import NgramIndex
from cluster.spec.suffix_index import RecentOutputs, SuffixIndex

_EMA = 0.5  # weight of the newest verification in the acceptance average
_MAX_BACKOFF_DOUBLINGS = 6


@dataclass
class _RequestDrafts:
    """One request's drafter state."""

    num_fed: int = 0  # of the request's tokens, how many the drafter has seen
    ngram: NgramIndex | None = None
    own: SuffixIndex | None = None  # suffix: the request's prompt and output
    output: list[int] = field(default_factory=list)  # suffix: joins the recent outputs when it finishes
    seen_drafted: int = 0
    seen_accepted: int = 0
    acceptance: float = 1.0  # moving average of accepted / drafted
    paused_until: int = 0  # step number
    num_pauses: int = 0


class Proposer:
    """Drafts for every decoding request (``ngram`` or ``suffix``), with adaptive back-off."""

    def __init__(self, config: SpeculativeConfig):
        self.config = config
        self._requests: dict[str, _RequestDrafts] = {}
        self._recent = RecentOutputs(config.max_cached_requests) if config.method == "suffix" else None
        self._step = 0

    def begin_step(self) -> None:
        self._step += 1

    def propose(self, seq: Sequence, max_tokens: int) -> list[int]:
        """Drafts to follow ``seq``'s last token (at most ``max_tokens``; [] to decode plainly)."""
        state = self._requests.get(seq.request_id)
        if state is None:
            state = self._requests[seq.request_id] = self._new_state()
        self._feed(state, seq)
        self._track(state, seq)
        if max_tokens < 1 or self._step < state.paused_until:
            return []
        limit = min(max_tokens, self.config.num_tokens)
        if state.ngram is not None:
            return state.ngram.propose(limit)[0]
        return self._suffix_draft(state, limit)

    def finish(self, request_id: str) -> None:
        """The request ended: forget it (with suffix decoding its output joins the recent ones)."""
        state = self._requests.pop(request_id, None)
        if state is not None and self._recent is not None:
            self._recent.add(state.output)

    def reset(self) -> None:
        """Forget every request (the engine restarted); the recent outputs stay."""
        self._requests.clear()

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    # ---- internals ------------------------------------------------------------------------

    def _new_state(self) -> _RequestDrafts:
        cfg = self.config
        if cfg.method == "ngram":
            return _RequestDrafts(ngram=NgramIndex(cfg.prompt_lookup_min, cfg.prompt_lookup_max))
        return _RequestDrafts(own=SuffixIndex())

    def _feed(self, state: _RequestDrafts, seq: Sequence) -> None:
        num_prompt = seq.num_prompt_tokens
        new = seq.token_ids_slice(state.num_fed, seq.num_tokens)
        state.num_fed = seq.num_tokens
        if state.ngram is not None:
            state.ngram.extend(new)
            return
        state.output.extend(new[max(0, num_prompt - (state.num_fed - len(new))):])
        state.own.extend(0, new)

    def _track(self, state: _RequestDrafts, seq: Sequence) -> None:
        drafted = seq.num_drafted - state.seen_drafted
        accepted = seq.num_accepted - state.seen_accepted
        state.seen_drafted, state.seen_accepted = seq.num_drafted, seq.num_accepted
        if drafted <= 0:
            return
        state.acceptance = (1 - _EMA) * state.acceptance + _EMA * accepted / drafted
        if state.acceptance < self.config.backoff_acceptance and self.config.backoff_steps:
            doublings = min(state.num_pauses, _MAX_BACKOFF_DOUBLINGS)
            state.paused_until = self._step + self.config.backoff_steps * (1 << doublings)
            state.num_pauses += 1
            state.acceptance = 1.0  # judged afresh after the pause
        elif accepted * 2 >= drafted and state.num_pauses:  # a good verification earns back a doubling
            state.num_pauses -= 1

    def _suffix_draft(self, state: _RequestDrafts, limit: int) -> list[int]:
        cfg = self.config

        own_tokens = state.own.sequences[0]
        pattern = own_tokens[-cfg.max_tree_depth:]
        best: tuple[list[int], float] = ([], 0.0)
        for index in (state.own, self._recent.index):
            length, occurrences = index.match(pattern)
            if not occurrences:
                continue
            # Longer matches earn longer drafts (suffix decoding's adaptive length).
            draft = index.draft(occurrences, min(limit, max(1, int(cfg.max_spec_factor * length))),
                                cfg.min_token_prob)
            if draft[1] > best[1]:
                best = draft
        return best[0]
