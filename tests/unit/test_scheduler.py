"""Scheduler: exact schedules for chunked prefill, FCFS, preemption, abort and finish."""

from __future__ import annotations

import pytest

from cluster.config import SchedulerConfig
from cluster.engine.block_manager import BlockManager
from cluster.engine.scheduler import Scheduler
from cluster.contracts.scheduler_output import ScheduledSequence, SchedulerOutput
from cluster.engine.sequence import FinishReason, Sequence, SequenceStatus
from cluster.errors import InvalidRequestError
from cluster.sampling_params import SamplingParams

BLOCK_SIZE = 4


def make_scheduler(num_blocks: int = 16, max_num_batched_tokens: int = 64, max_num_seqs: int = 8,
                   enable_prefix_caching: bool = True) -> Scheduler:
    config = SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs)
    return Scheduler(config, BlockManager(num_blocks, BLOCK_SIZE, enable_prefix_caching))


def add(sched: Scheduler, request_id: str, prompt_token_ids, max_tokens: int = 16) -> Sequence:
    seq = Sequence(request_id, list(prompt_token_ids), SamplingParams(max_tokens=max_tokens))
    sched.add(seq)
    return seq


def fake_tokens(output: SchedulerOutput) -> dict[str, list[int]]:
    """A deterministic 'sampled' token for every sequence that needs one."""
    return {s.request_id: [1000 + s.context_length] for s in output.sequences if s.needs_sample}


def step(sched: Scheduler) -> SchedulerOutput:
    """schedule -> fake execute -> update, finishing sequences that reach max_tokens."""
    output = sched.schedule()
    for seq, _ in sched.update(output, fake_tokens(output)):
        if seq.num_output_tokens >= seq.sampling_params.max_tokens:
            sched.finish(seq.request_id, FinishReason.LENGTH)
    sched.block_manager.check_invariants()
    return output


def summary(output: SchedulerOutput) -> list[tuple]:
    """(id, start, num_tokens, block_ids, needs_sample, is_prefill) per scheduled sequence."""
    return [(s.request_id, s.start_position, s.num_tokens, s.block_ids, s.needs_sample, s.is_prefill)
            for s in output.sequences]


def test_prefill_then_decode_exact_blocks():
    sched = make_scheduler()
    seq = add(sched, "a", range(6))
    out = step(sched)
    assert out.sequences == [ScheduledSequence("a", [0, 1, 2, 3, 4, 5], 0, [0, 1], True, True)]
    assert seq.output_token_ids == [1006] and seq.num_computed_tokens == 6
    out = step(sched)
    assert out.sequences == [ScheduledSequence("a", [1006], 6, [0, 1], True, False)]
    assert summary(step(sched)) == [("a", 7, 1, [0, 1], True, False)]
    assert summary(step(sched)) == [("a", 8, 1, [0, 1, 2], True, False)]  # token 8 opens block 2
    assert seq.output_token_ids == [1006, 1007, 1008, 1009]


def test_chunked_prefill_splits_long_prompt_under_budget():
    sched = make_scheduler(max_num_batched_tokens=8)
    seq = add(sched, "a", range(20))
    outputs = [sched.schedule()]
    assert sched.update(outputs[0], {"a": [5]}) == []  # a token for a mid-prompt chunk is ignored
    assert seq.output_token_ids == [] and seq.num_computed_tokens == 8
    assert summary(outputs[0]) == [("a", 0, 8, [0, 1], False, True)]
    assert outputs[0].sequences[0].token_ids == list(range(8))
    out = sched.schedule()
    sched.update(out, {})
    assert summary(out) == [("a", 8, 8, [0, 1, 2, 3], False, True)]
    out = sched.schedule()
    assert summary(out) == [("a", 16, 4, [0, 1, 2, 3, 4], True, True)]
    assert out.sequences[0].token_ids == [16, 17, 18, 19]
    assert sched.update(out, {"a": [7]}) == [(seq, 1)]
    assert seq.output_token_ids == [7] and seq.num_computed_tokens == 20


