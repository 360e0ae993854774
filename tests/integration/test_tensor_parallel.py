"""Tensor parallelism over Ray worker actors (gloo on CPU).

A tp > 1 engine must produce the tp=1 engine's greedy tokens and (float32) logits, hold
about 1/tp of the weights on each rank, refuse a tp the head counts cannot serve, die
cleanly and promptly when a worker dies or hangs, and leave nothing behind.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import torch

from cluster.engine.async_engine import AsyncLLMEngine
from cluster.errors import EngineDeadError, InvalidConfigError
from cluster.llm import LLM
from cluster.sampling_params import SamplingParams
from cluster.swiftkv.checkpoint import save_params
from tests.conftest import live_actor_ids, placement_group_state, state_address
from tests.integration.test_swiftkv import GREEDY as SWIFTKV_GREEDY
from tests.integration.test_swiftkv import dense_reference, perturbed_params, prompts_with_shared_prefixes

MAX_TOKENS = 64
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
LOGIT_TOLERANCE = 1e-3
WORKER = "_RayWorker"


def tiny_prompts() -> list[list[int]]:
    return [[(17 * i + 31 * j) % 4000 + 100 for j in range(5 + 9 * i)] for i in range(8)]


def generate_tokens(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)]


def max_logit_difference(reference: LLM, llm: LLM, sequences: list[list[int]]) -> float:
    worst = 0.0
    for seq in sequences:
        expected = reference.engine.executor.collective_rpc("score", seq)
        actual = llm.engine.executor.collective_rpc("score", seq)
        assert actual.shape == expected.shape == (len(seq), reference.engine.arch.vocab_size)
        worst = max(worst, (actual - expected).abs().max().item())
    return worst


def assert_rank_bytes_about_one_over_tp(reference: LLM, llm: LLM, tp: int) -> None:
    """Each rank holds ~1/tp of the weights; replicated norms (and replicated KV heads) aside."""
    model = reference.engine.executor.worker.runner.model
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    replicated = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "norm" in n)
    per_rank = llm.engine.executor.parameter_bytes
    assert len(per_rank) == tp
    ideal = (total - replicated) / tp + replicated
    for rank, nbytes in enumerate(per_rank):
        assert abs(nbytes - ideal) <= 0.05 * ideal, f"rank {rank}: {nbytes} bytes, ideal {ideal:.0f} of {total}"


@pytest.fixture(scope="module")
def tiny_reference(tiny_llama_dir):
    path = tiny_llama_dir("llama_untied")
    llm = LLM(model=path, dtype="float32")
    prompts = tiny_prompts()
    return path, llm, prompts, generate_tokens(llm, prompts)


@pytest.mark.parametrize("tp", [2, 4])
def test_tiny_model_matches_tp1(local_ray, tiny_reference, tp):
    """tp=2 splits 2 KV heads one per rank; tp=4 replicates each KV head on two ranks. At tp=2 the
    group also speculates (n-gram drafts verified across the ranks): greedy output stays tp=1's."""
    path, reference, prompts, expected = tiny_reference
    speculative = {"method": "ngram", "num_tokens": 3, "prompt_lookup_min": 1} if tp == 2 else None
    llm = LLM(model=path, dtype="float32", tensor_parallel_size=tp, worker_num_cpus=1, speculative=speculative)
    try:
        assert generate_tokens(llm, prompts) == expected
        if speculative:
            stats = llm.engine.stats()
            assert stats["spec_accepted_tokens"] > 0, stats
        sequences = [p + t for p, t in zip(prompts[:3], expected[:3])]
        assert max_logit_difference(reference, llm, sequences) <= LOGIT_TOLERANCE
        assert_rank_bytes_about_one_over_tp(reference, llm, tp)
    finally:
        llm.engine.shutdown()


