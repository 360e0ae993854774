"""The prefix-affinity routing policy, without Ray: affinity, load and KV fallbacks, LRU, forgetting."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from cluster.serving.router import (
    PrefixAffinityConfig,
    PrefixAffinityPolicy,
    chain_hashes,
    replica_load,
    reported_kv_usage,
    routing_tokens_of,
)


def make_policy(**overrides) -> PrefixAffinityPolicy:
    return PrefixAffinityPolicy(PrefixAffinityConfig(**{"chunk_size": 4, **overrides}), rng=random.Random(0))


def idle(*ids, kv: float = 0.0):
    return [(rid, 0, kv) for rid in ids]


def route(policy, candidates, tokens):
    """choose + record, as the router does."""
    rid = policy.choose(candidates, tokens)
    policy.record(rid, tokens)
    return rid


SYSTEM = list(range(1000, 1040))  # a 40-token shared system prompt (10 chunks of 4)


def test_chain_hashes_are_prefix_hashes():
    a = chain_hashes(list(range(10)), 4)
    b = chain_hashes(list(range(8)) + [99, 98, 97], 4)
    assert len(a) == 2 and a == b  # trailing partial chunk ignored; equal first 8 tokens
    assert chain_hashes(list(range(8)), 4)[0] != chain_hashes([9] + list(range(1, 8)), 4)[0]
    assert chain_hashes([4, 5, 6, 7], 4) != chain_hashes(list(range(8)), 4)[1:]  # position matters
    assert chain_hashes([1, 2, 3], 4) == [] and chain_hashes("", 4) == []


def test_shared_prefix_goes_to_same_replica():
    policy = make_policy()
    replicas = idle("a", "b", "c", "d")
    first = route(policy, replicas, SYSTEM + [1, 2, 3, 4, 5])
    for i in range(20):
        assert route(policy, replicas, SYSTEM + [7, i, i + 1, 9, 10, 11]) == first
    decision = policy.decide(replicas, SYSTEM + [42] * 8)
    assert decision.reason == "prefix" and decision.matched_chunks == len(SYSTEM) // 4


def test_longest_prefix_wins():
    policy = make_policy()
    replicas = idle("a", "b")
    policy.record("a", SYSTEM[:8])  # 2 chunks
    policy.record("b", SYSTEM[:24])  # 6 chunks
    decision = policy.decide(replicas, SYSTEM)
    assert decision.replica_id == "b" and decision.matched_chunks == 6


def test_distinct_prefixes_spread_by_load():
    policy = make_policy()
    load = {"a": 0, "b": 0, "c": 0}
    for i in range(30):
        candidates = [(rid, n, 0.0) for rid, n in load.items()]
        rid = route(policy, candidates, [i] * 12)  # no two prompts share a first chunk
        load[rid] += 1
    assert sorted(load.values()) == [10, 10, 10]


def test_no_match_breaks_load_ties_randomly():
    policy = make_policy()
    picks = {policy.choose(idle("a", "b", "c"), [i] * 8) for i in range(50)}
    assert picks == {"a", "b", "c"}


def test_imbalance_threshold_triggers_fallback():
    policy = make_policy(imbalance_threshold=8)
    policy.record("a", SYSTEM)
    at_threshold = policy.decide([("a", 10, 0.0), ("b", 2, 0.0)], SYSTEM)
    assert at_threshold.replica_id == "a" and at_threshold.reason == "prefix"  # 8 is not more than 8
    over = policy.decide([("a", 11, 0.0), ("b", 2, 0.0), ("c", 5, 0.0)], SYSTEM)
    assert over.replica_id == "b" and over.reason == "imbalance"


def test_kv_usage_cap_triggers_fallback():
    policy = make_policy(max_kv_usage=0.95)
    policy.record("a", SYSTEM)
    assert policy.choose([("a", 3, 0.95), ("b", 0, 0.1)], SYSTEM) == "a"  # at the cap is fine
    decision = policy.decide([("a", 0, 0.96), ("b", 4, 0.99), ("c", 5, 0.2)], SYSTEM)
    # "a" is over the cap; the fallback also skips "b" (over the cap) despite its lower load.
    assert decision.replica_id == "c" and decision.reason == "kv_cache"


def test_tied_matches_prefer_the_least_loaded():
    policy = make_policy()
    policy.record("a", SYSTEM)
    policy.record("b", SYSTEM)
    assert policy.choose([("a", 5, 0.0), ("b", 1, 0.0), ("c", 0, 0.0)], SYSTEM) == "b"


def test_lru_bound_holds_and_evicts_oldest_prompts():
    policy = make_policy(max_entries_per_replica=10)
    old = [7] * 8  # 2 chunks
    policy.record("a", old)
    for i in range(20):
        policy.record("a", [i + 100] * 8)
        assert policy.num_entries("a") <= 10
    assert policy.num_entries("a") == 10
    assert policy.match_length("a", chain_hashes(old, 4)) == 0
    assert policy.match_length("a", chain_hashes([119] * 8, 4)) == 2  # newest kept


def test_lru_touch_keeps_a_hot_prefix():
    policy = make_policy(max_entries_per_replica=6)
    for i in range(10):
        policy.record("a", SYSTEM[:8] + [i] * 4)  # hot 2-chunk prefix + 1 fresh chunk each time
    assert policy.match_length("a", chain_hashes(SYSTEM[:8], 4)) == 2


def test_overlong_prompt_keeps_its_root_chunks():
    policy = make_policy(max_entries_per_replica=3)
    policy.record("a", SYSTEM)  # 10 chunks, only 3 fit: the first 3 are kept, so matching still works
    assert policy.num_entries("a") == 3
    assert policy.match_length("a", chain_hashes(SYSTEM, 4)) == 3


def test_removed_replicas_are_forgotten():
    policy = make_policy()
    policy.record("a", SYSTEM)
    policy.record("b", [5] * 8)
    policy.record("c", [6] * 8)
    policy.retain(["b", "c", "d"])
    assert policy.known_replicas() == {"b", "c"}
    policy.forget("b")
    assert policy.known_replicas() == {"c"} and policy.num_entries("b") == 0
    # A new replica never sees the old affinity: "a"'s prefix now has no match.
    assert policy.decide(idle("c", "d"), SYSTEM).reason == "no_match"


def test_str_and_token_list_inputs():
    policy = make_policy(chunk_size=8)
    replicas = idle("a", "b", "c")
    text = "You are a helpful assistant. Answer briefly. "
    first = route(policy, replicas, text + "What is 2+2?")
    assert all(route(policy, replicas, text + f"Question {i}?") == first for i in range(10))
    tokens = list(range(50, 90))
    first_ids = route(policy, replicas, tokens)
    assert all(route(policy, replicas, tokens + [i]) == first_ids for i in range(10))
    assert chain_hashes(tuple(tokens), 8) == chain_hashes(tokens, 8)
    assert policy.decide(replicas, "short").reason == "no_match"  # shorter than one chunk
    assert policy.decide(replicas, None).reason == "no_match"


def test_choose_needs_candidates():
    with pytest.raises(ValueError):
        make_policy().choose([], SYSTEM)


def test_config_validation():
    with pytest.raises(ValueError):
        PrefixAffinityConfig(chunk_size=0)
    with pytest.raises(ValueError):
        PrefixAffinityConfig(max_entries_per_replica=0)
    with pytest.raises(TypeError):
        PrefixAffinityConfig(chunk=8)  # a misspelt router kwarg fails loudly


def test_load_and_kv_from_routing_stats():
    stats = {"num_running": 3, "num_waiting": 4, "kv_cache_usage": 0.5}
    assert replica_load(stats, None) == 7
    assert replica_load(stats, 9) == 9  # Serve's fresher count wins; the two are not added
    assert replica_load({}, 2) == 2 and replica_load(None, None) == 0
    assert reported_kv_usage(stats) == 0.5 and reported_kv_usage({}) == 0.0


def test_routing_tokens_from_engine_request():
    from cluster.serving.engine_request import EngineRequest

    def pending(*args):
        return SimpleNamespace(args=list(args), kwargs={})

    assert routing_tokens_of(pending(EngineRequest("r1", prompt_token_ids=[1, 2, 3]))) == [1, 2, 3]
    assert routing_tokens_of(pending(EngineRequest("r2", prompt="hello"))) == "hello"
    chat = EngineRequest("r3", messages=[{"role": "user", "content": "hi"}])
    assert isinstance(routing_tokens_of(pending(chat)), str)
    assert routing_tokens_of(pending("not a request")) is None
    assert routing_tokens_of(pending()) is None and routing_tokens_of(None) is None