def test_decodes_mixed_with_prefill_chunk_in_one_step():
    sched = make_scheduler(max_num_batched_tokens=8)
    add(sched, "a", range(5))
    add(sched, "b", range(100, 112))
    assert summary(step(sched)) == [("a", 0, 5, [0, 1], True, True), ("b", 0, 3, [2], False, True)]
    out = step(sched)
    assert summary(out) == [("a", 5, 1, [0, 1], True, False), ("b", 3, 7, [2, 3, 4], False, True)]
    assert out.num_batched_tokens == 8
    assert summary(step(sched)) == [("a", 6, 1, [0, 1], True, False), ("b", 10, 2, [2, 3, 4], True, True)]


def test_decodes_listed_before_prefills_whatever_the_running_order():
    sched = make_scheduler()
    add(sched, "a", range(3))
    step(sched)
    add(sched, "b", range(10, 16))
    sched.schedule()  # admit b, then pretend its step never ran so it is still prefilling
    sched.running.reverse()  # an older prefill ahead of a decode
    out = sched.schedule()
    assert [(s.request_id, s.is_prefill) for s in out.sequences] == [("a", False), ("b", True)]


def test_max_num_seqs_caps_running():
    sched = make_scheduler(max_num_seqs=2)
    for request_id in "abc":
        add(sched, request_id, range(3), max_tokens=2)
    out = step(sched)
    assert [s.request_id for s in out.sequences] == ["a", "b"]
    assert (sched.num_running, sched.num_waiting) == (2, 1)
    out = step(sched)  # a and b reach max_tokens and finish after this step
    assert [s.request_id for s in out.sequences] == ["a", "b"]
    out = step(sched)
    assert [s.request_id for s in out.sequences] == ["c"]
    assert out.finished_request_ids == ["a", "b"]


def test_fcfs_never_skips_a_blocked_request():
    sched = make_scheduler(num_blocks=4)
    add(sched, "a", range(8))  # 2 blocks
    add(sched, "b", range(100, 112))  # 3 blocks: does not fit next to a
    add(sched, "c", range(200, 202))  # 1 block: would fit, but must wait behind b
    out = sched.schedule()
    assert summary(out) == [("a", 0, 8, [0, 1], True, True)]
    assert [s.request_id for s in sched.waiting] == ["b", "c"]
    assert sched.block_manager.free_block_ids() == [2, 3]
    assert sched.block_manager.prefix_cache_queries == 8  # b's failed admission was rolled back


def test_fcfs_admission_order():
    sched = make_scheduler(max_num_batched_tokens=6)
    for request_id in "abc":
        add(sched, request_id, range(3))
    assert [s.request_id for s in step(sched).sequences] == ["a", "b"]
    assert summary(step(sched)) == [("a", 3, 1, [0], True, False), ("b", 3, 1, [1], True, False),
                                    ("c", 0, 3, [2], True, True)]


def test_preemption_requeues_newest_at_front_and_recomputes():
    sched = make_scheduler(num_blocks=4, max_num_seqs=4)
    a = add(sched, "a", range(7), max_tokens=3)
    b = add(sched, "b", range(100, 107), max_tokens=3)
    assert summary(step(sched)) == [("a", 0, 7, [0, 1], True, True), ("b", 0, 7, [2, 3], True, True)]
    assert summary(step(sched)) == [("a", 7, 1, [0, 1], True, False), ("b", 7, 1, [2, 3], True, False)]
    add(sched, "c", range(200, 203))
    out = step(sched)  # a needs a third block; none free, so b (newest) is preempted
    assert out.preempted_request_ids == ["b"]
    assert summary(out) == [("a", 8, 1, [0, 1, 3], True, False)]  # b's tail block 3 went first
    assert (b.status, b.num_computed_tokens, b.num_preemptions) == (SequenceStatus.WAITING, 0, 1)
    assert b.block_ids == [] and b.output_token_ids == [1007, 1008]
    assert [s.request_id for s in sched.waiting] == ["b", "c"]  # ahead of the later arrival
    assert a.is_finished and a.finish_reason is FinishReason.LENGTH
    out = step(sched)
    # b hits its own first block (2, still cached); block 3 was evicted, so recompute from 4.
    assert summary(out) == [("b", 4, 5, [2, 1, 3], True, True), ("c", 0, 3, [0], True, True)]
    assert out.sequences[0].token_ids == [104, 105, 106, 1007, 1008]
    assert b.num_cached_tokens == 4 and b.output_token_ids == [1007, 1008, 1009]
    assert b.is_finished and out.finished_request_ids == ["a"]


