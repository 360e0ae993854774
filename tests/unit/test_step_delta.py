"""StepDelta: the workers' mirror, fed only what changed, rebuilds exactly the scheduler's step.

A seeded random workload (shared prefixes, preemption under a tight cache, aborts, re-added
request ids) runs through the real scheduler; every step is encoded, pickled, decoded and
compared with the original, and the deltas must stay small as contexts grow.
"""

from __future__ import annotations

import pickle
import random

import pytest

from cluster.config import SchedulerConfig
from cluster.engine.block_manager import BlockManager
from cluster.engine.scheduler import Scheduler
from cluster.contracts.scheduler_output import NewRequest, SchedulerOutput
from cluster.engine.sequence import FinishReason, Sequence
from cluster.parallel.step_delta import StepDecoder, StepEncoder
from cluster.sampling_params import SamplingParams

BLOCK_SIZE = 4


def _same_step(decoded: SchedulerOutput, original: SchedulerOutput) -> None:
    assert decoded.sequences == original.sequences
    assert decoded.finished_request_ids == original.finished_request_ids
    assert decoded.preempted_request_ids == original.preempted_request_ids
    assert [r.request_id for r in decoded.new_requests] == [r.request_id for r in original.new_requests]


@pytest.mark.parametrize("speculate", [False, True], ids=["plain", "speculative"])
@pytest.mark.parametrize("seed", range(4))
def test_random_workload_round_trips_step_by_step(seed, speculate):
    """With ``speculate`` decodes carry drafts, of which a random prefix is accepted: the accepted
    drafts reach the workers' mirrors as the request's own tokens, the rejected ones never do."""
    rng = random.Random(seed)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=24, max_num_seqs=6), BlockManager(12, BLOCK_SIZE))
    encoder, decoder = StepEncoder(), StepDecoder()
    shared = [rng.randrange(100) for _ in range(12)]
    unsent: list[NewRequest] = []
    preemptions = aborts = drafted = 0
    for step in range(300):
        if rng.random() < 0.3 and len(sched._requests) < 10:
            rid = f"r{rng.randrange(15)}"  # ids repeat: an id may come back after it finished
            if sched.get(rid) is None:
                prompt = shared[: rng.randrange(1, 12)] + [rng.randrange(100) for _ in range(rng.randrange(1, 14))]
                seq = Sequence(rid, prompt, SamplingParams(max_tokens=rng.randrange(1, 30)))
                sched.add(seq)
                unsent = [r for r in unsent if r.request_id != rid]
                unsent.append(NewRequest(rid, list(prompt), seq.sampling_params, 0))
        if rng.random() < 0.05 and sched.running:
            victim = rng.choice(sched.running).request_id
            sched.abort(victim)
            unsent = [r for r in unsent if r.request_id != victim]
            aborts += 1
        if speculate:
            for seq in sched.running:
                if seq.output_token_ids and seq.num_computed_tokens == seq.num_tokens - 1:
                    seq.draft_token_ids = [rng.randrange(100) for _ in range(rng.randrange(4))]
        out = sched.schedule()
        out.new_requests, unsent = unsent, []
        preemptions += len(out.preempted_request_ids)
        drafted += sum(s.num_draft_tokens for s in out.sequences)
        delta = pickle.loads(pickle.dumps(encoder.encode(out)))
        _same_step(decoder.decode(delta), out)
        # The workers mirror exactly the live requests: finished and aborted ones are dropped.
        assert set(decoder._requests) == set(sched._requests), f"step {step}"
        for rid, mirror in decoder._requests.items():
            assert mirror.token_ids == sched.get(rid).all_token_ids[:len(mirror.token_ids)], f"step {step}"
        sampled = {}
        for s in out.sequences:
            if s.needs_sample:
                accepted = rng.randrange(s.num_draft_tokens + 1)
                sampled[s.request_id] = s.token_ids[s.num_tokens - s.num_draft_tokens:][:accepted] + \
                    [rng.randrange(100)]
        for seq, _ in sched.update(out, sampled):
            if seq.num_output_tokens >= seq.sampling_params.max_tokens:
                sched.finish(seq.request_id, FinishReason.LENGTH)
    assert preemptions > 0 and aborts > 0, "the workload must exercise preemption and abort"
    assert (drafted > 0) == speculate
    out = sched.schedule()  # flush the last finished ids
    _same_step(decoder.decode(pickle.loads(pickle.dumps(encoder.encode(out)))), out)
    assert decoder.num_requests == len(sched._requests)
    assert set(decoder._requests) == set(sched._requests)


def test_decode_steps_send_one_token_and_only_new_blocks():
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4), BlockManager(64, BLOCK_SIZE))
    encoder, decoder = StepEncoder(), StepDecoder()
    prompt = list(range(10))
    seq = Sequence("a", prompt, SamplingParams(max_tokens=40))
    sched.add(seq)
    out = sched.schedule()
    out.new_requests = [NewRequest("a", prompt, seq.sampling_params, 0)]
    delta = encoder.encode(out)
    assert delta.sequences[0].new_token_ids == []  # the prompt travelled once, in new_requests
    assert delta.sequences[0].new_block_ids == out.sequences[0].block_ids
    decoder.decode(delta)
    sched.update(out, {"a": [500]})
    new_blocks = []
    for i in range(20):
        out = sched.schedule()
        delta = encoder.encode(out)
        (d,) = delta.sequences
        assert d.new_token_ids == [500 + i] and d.num_tokens == 1
        new_blocks += d.new_block_ids
        assert len(d.new_block_ids) <= 1
        _same_step(decoder.decode(delta), out)
        sched.update(out, {"a": [501 + i]})
    assert new_blocks == seq.block_ids[3:]  # 10 prompt tokens filled blocks 0..2


def test_bytes_sent_per_decode_step_do_not_grow_with_context():
    """A 300-token prompt decoding 300 more: each pickled StepDelta stays the same size (give or
    take a new block id and an int's width), while the full SchedulerOutput grows with the table."""
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=512, max_num_seqs=4), BlockManager(256, BLOCK_SIZE))
    encoder = StepEncoder()
    prompt = [7] * 300
    seq = Sequence("a", prompt, SamplingParams(max_tokens=400))
    sched.add(seq)
    out = sched.schedule()
    out.new_requests = [NewRequest("a", prompt, seq.sampling_params, 0)]
    assert len(pickle.dumps(encoder.encode(out))) > len(pickle.dumps(prompt))  # the prompt travels once
    sched.update(out, {"a": [40000]})
    delta_sizes, full_sizes = [], []
    for i in range(300):
        out = sched.schedule()
        delta_sizes.append(len(pickle.dumps(encoder.encode(out))))
        full_sizes.append(len(pickle.dumps(out)))
        sched.update(out, {"a": [40001 + i]})
    assert full_sizes[-1] - full_sizes[0] > 100, "guard: the full step must grow with the block table"
    assert max(delta_sizes) - min(delta_sizes) <= 8, f"delta sizes {min(delta_sizes)}..{max(delta_sizes)} bytes"
