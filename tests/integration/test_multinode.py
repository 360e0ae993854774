"""The tensor-parallel group on a multi-node Ray cluster: three raylets on this machine (a head
without CPUs and two 2-CPU nodes), the group packed onto one node, then spread over two."""

from __future__ import annotations

import pytest

from cluster.llm import LLM
from cluster.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
PROMPTS = [[(13 * i + 7 * j) % 3000 + 200 for j in range(6 + 11 * i)] for i in range(4)]


@pytest.fixture(scope="module")
def multinode_ray():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 100 << 20})
    for _ in range(2):
        cluster.add_node(num_cpus=2, object_store_memory=100 << 20)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield ray
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    path = tiny_llama_dir("llama_untied")
    llm = LLM(model=path, dtype="float32")
    return path, [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)]


@pytest.mark.parametrize("strategy, num_nodes", [("STRICT_PACK", 1), ("SPREAD", 2)])
def test_group_placement_over_nodes(multinode_ray, reference, strategy, num_nodes):
    path, expected = reference
    assert len([n for n in multinode_ray.nodes() if n["Alive"]]) == 3
    llm = LLM(model=path, dtype="float32", tensor_parallel_size=2, worker_num_cpus=1,
              placement_strategy=strategy)
    try:
        executor = llm.engine.executor
        nodes = multinode_ray.get([w.node_id.remote() for w in executor.workers])
        assert len(set(nodes)) == num_nodes, nodes
        outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)
        assert [o.outputs[0].token_ids for o in outputs] == expected
    finally:
        llm.engine.shutdown()