def test_a_16_bit_kv_cache_is_split_by_head_like_a_float32_one(local_ray, tiny_llama_dir):
    """kv_cache_dtype reaches every rank: each allocates its heads in bfloat16 (half the bytes a
    block), and tp=2 reads them back as tp=1 does."""
    import torch

    from cluster.runner.kv_cache import block_bytes

    path = tiny_llama_dir("llama_untied")
    prompts = tiny_prompts()[:4]
    reference = LLM(model=path, dtype="float32", kv_cache_dtype="bfloat16")
    llm = LLM(model=path, dtype="float32", kv_cache_dtype="bfloat16", tensor_parallel_size=2, worker_num_cpus=1)
    try:
        assert generate_tokens(llm, prompts) == generate_tokens(reference, prompts)
        engine = llm.engine
        per_rank = engine.num_blocks * block_bytes(engine.arch, engine.plan.block_size, torch.bfloat16, 2)
        assert engine.executor.kv_cache_bytes == [per_rank, per_rank]
    finally:
        llm.engine.shutdown()
        reference.engine.shutdown()


@pytest.mark.slow
def test_smollm2_tp3_matches_tp1(local_ray, smollm2_path, smollm2_prompts):
    """SmolLM2-135M: 9 heads / 3 KV heads over 3 ranks, float32, 10 prompts x 64 tokens."""
    prompts = list(smollm2_prompts.values())
    assert len(prompts) >= 8
    reference = LLM(model=smollm2_path, dtype="float32")
    expected = generate_tokens(reference, prompts)
    llm = LLM(model=smollm2_path, dtype="float32", tensor_parallel_size=3, worker_num_cpus=1)
    try:
        assert generate_tokens(llm, prompts) == expected
        sequences = [smollm2_prompts["english"] + expected[0], smollm2_prompts["chat"] + expected[-2]]
        assert max_logit_difference(reference, llm, sequences) <= LOGIT_TOLERANCE
        assert_rank_bytes_about_one_over_tp(reference, llm, 3)
    finally:
        llm.engine.shutdown()
        reference.engine.shutdown()


def test_unservable_tp_is_refused_at_start_naming_both_numbers(local_ray, tiny_llama_dir):
    before = live_actor_ids(WORKER)
    with pytest.raises(InvalidConfigError) as err:
        LLM(model=tiny_llama_dir("llama_untied"), tensor_parallel_size=3)
    assert err.value.field == "tensor_parallel_size"
    assert "3" in str(err.value) and "4 attention heads" in str(err.value)
    assert live_actor_ids(WORKER) == before


def test_impossible_placement_fails_with_a_clear_error_and_no_leftovers(local_ray, tiny_llama_dir):
    with pytest.raises(InvalidConfigError) as err:
        LLM(model=tiny_llama_dir("llama_untied"), tensor_parallel_size=2, worker_num_cpus=64,
            startup_timeout_s=2)
    assert err.value.field == "tensor_parallel_size" and "could not reserve" in str(err.value)
    from ray.util.state import list_placement_groups

    assert all(g.state == "REMOVED" for g in list_placement_groups(address=state_address(), raise_on_missing_output=False))


async def _stream_until_error(engine: AsyncLLMEngine, prompt: list[int], started: asyncio.Event):
    params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    try:
        async for _ in engine.generate({"prompt_token_ids": prompt}, params):
            started.set()
    except EngineDeadError as err:
        return err, time.monotonic()
    return None, time.monotonic()


def _check_group_dies_cleanly(path: str, kill) -> None:
    """Start 4 streams, ``kill(executor)`` once tokens flow; every stream must end in EngineDeadError."""
    engine = AsyncLLMEngine(LLM(model=path, dtype="float32", tensor_parallel_size=2, worker_num_cpus=1,
                                step_timeout_s=5).engine)
    executor = engine.engine.executor
    actor_ids = {w._actor_id.hex() for w in executor.workers}
    group_id = executor.placement_group.id.hex()
    assert executor.is_healthy() and live_actor_ids(WORKER) >= actor_ids

    async def scenario():
        started = asyncio.Event()
        tasks = [asyncio.create_task(_stream_until_error(engine, p, started)) for p in tiny_prompts()[:4]]
        await asyncio.wait_for(started.wait(), 60)
        killed_at = time.monotonic()
        kill(executor)
        results = await asyncio.wait_for(asyncio.gather(*tasks), 30)
        return killed_at, results

    killed_at, results = asyncio.run(scenario())
    for err, ended_at in results:
        assert isinstance(err, EngineDeadError), "a stream finished instead of failing"
        assert ended_at - killed_at <= 10.0, f"took {ended_at - killed_at:.1f} s"
    assert not executor.is_healthy()
    engine.shutdown()
    deadline = time.monotonic() + 10
    while (live_actor_ids(WORKER) & actor_ids or placement_group_state(group_id) != "REMOVED") \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not live_actor_ids(WORKER) & actor_ids, "worker actors of the dead group are still alive"
    assert placement_group_state(group_id) == "REMOVED"


