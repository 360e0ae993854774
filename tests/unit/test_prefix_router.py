"""The prefix-affinity routing policy, without Ray: affinity, load and KV fallbacks, LRU, forgetting."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from cluster.contracts.block_hash import block_hashes
from cluster.engine.block_manager import BlockManager
from cluster.engine.sequence import Sequence
from cluster.sampling_params import SamplingParams
from cluster.serving.router import (
    PrefixAffinityConfig,
    PrefixAffinityPolicy,
    replica_load,
    reported_kv_usage,
    routing_tokens_of,
)


def make_policy(**overrides) -> PrefixAffinityPolicy:
    return PrefixAffinityPolicy(PrefixAffinityConfig(**{"block_size": 4, **overrides}), rng=random.Random(0))


def idle(*ids, kv: float = 0.0):
    return [(rid, 0, kv) for rid in ids]


def route(policy, candidates, tokens):
    """choose + record, as the router does."""
    rid = policy.choose(candidates, tokens)
    policy.record(rid, tokens)
    return rid


SYSTEM = list(range(1000, 1040))  # a 40-token shared system prompt (10 blocks of 4)


def test_block_hashes_are_prefix_hashes():
    a = block_hashes(list(range(10)), 4)
    b = block_hashes(list(range(8)) + [99, 98, 97], 4)
    assert len(a) == 2 and a == b  # trailing partial block ignored; equal first 8 tokens
    assert block_hashes(list(range(8)), 4)[0] != block_hashes([9] + list(range(1, 8)), 4)[0]
    assert block_hashes([4, 5, 6, 7], 4) != block_hashes(list(range(8)), 4)[1:]  # position matters
    assert block_hashes([1, 2, 3], 4) == [] and block_hashes([], 4) == []


def test_the_router_names_blocks_as_the_replicas_prefix_cache_does():
    """The hashes the router records for a prompt are the ones a replica's block manager registers
    for it, block for block: affinity follows real cache blocks."""
    prompt = list(range(100, 123))  # 5 full blocks of 4 and 3 tokens more
    manager = BlockManager(num_blocks=16, block_size=4)
    seq = Sequence("r", prompt, SamplingParams())
    manager.allocate_prefix(seq)
    manager.append(seq, len(prompt))
    seq.num_computed_tokens = len(prompt)  # as after the prefill step
    manager.commit(seq)
    assert seq.block_hashes == block_hashes(prompt, 4) == list(make_policy().hashes(prompt))
    assert [manager.cached_block_id(h) for h in seq.block_hashes] == seq.block_ids[:5]


def test_shared_prefix_goes_to_same_replica():
    policy = make_policy()
    replicas = idle("a", "b", "c", "d")
    first = route(policy, replicas, SYSTEM + [1, 2, 3, 4, 5])
    for i in range(20):
        assert route(policy, replicas, SYSTEM + [7, i, i + 1, 9, 10, 11]) == first
    decision = policy.decide(replicas, SYSTEM + [42] * 8)
    assert decision.reason == "prefix" and decision.matched_blocks == len(SYSTEM) // 4


def test_longest_prefix_wins():
    policy = make_policy()
    replicas = idle("a", "b")
    policy.record("a", SYSTEM[:8])  # 2 blocks
    policy.record("b", SYSTEM[:24])  # 6 blocks
    decision = policy.decide(replicas, SYSTEM)
    assert decision.replica_id == "b" and decision.matched_blocks == 6


def test_a_short_shared_prefix_does_not_pin_new_conversations_to_a_busy_replica():
    """Every conversation starts with the same 8-token system prompt (2 blocks of a ~40-token
    first turn: 20%): a busier replica holding it yields to an idle one; a long match keeps its
    replica though it is busier, and a short match still wins a tie on load."""
    policy = make_policy(min_match_fraction=0.3)
    system = SYSTEM[:8]
    route(policy, [("a", 0, 0.0)], system + [1] * 32)
    decision = policy.decide([("a", 1, 0.0), ("b", 0, 0.0)], system + [2] * 32)
    assert decision.replica_id == "b" and decision.reason == "short_match" and decision.matched_blocks == 2
    assert policy.decide([("a", 0, 0.0), ("b", 0, 0.0)], system + [2] * 32).replica_id == "a"  # no cost
    second_turn = system + [1] * 32 + [3] * 20  # 40 of its 60 tokens were this conversation's first turn
    assert policy.decide([("a", 2, 0.0), ("b", 0, 0.0)], second_turn).reason == "prefix"


def test_distinct_prefixes_spread_by_load():
    policy = make_policy()
    load = {"a": 0, "b": 0, "c": 0}
    for i in range(30):
        candidates = [(rid, n, 0.0) for rid, n in load.items()]
        rid = route(policy, candidates, [i] * 12)  # no two prompts share a first block
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
    old = [7] * 8  # 2 blocks
    policy.record("a", old)
    for i in range(20):
        policy.record("a", [i + 100] * 8)
        assert policy.num_entries("a") <= 10
    assert policy.num_entries("a") == 10
    assert policy.match_length("a", block_hashes(old, 4)) == 0
    assert policy.match_length("a", block_hashes([119] * 8, 4)) == 2  # newest kept


def test_lru_touch_keeps_a_hot_prefix():
    policy = make_policy(max_entries_per_replica=6)
    for i in range(10):
        policy.record("a", SYSTEM[:8] + [i] * 4)  # hot 2-block prefix + 1 fresh block each time
    assert policy.match_length("a", block_hashes(SYSTEM[:8], 4)) == 2


def test_overlong_prompt_keeps_its_root_blocks():
    policy = make_policy(max_entries_per_replica=3)
    policy.record("a", SYSTEM)  # 10 blocks, only 3 fit: the first 3 are kept, so matching still works
    assert policy.num_entries("a") == 3
    assert policy.match_length("a", block_hashes(SYSTEM, 4)) == 3


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


def test_token_list_inputs_and_untokenized_requests():
    policy = make_policy(block_size=8)
    replicas = idle("a", "b", "c")
    tokens = list(range(50, 90))
    first_ids = route(policy, replicas, tokens)
    assert all(route(policy, replicas, tokens + [i]) == first_ids for i in range(10))
    assert block_hashes(tuple(tokens), 8) == block_hashes(tokens, 8)
    assert policy.decide(replicas, [1, 2, 3]).reason == "no_match"  # shorter than one block
    assert policy.decide(replicas, None).reason == "no_match"  # not tokenized: by load


def test_choose_needs_candidates():
    with pytest.raises(ValueError):
        make_policy().choose([], SYSTEM)


def test_config_validation():
    with pytest.raises(ValueError):
        PrefixAffinityConfig(block_size=0)
    with pytest.raises(ValueError):
        PrefixAffinityConfig(max_entries_per_replica=0)
    with pytest.raises(ValueError):
        PrefixAffinityConfig(min_match_fraction=1.5)
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
    assert routing_tokens_of(pending(EngineRequest("r2", prompt="hello"))) is None  # not tokenized yet
    chat = EngineRequest("r3", messages=[{"role": "user", "content": "hi"}])
    assert routing_tokens_of(pending(chat)) is None
    assert routing_tokens_of(pending("not a request")) is None
    assert routing_tokens_of(pending()) is None and routing_tokens_of(None) is None
