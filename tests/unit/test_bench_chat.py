"""The multi-turn chat benchmark's ideal: what one unbounded prefix cache would have served."""

from __future__ import annotations

from cluster.bench_chat import Turn, ideal_cached_tokens, user_message

SYSTEM = list(range(1000, 1010))  # 10 tokens: 2 full blocks of 4 and a partial one


def turn(c, t, sent, finished, prompt, output, cached=0) -> Turn:
    return Turn(c, t, sent, finished, prompt, output, cached)


def test_a_conversations_turns_hit_what_the_last_turn_computed_by_whole_blocks():
    first = turn(0, 0, 0.0, 1.0, SYSTEM + [1, 2], [50, 51, 52, 53, 54])  # 12 prompt tokens, 5 generated
    # Turn 2 extends prompt and reply (the reply's last token was never computed: 16 tokens known).
    second = turn(0, 1, 2.0, 3.0, SYSTEM + [1, 2] + [50, 51, 52, 53, 54] + [7, 8, 9], [60])
    assert ideal_cached_tokens([first], 4) == 0
    assert ideal_cached_tokens([first, second], 4) == 16  # blocks 0-3 (tokens 0-15)


def test_only_what_was_computed_before_a_request_was_sent_counts():
    a = turn(0, 0, 0.0, 5.0, SYSTEM + [1, 2], [50, 51, 52, 53, 54])
    b = turn(1, 0, 1.0, 2.0, SYSTEM + [3, 4, 5, 6], [70])  # sent while a ran: a's prompt only
    c = turn(0, 1, 6.0, 7.0, SYSTEM + [1, 2, 50, 51, 52, 53, 54, 9], [71])
    early = turn(2, 0, -1.0, -0.5, [9] * 12, [9])  # shares nothing
    assert ideal_cached_tokens([a, b], 4) == 8  # the two system blocks
    assert ideal_cached_tokens([a, b, c, early], 4) == 8 + 16


def test_a_fully_cached_prompt_still_computes_its_last_token():
    a = turn(0, 0, 0.0, 1.0, list(range(8)), [100])
    again = turn(1, 0, 2.0, 3.0, list(range(8)), [100])
    assert ideal_cached_tokens([a, again], 4) == 4  # (8 - 1) // 4 blocks


def test_user_messages_are_seeded_and_distinct():
    assert user_message(1, 2, 10, seed=3) == user_message(1, 2, 10, seed=3)
    assert user_message(1, 2, 10, seed=3) != user_message(2, 2, 10, seed=3)