def test_preemption_without_prefix_cache_recomputes_from_zero():
    sched = make_scheduler(num_blocks=4, enable_prefix_caching=False)
    add(sched, "a", range(7))
    b = add(sched, "b", range(100, 107))
    step(sched)
    step(sched)
    assert step(sched).preempted_request_ids == ["b"]
    sched.finish("a", FinishReason.STOP)
    assert sched.block_manager.free_block_ids() == [2, 3, 1, 0]
    out = step(sched)
    assert summary(out) == [("b", 0, 9, [1, 2, 3], True, True)]  # new blocks ascend
    assert b.num_preemptions == 1 and b.num_computed_tokens == 9


def test_sequence_that_needs_blocks_preempts_itself_when_newest():
    sched = make_scheduler(num_blocks=2)
    add(sched, "a", range(3))
    b = add(sched, "b", range(100, 104))
    step(sched)
    add(sched, "c", range(200, 201))
    out = step(sched)  # a's 4th token fits block 0; b's 5th needs a block and b is the newest
    assert summary(out) == [("a", 3, 1, [0], True, False)]
    assert out.preempted_request_ids == ["b"]
    assert [s.request_id for s in sched.waiting] == ["b", "c"]  # no admission after a preemption
    assert b.block_ids == [] and sched.block_manager.free_block_ids() == [1]


def test_prefix_hit_schedules_only_the_suffix():
    sched = make_scheduler()
    add(sched, "a", range(10), max_tokens=1)
    step(sched)
    assert sched.block_manager.free_block_ids() == list(range(3, 16)) + [2, 1, 0]
    b = add(sched, "b", list(range(8)) + [77, 78])
    out = step(sched)
    assert summary(out) == [("b", 8, 2, [0, 1, 3], True, True)]
    assert b.num_cached_tokens == 8
    bm = sched.block_manager
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (20, 8)


def test_abort_waiting_request():
    sched = make_scheduler()
    seq = add(sched, "a", range(5))
    assert sched.abort("a") is seq
    assert (seq.status, seq.finish_reason) == (SequenceStatus.FINISHED, FinishReason.ABORT)
    assert not sched.has_unfinished() and sched.get("a") is None
    out = sched.schedule()
    assert out.is_empty and out.finished_request_ids == ["a"]
    assert sched.schedule().finished_request_ids == []
    assert sched.abort("a") is None and sched.abort("unknown") is None


def test_abort_mid_prefill_frees_blocks_now():
    sched = make_scheduler(max_num_batched_tokens=8)
    seq = add(sched, "a", range(20))
    step(sched)
    assert sched.block_manager.num_free_blocks == 14
    sched.abort("a")
    assert sched.block_manager.num_free_blocks == 16 and seq.block_ids == []
    assert sched.num_running == 0 and sched.schedule().finished_request_ids == ["a"]


def test_abort_while_decoding_frees_blocks_now():
    sched = make_scheduler()
    seq = add(sched, "a", range(6))
    step(sched)
    step(sched)
    assert seq.num_output_tokens == 2 and sched.block_manager.num_free_blocks == 14
    sched.abort("a")
    assert sched.block_manager.num_free_blocks == 16 and sched.block_manager.usage == 0.0
    assert seq.finish_reason is FinishReason.ABORT


def test_update_skips_request_aborted_during_the_step():
    sched = make_scheduler()
    a = add(sched, "a", range(5))
    b = add(sched, "b", range(10, 15))
    out = sched.schedule()
    sched.abort("a")
    assert sched.update(out, {"a": [1], "b": [2]}) == [(b, 1)]
    assert a.output_token_ids == [] and a.num_computed_tokens == 0
    assert b.output_token_ids == [2] and b.num_computed_tokens == 5
    assert sched.block_manager.free_block_ids()[-2:] == [1, 0]
    sched.block_manager.check_invariants()


