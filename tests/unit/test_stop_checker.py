"""StopChecker: stop tokens, stop strings, length limits and streaming holdback."""

from __future__ import annotations

from cluster.engine.sequence import FinishReason, Sequence
from cluster.engine.stop_checker import StopChecker, find_stop_string, stop_holdback
from cluster.sampling_params import SamplingParams

EOS = 2
CHECKER = StopChecker(eos_token_ids=frozenset({EOS}), max_model_len=20)


class _Stream:
    """Feeds (token, text piece) pairs to the checker the way the engine does."""

    def __init__(self, prompt_len: int = 3, **params):
        self.seq = Sequence("r", list(range(10, 10 + prompt_len)), SamplingParams(**params))
        self.text = ""

    def add(self, token_id: int, piece: str = "x") -> tuple[FinishReason | None, int | None]:
        self.seq.output_token_ids.append(token_id)
        self.text += piece
        return CHECKER.check(self.seq, self.text, len(piece))


def test_runs_on_without_a_stop_condition():
    assert _Stream(max_tokens=5).add(7) == (None, None)


def test_eos_stops_unless_ignored():
    assert _Stream().add(EOS) == (FinishReason.STOP, None)
    assert _Stream(ignore_eos=True).add(EOS) == (None, None)


def test_stop_token_ids_stop_even_with_ignore_eos():
    assert _Stream(stop_token_ids=[9], ignore_eos=True).add(9) == (FinishReason.STOP, None)


def test_stop_string_truncates_text_before_it():
    stream = _Stream(stop=["END"], max_tokens=10)
    assert stream.add(5, "Hello ") == (None, None)
    assert stream.add(6, "worldEND more") == (FinishReason.STOP, len("Hello world"))


def test_stop_string_across_a_token_boundary():
    stream = _Stream(stop=["\n\nUser:"], max_tokens=10)
    for piece in ["Sure", ".\n", "\nUs"]:
        assert stream.add(5, piece) == (None, None)
    assert stream.add(6, "er: hi") == (FinishReason.STOP, len("Sure."))


def test_earliest_stop_string_wins():
    stream = _Stream(stop=["cd", "b"], max_tokens=10)
    assert stream.add(5, "abcd") == (FinishReason.STOP, 1)


def test_min_tokens_delays_stop_token_and_string():
    stream = _Stream(min_tokens=3, stop=["!"], stop_token_ids=[9], max_tokens=10)
    assert stream.add(EOS) == (None, None)
    assert stream.add(9, "!") == (None, None)
    # The "!" seen under min_tokens is old text now: it must not stop the sequence later.
    assert stream.add(5, "ok") == (None, None)
    assert stream.add(EOS) == (FinishReason.STOP, None)


def test_stop_string_counts_once_min_tokens_is_reached():
    assert _Stream(min_tokens=1, stop=["!"]).add(5, "!") == (FinishReason.STOP, 0)


def test_max_tokens_is_length():
    stream = _Stream(max_tokens=2)
    assert stream.add(5) == (None, None)
    assert stream.add(6) == (FinishReason.LENGTH, None)


def test_stop_beats_length_on_the_same_token():
    assert _Stream(max_tokens=1).add(EOS) == (FinishReason.STOP, None)


def test_max_model_len_is_length():
    stream = _Stream(prompt_len=18, max_tokens=100)
    assert stream.add(5) == (None, None)
    assert stream.add(6) == (FinishReason.LENGTH, None)  # 18 + 2 == max_model_len


def test_find_stop_string_ignores_old_text():
    assert find_stop_string("stop and more", 4, ["stop"]) is None
    assert find_stop_string("xsto" + "p", 1, ["stop"]) == 1
    assert find_stop_string("anything", 0, ["any"]) is None
    assert find_stop_string("abc", 1, []) is None


def test_stop_holdback():
    assert stop_holdback("Hello wor", ["world!"]) == 3
    assert stop_holdback("Hello", ["\n\nUser:"]) == 0
    assert stop_holdback("Hi\n", ["\n\nUser:"]) == 1
    assert stop_holdback("Hi\n\nUs", ["\n\nUser:"]) == 4
    assert stop_holdback("ab", ["abc", "bcd"]) == 2
    assert stop_holdback("", ["abc"]) == 0
    assert stop_holdback("abc", []) == 0