@pytest.mark.parametrize("rank", [0, 1])
def test_killed_worker_ends_every_request_then_a_new_engine_serves(local_ray, tiny_reference, rank):
    path, _, prompts, expected = tiny_reference
    _check_group_dies_cleanly(path, lambda executor: local_ray.kill(executor.workers[rank], no_restart=True))
    llm = LLM(model=path, dtype="float32", tensor_parallel_size=2, worker_num_cpus=1)
    try:
        assert generate_tokens(llm, prompts[:2]) == expected[:2]
    finally:
        llm.engine.shutdown()


def test_hung_worker_is_declared_dead_after_the_step_timeout(local_ray, tiny_reference):
    """A worker that stops responding (SIGSTOP) trips step_timeout_s (5 s here), not an endless hang."""
    path = tiny_reference[0]
    _check_group_dies_cleanly(path, lambda executor: os.kill(executor.infos[1]["pid"], signal.SIGSTOP))


def test_shutdown_leaves_no_actors_or_placement_group(local_ray, tiny_reference):
    llm = LLM(model=tiny_reference[0], tensor_parallel_size=2, worker_num_cpus=1)
    executor = llm.engine.executor
    actor_ids = {w._actor_id.hex() for w in executor.workers}
    group_id = executor.placement_group.id.hex()
    llm.engine.shutdown()
    deadline = time.monotonic() + 10
    while live_actor_ids(WORKER) & actor_ids and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not live_actor_ids(WORKER) & actor_ids
    assert placement_group_state(group_id) == "REMOVED"
    with pytest.raises(EngineDeadError):
        llm.generate("hello", SamplingParams(max_tokens=2))