def test_finish_reports_once_and_keeps_reason():
    sched = make_scheduler()
    seq = add(sched, "a", range(5))
    step(sched)
    assert sched.finish("a", FinishReason.STOP) is seq
    assert (seq.status, seq.finish_reason) == (SequenceStatus.FINISHED, FinishReason.STOP)
    assert sched.block_manager.num_free_blocks == 16
    assert sched.schedule().finished_request_ids == ["a"]
    assert sched.schedule().finished_request_ids == []


def test_run_to_completion_with_tight_memory():
    sched = make_scheduler(num_blocks=6, max_num_batched_tokens=8)
    seqs = [add(sched, f"r{i}", range(i * 10, i * 10 + 6), max_tokens=5) for i in range(4)]
    for _ in range(40):
        if not sched.has_unfinished():
            break
        step(sched)
    assert all(s.is_finished and s.num_output_tokens == 5 for s in seqs)
    assert sum(s.num_preemptions for s in seqs) > 0
    assert sched.block_manager.num_free_blocks == 6


def test_duplicate_request_id_rejected():
    sched = make_scheduler()
    add(sched, "a", range(3))
    with pytest.raises(InvalidRequestError, match="request_id"):
        add(sched, "a", range(3))


def test_update_ignores_request_re_added_after_abort():
    sched = make_scheduler()
    add(sched, "a", range(5))
    out = sched.schedule()
    sched.abort("a")
    fresh = add(sched, "a", range(5))  # same id, new request: the old step's work is not its own
    assert sched.update(out, {"a": [1]}) == []
    assert fresh.num_computed_tokens == 0 and fresh.output_token_ids == []
    assert [s.request_id for s in sched.schedule().sequences] == ["a"]


def test_exact_trace_with_chained_preemptions():
    sched = make_scheduler(num_blocks=3, max_num_batched_tokens=3)
    for i, (request_id, num_prompt) in enumerate([("a", 1), ("b", 3), ("c", 5)]):
        add(sched, request_id, range(i * 100, i * 100 + num_prompt), max_tokens=6)
    trace = [(summary(out), out.preempted_request_ids) for out in (step(sched) for _ in range(12))]
    assert trace == [
        ([("a", 0, 1, [0], True, True), ("b", 0, 2, [1], False, True)], []),
        ([("a", 1, 1, [0], True, False), ("b", 2, 1, [1], True, True), ("c", 0, 1, [2], False, True)], []),
        ([("a", 2, 1, [0], True, False), ("b", 3, 1, [1], True, False), ("c", 1, 1, [2], False, True)], []),
        # b's 5th token needs a block: the newest (c) is preempted and b takes its block.
        ([("a", 3, 1, [0], True, False), ("b", 4, 1, [1, 2], True, False)], ["c"]),
        # a needs one too: b is now the newest; its tail block 2 is released (and reused) first.
        ([("a", 4, 1, [0, 2], True, False)], ["b"]),
        ([("a", 5, 1, [0, 2], True, False)], []),  # a finishes (max_tokens=6)
        # b resumes with its first block still cached; c follows it in FCFS order.
        ([("b", 4, 2, [1, 2], True, True), ("c", 0, 1, [0], False, True)], []),
        ([("b", 6, 1, [1, 2], True, False), ("c", 1, 2, [0], False, True)], []),
        # c needs a block and is itself the newest: it preempts itself, and nothing is
        # admitted in a step that preempted, though a block and 2 tokens of budget are free.
        ([("b", 7, 1, [1, 2], True, False)], ["c"]),
        ([("c", 0, 3, [0], False, True)], []),
        ([("c", 3, 2, [0, 2], True, True)], []),
        ([("c", 5, 1, [0, 2], True, False)], []),
    ]
    c = sched.get("c")
    assert (c.num_preemptions, c.num_output_tokens) == (2, 2)
    for _ in range(4):
        step(sched)
    assert not sched.has_unfinished() and c.num_output_tokens == 6 and sched.block_manager.num_free_blocks == 3