def test_executor_inside_a_placement_group_uses_its_bundles(local_ray, tiny_reference):
    """As in a Serve replica: the enclosing actor's placement group holds its own bundle first,
    then one per worker; the executor must place workers there and reserve nothing itself."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    path, _, prompts, expected = tiny_reference
    group = placement_group([{"CPU": 1}, {"CPU": 1}, {"CPU": 1}], strategy="STRICT_PACK")
    local_ray.get(group.ready(), timeout=60)

    class Replica:  # defined here so Ray ships it by value
        def __init__(self):
            from cluster.llm import LLM

            self.llm = LLM(model=path, dtype="float32", tensor_parallel_size=2, worker_num_cpus=1)

        def run(self, prompt_ids):
            executor = self.llm.engine.executor
            outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], GREEDY)
            return ([o.outputs[0].token_ids for o in outputs], executor.placement_group.id.hex(),
                    executor._owns_placement_group)

    replica_class = local_ray.remote(num_cpus=1)(Replica)
    replica = replica_class.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
        group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)).remote()
    try:
        tokens, used_group, owns = local_ray.get(replica.run.remote(prompts[:2]), timeout=120)
        assert tokens == expected[:2]
        assert used_group == group.id.hex() and not owns
    finally:
        local_ray.kill(replica)
        remove_placement_group(group)


def test_corrupt_checkpoint_fails_on_the_ranks_with_a_model_load_error(local_ray, tiny_llama_dir, tmp_path):
    import shutil

    from cluster.errors import ModelLoadError

    path = tmp_path / "corrupt"
    shutil.copytree(tiny_llama_dir("llama_untied"), path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    before = live_actor_ids(WORKER)
    with pytest.raises(ModelLoadError) as err:
        LLM(model=str(path), tensor_parallel_size=2, worker_num_cpus=1)
    assert err.value.field == "model"
    deadline = time.monotonic() + 10
    while live_actor_ids(WORKER) - before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not live_actor_ids(WORKER) - before


def test_executor_inside_a_serve_replica_uses_the_deployments_bundles(local_ray, tiny_reference):
    """A Serve deployment reserves [replica, worker, worker] bundles; the replica's tp=2 engine
    must run its workers in them (no second placement group) and serve correct tokens."""
    from ray import serve
    from ray.util.state import list_placement_groups

    path, _, prompts, expected = tiny_reference

    class ModelServer:  # defined here so Ray ships it by value
        def __init__(self):
            from cluster.llm import LLM

            self.llm = LLM(model=path, dtype="float32", tensor_parallel_size=2, worker_num_cpus=1)

        def __call__(self, prompt_ids):
            executor = self.llm.engine.executor
            outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], GREEDY)
            return ([o.outputs[0].token_ids for o in outputs], executor.placement_group.id.hex(),
                    executor._owns_placement_group, executor.is_healthy())

    deployment = serve.deployment(ModelServer, ray_actor_options={"num_cpus": 1},
                                  placement_group_bundles=[{"CPU": 1}, {"CPU": 1}, {"CPU": 1}],
                                  placement_group_strategy="STRICT_PACK")
    groups_before = {g.placement_group_id for g in list_placement_groups(address=state_address(), raise_on_missing_output=False)}
    try:
        handle = serve.run(deployment.bind(), name="tp-in-serve", route_prefix=None)
        tokens, used_group, owns, healthy = handle.remote(prompts[:2]).result(timeout_s=120)
        assert tokens == expected[:2] and healthy and not owns
        new_groups = {g.placement_group_id for g in list_placement_groups(address=state_address(), raise_on_missing_output=False)
                      if g.state == "CREATED"} - groups_before
        assert new_groups == {used_group}, "the replica's own group only: nothing reserved twice"
    finally:
        serve.delete("tp-in-serve")  # Serve itself belongs to the shared cluster


@pytest.mark.parametrize("keepalive_s, survives", [(1.0, True), (1000.0, False)])
def test_idle_group_outlives_its_broadcast_timeout_only_thanks_to_the_keepalive(
        local_ray, tiny_reference, monkeypatch, keepalive_s, survives):
    """Ranks 1.. wait for the next step in a gloo broadcast with a finite timeout (3 s here);
    the executor's keepalive must refresh it while idle, and without it the group must die
    loudly rather than hang."""
    from cluster.parallel import ray_executor

    monkeypatch.setattr(ray_executor, "IDLE_TIMEOUT_S", 3.0)
    monkeypatch.setattr(ray_executor, "KEEPALIVE_S", keepalive_s)
    path, _, prompts, expected = tiny_reference
    llm = LLM(model=path, dtype="float32", tensor_parallel_size=2, worker_num_cpus=1)
    try:
        time.sleep(6)
        if survives:
            assert llm.engine.executor.is_healthy()
            assert generate_tokens(llm, prompts[:2]) == expected[:2]
        else:
            with pytest.raises(EngineDeadError):
                generate_tokens(llm, prompts[:2])
    finally:
        llm.engine.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 4])
def test_swiftkv_under_tensor_parallelism_matches_the_reference(local_ray, tiny_llama_dir, tmp_path, tp):
    """SwiftKV (tests/integration/test_swiftkv.py) over Ray workers: each holds its heads of
    q_proj_swiftkv and of the groups' K/V (replicated at tp=4)."""
    model_dir = tiny_llama_dir("llama_deep")
    params = perturbed_params(model_dir, 2, 2, seed=5)
    path = str(tmp_path / "p.safetensors")
    save_params(path, params, dtype=torch.float32)
    llm = LLM(model=model_dir, swiftkv_params=path, dtype="float32", block_size=4, max_num_batched_tokens=16,
              tensor_parallel_size=tp, cache_dir=str(tmp_path / "cache"))
    try:
        prompts = prompts_with_shared_prefixes()
        got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], SWIFTKV_GREEDY)]
    finally:
        llm.engine.shutdown()
    assert got == dense_reference(model_dir, params, prompts, SWIFTKV_GREEDY.max_tokens)
